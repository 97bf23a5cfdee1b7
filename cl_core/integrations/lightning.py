"""Dynamic EMA (LCIA "DEMA") in a Lightning ``Trainer`` with one line.

    from cl_core.integrations.lightning import DEMACallback
    trainer = lightning.pytorch.Trainer(callbacks=[DEMACallback()])

The same meaning as the Hugging Face :class:`cl_core.DEMACallback`:

* ``on_fit_start`` picks the tensors to average (``params="lora"``: the LoRA tensors of
  the active adapter of every PEFT model inside the LightningModule, else every trainable
  parameter; ``"trainable"``: every trainable parameter; or a callable) and sets up the
  update after each optimizer step, in one pass where the optimizer allows it:

  - the module's optimizer is already a :class:`cl_core.DEMAOptimizer`: its engine is used
    (one engine per tensor, never two);
  - it is a plain ``torch.optim.AdamW`` / ``Adam`` / ``SGD`` that updates exactly the
    averaged tensors: it is wrapped in a ``DEMAOptimizer`` in the Trainer, so the optimizer
    update and DEMA run as one sweep (LR schedulers keep working: the wrapper shares the
    inner optimizer's ``param_groups``);
  - anything else: a :class:`cl_core.DEMA` engine updated right after each step of the
    optimizer (a step hook), with one log line saying why it is not one pass.

* A step the precision plugin skipped (AMP overflow) is counted, not averaged; a first step
  where no averaged tensor has a gradient stops training with an error (never a silent fixed EMA).
* Validation and test run with the EMA weights swapped in with ``eval_with_ema=True``.
* The DEMA state goes into the ``.ckpt`` (the callback's ``state_dict``), so a run resumed
  with ``trainer.fit(..., ckpt_path=...)`` ends with exactly the EMA of an uninterrupted run
  (from an epoch-end checkpoint, or mid-epoch with a stateful dataloader: Lightning restarts a
  plain DataLoader from its first batch).
* At the end of training the EMA replaces the live weights (``replace_at_end=True``).
* ``save_ema_adapter(dir)`` writes the EMA as a standard PEFT adapter folder.
* Mean α, the regime of the updates since the last log (fallback share by cause, jumps,
  α quantiles) and the skip counters go to the trainer's loggers every ``log_every_n_steps`` optimizer
  steps (one small host sync then, none in between): the same numbers as the Hugging Face
  callback logs (the engine choice: cl_core.integrations.attach; selection: selection.py; logged
  numbers: log_window.py).

Single device and DDP only: sharding strategies (FSDP, DeepSpeed, model parallel) are refused
at the start with a message, rather than averaging shards with the wrong statistics.
"""
from __future__ import annotations

import logging
import os

from cl_core.integrations.extras import missing_extra

try:
    import lightning.pytorch as pl
except ImportError as exc:  # an optional extra
    raise missing_extra("cl_core.integrations.lightning", "lightning", "lightning", exc) from exc

from cl_core.dema.config import DEMAConfig
from cl_core.dema.engine import DEMA
from cl_core.dema.optim import DEMAOptimizer
from cl_core.integrations import attach
from cl_core.integrations.log_window import LogWindow, train_regime
from cl_core.integrations.selection import check_params_arg, outer_peft_models, select_parameters
from cl_core.integrations.state_files import names_mismatch

logger = logging.getLogger(__name__)

STATE_FORMAT = "cl_core.integrations.lightning.DEMACallback"
STATE_VERSION = 1
# What the Lightning callback adds to the shared first-step check and fusability reasons.
_FIRST_STEP_HINT = ": the averaged tensors take no part in the loss (check params= and the training_step)"
_NOT_FUSABLE_HINT = " (return a cl_core.DEMAOptimizer from configure_optimizers to choose)"


class DEMACallback(pl.Callback):
    """Dynamic EMA (LCIA) for ``lightning.pytorch.Trainer``.

    config:         :class:`cl_core.DEMAConfig` (default settings when None).
    params:         ``"lora"`` (default: the LoRA tensors of the active adapter of the PEFT
                    model(s) in the module, every trainable parameter when there is none),
                    ``"trainable"`` (every parameter with ``requires_grad``), or a callable
                    ``f(pl_module) -> iterable of (name, parameter)``.
    replace_at_end: copy the EMA into the model when training ends (default True).
    eval_with_ema:  validate and test with the EMA weights swapped in (default False, as in the
                    Hugging Face callback: cl_core.integrations.attach).
    fused:          ``"auto"`` (one pass where possible), ``True`` (raise where not possible),
                    ``False`` (always the separate DEMA pass).
    log_stats:      send α statistics to the trainer's loggers (default True).
    measure_lag:    keep a copy of the averaged tensors at the start of training, so that
                    ``.regime.lag`` at its end is the EMA's lag ‖θ* − θ‖₁ / ‖θ_start − θ‖₁
                    (default False).
    warn_regime:    warn once when the run is out of DEMA's regime (default True).

    After ``fit`` starts: ``.engine`` (the :class:`cl_core.DEMA`), ``.names`` (its tensors'
    names in the module), ``.fused`` (bool) and ``.not_fused_reason`` (str or None). After
    it: ``.regime``, the :class:`cl_core.dema.regime.RegimeReport` of the fit.
    """

    def __init__(self, config: DEMAConfig | None = None, *, params="lora", replace_at_end: bool = True,
                 eval_with_ema: bool = attach.EVAL_WITH_EMA_DEFAULT, fused="auto", log_stats: bool = True,
                 measure_lag: bool = False, warn_regime: bool = True):
        attach.check_config_arg(config)
        check_params_arg(params)
        attach.check_fused_arg(fused, "DEMACallback")
        super().__init__()
        self.config = config if config is not None else DEMAConfig()
        self.params = params
        self.replace_at_end = bool(replace_at_end)
        self.eval_with_ema = bool(eval_with_ema)
        self.log_stats = bool(log_stats)
        self.measure_lag = bool(measure_lag)
        self.warn_regime = bool(warn_regime)
        self.regime = None             # RegimeReport of the last fit, set at its end
        self._fused_arg = fused
        self.engine: DEMA | None = None
        self.names: list[str] = []
        self.fused = False
        self.not_fused_reason: str | None = None
        self.resumed = False
        self._module = None
        self._stepper = None           # the optimizer whose steps drive the EMA
        self._update_in_hook = False   # two-pass path: engine.update() in the step hook
        self._hooks = []
        self._expect_step = False      # on_before_optimizer_step seen, step not yet taken
        self._stepped = False          # a step was taken during this batch
        self._first_step = True        # the first step of this fit checks that gradients exist
        self._pending_state = None     # a checkpoint state waiting for the engine
        self._swap_ctx = None
        self._log = LogWindow()        # α of the updates since the last log line

    # ------------------------------------------------------------------ set-up

    def on_fit_start(self, trainer, pl_module):
        _check_strategy(trainer)
        self._remove_hooks()
        self._module = pl_module
        named = select_parameters(pl_module, self.params)
        self._setup_engine(trainer, pl_module, named)
        self.resumed = False
        self._expect_step = self._stepped = False
        self._first_step = True
        self._log.reset()
        if self._pending_state is not None:
            self._apply_pending_state()

    def on_train_start(self, trainer, pl_module):
        # strategies that restore callbacks after set-up hand the state over only now
        if self._pending_state is not None:
            self._apply_pending_state()
        self.regime = None
        if self.measure_lag and self.engine is not None:
            self.engine.mark_start()

    def _setup_engine(self, trainer, pl_module, named):
        canonical = {}
        for n, p in pl_module.named_parameters():
            canonical.setdefault(id(p), n)
        selected = {id(p) for _, p in named}
        optimizers = list(trainer.strategy.optimizers)
        owned = [o for o in optimizers if isinstance(o, DEMAOptimizer)]
        if len(owned) > 1:
            raise ValueError(f"DEMACallback: configure_optimizers returned {len(owned)} DEMAOptimizers; "
                             "the callback can follow one engine; return one DEMAOptimizer (or none and let "
                             "the callback wrap the optimizer)")
        if owned:
            # The module's own DEMAOptimizer: share its engine, never a second one.
            opt = owned[0]
            if opt.engine.config != self.config:
                logger.info("DEMACallback: the module's DEMAOptimizer has its own config %s; the callback's "
                            "config is not used", opt.engine.config)
            if {id(p) for p in opt.engine.params} != selected:
                logger.info("DEMACallback: the module returns a DEMAOptimizer; its engine (%d tensors) is used "
                            "instead of the params=%r selection (%d tensors)",
                            len(opt.engine.params), self.params, len(selected))
        else:
            holders = [o for o in optimizers if any(id(p) in selected for g in o.param_groups for p in g["params"])]
            if not holders:
                raise ValueError(f"DEMACallback: no optimizer of the Trainer updates the {len(named)} averaged "
                                 f"tensors (e.g. {named[0][0]!r}); check configure_optimizers or params=")
            if len(holders) > 1:
                raise ValueError(f"DEMACallback: the averaged tensors are updated by {len(holders)} optimizers; the "
                                 "EMA follows one optimizer's steps: pass params= (a callable) picking the tensors "
                                 "of one")
            opt = holders[0]
            # the optimizer's order, as a DEMAOptimizer's engine has it: a checkpoint of either path
            # loads into the other
            position = {id(p): i for i, p in enumerate(p for g in opt.param_groups for p in g["params"])}
            named = sorted(named, key=lambda item: position.get(id(item[1]), len(position)))

        def install(wrapper):
            index = optimizers.index(opt)
            optimizers[index] = wrapper
            trainer.strategy.optimizers = optimizers      # rebuilds Lightning's optimizer wrappers
            _mark_step_called(opt, wrapper)

        chosen = attach.choose_engine(named, opt, self.config, fused_arg=self._fused_arg, install=install,
                                      canonical=canonical, user=owned[0] if owned else None,
                                      owner="the module's", hint=_NOT_FUSABLE_HINT)
        self.engine, self._stepper, self._update_in_hook = chosen.engine, chosen.stepper, chosen.owns_update
        self.fused, self.not_fused_reason, self.names = chosen.fused, chosen.not_fused_reason, chosen.names
        self._hook_steps(chosen.stepper)

    def _hook_steps(self, opt):
        if not hasattr(opt, "register_step_post_hook"):
            raise TypeError(f"DEMACallback: the optimizer {type(opt).__name__} is not a torch.optim.Optimizer "
                            "(no step hooks), so the EMA cannot follow its steps")
        self._hooks.append(opt.register_step_post_hook(self._after_step))

    def _remove_hooks(self):
        for h in self._hooks:
            h.remove()
        self._hooks = []

    # ------------------------------------------------------------------ per step

    def _after_step(self, optimizer, args, kwargs):
        # Right after the optimizer's step(): the gradients it used are still in p.grad.
        if self._first_step:
            self._first_step = False
            seen = any(p.grad is not None for p in self.engine.params)
            attach.check_first_step_gradients(self.engine, self.names, seen, hint=_FIRST_STEP_HINT)
        if self._update_in_hook:
            self.engine.update()
        if self.log_stats:
            self._log.add(self.engine)
        self._expect_step = False
        self._stepped = True

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self.engine is not None and _same_optimizer(optimizer, self._stepper):
            self._expect_step = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.engine is None:
            return
        if self._expect_step:
            # the precision plugin (GradScaler overflow) or a skipped backward did not call step();
            # a DEMAOptimizer counts such a step itself (at its next zero_grad), our own engine here
            if self._update_in_hook:
                self.engine.skip_step()
            self._expect_step = False
        if self._stepped:
            self._stepped = False
            self._log_stats(trainer)

    def _log_stats(self, trainer):
        if not self.log_stats or not trainer.loggers or trainer.log_every_n_steps <= 0:
            return
        if trainer.global_step % trainer.log_every_n_steps != 0 or not self._log:
            return
        metrics = self._log.metrics(self.engine, check=self.warn_regime)  # the one device sync, on logging steps only
        for lg in trainer.loggers:
            lg.log_metrics(metrics, step=trainer.global_step)

    # ------------------------------------------------------------------ evaluation with the EMA

    def _swap_in(self, pl_module):
        if not self.eval_with_ema or self._swap_ctx is not None:
            return
        if self.engine is None and self._pending_state is not None:
            self._engine_from_state(pl_module)     # trainer.validate/test(ckpt_path=...) without a fit
        if self.engine is None:
            return
        ctx = self.engine.swap()
        ctx.__enter__()
        self._swap_ctx = ctx

    def _swap_out(self):
        ctx, self._swap_ctx = self._swap_ctx, None
        if ctx is not None:
            ctx.__exit__(None, None, None)

    def on_validation_start(self, trainer, pl_module):
        self._swap_in(pl_module)

    def on_validation_end(self, trainer, pl_module):
        self._swap_out()

    def on_test_start(self, trainer, pl_module):
        self._swap_in(pl_module)

    def on_test_end(self, trainer, pl_module):
        self._swap_out()

    def on_exception(self, trainer, pl_module, exception):
        self._swap_out()     # never leave the EMA in the live weights
        self._remove_hooks()  # nor a hook on an optimizer the user may step again

    def swap(self):
        """``with callback.swap(): ...`` — the EMA weights live inside."""
        return attach.swap(self.engine)

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict:
        if self.engine is None:
            return dict(self._pending_state) if self._pending_state is not None else {}
        return {"format": STATE_FORMAT, "version": STATE_VERSION, "names": list(self.names),
                "engine": self.engine.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        """Keep a checkpoint's DEMA state; it is loaded into the engine when fit (or test) starts."""
        if not state_dict:
            return
        if not isinstance(state_dict, dict) or state_dict.get("format") != STATE_FORMAT:
            raise ValueError("the checkpoint's DEMACallback entry is not a cl_core.integrations.lightning.DEMACallback state "
                             f"(format {state_dict.get('format') if isinstance(state_dict, dict) else None!r})")
        if state_dict.get("version") != STATE_VERSION:
            raise ValueError(f"DEMACallback state version {state_dict.get('version')!r} is not supported "
                             f"(this cl_core reads version {STATE_VERSION})")
        self._pending_state = state_dict

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        # The callback entry holds the DEMA state; drop the copy a DEMAOptimizer adds to its own
        # state dict, so the optimizer entry stays a plain torch one (loadable without cl_core).
        if self._swap_ctx is not None:
            logger.warning("DEMACallback: a checkpoint is being saved while the EMA weights are swapped in for "
                           "evaluation, so its model weights are the EMA's; save outside validation/test")
        states = checkpoint.get("optimizer_states")
        if self._stepper is None or not isinstance(self._stepper, DEMAOptimizer) or not states:
            return
        for i, opt in enumerate(trainer.optimizers):
            if opt is self._stepper and i < len(states) and isinstance(states[i], dict):
                states[i] = {k: v for k, v in states[i].items() if k != "dema"}

    def _check_names(self, saved):
        detail = names_mismatch(saved, self.names, current_what="averaged tensor(s) are",
                                saved_what="are not averaged now")
        if detail is not None:
            raise ValueError(f"the checkpoint's DEMA state does not match the averaged tensors ({len(saved)} saved, "
                             f"{len(self.names)} now): " + detail)

    def _apply_pending_state(self):
        sd, self._pending_state = self._pending_state, None
        self._check_names(sd["names"])
        try:
            self.engine.load_state_dict(sd["engine"])
        except ValueError as exc:
            raise ValueError(f"the checkpoint's DEMA state does not match the model: {exc}") from exc
        self.resumed = True

    def _engine_from_state(self, pl_module):
        names = list(self._pending_state["names"])
        by_name = dict(pl_module.named_parameters())
        missing = [n for n in names if n not in by_name]
        if missing:
            raise ValueError(f"the checkpoint's DEMA state names {len(missing)} tensor(s) the module does not "
                             f"have, e.g. {missing[0]!r}")
        self._module = pl_module
        self.engine = DEMA([by_name[n] for n in names], self.config, names=names)
        self.names = names
        self._apply_pending_state()

    # ------------------------------------------------------------------ end

    def on_train_end(self, trainer, pl_module):
        if self.engine is None:
            return
        self.regime = train_regime(self.engine, self.measure_lag, self.warn_regime)
        if self.replace_at_end:
            self.engine.copy_to_params()

    def teardown(self, trainer, pl_module, stage):
        self._swap_out()
        if stage == "fit":
            self._remove_hooks()

    # ------------------------------------------------------------------ export

    def save_ema_adapter(self, out_dir: str | os.PathLike, adapter_name: str | None = None) -> str:
        """Write the EMA of the PEFT adapter as an adapter folder (``PeftModel.from_pretrained`` loads it;
        needs peft: ``pip install ".[hf]"``)."""
        if self.engine is None or self._module is None:
            raise RuntimeError("DEMACallback.save_ema_adapter: training has not begun (no engine yet)")
        peft_models = outer_peft_models(self._module)
        if len(peft_models) != 1:
            raise ValueError(f"DEMACallback.save_ema_adapter: the module holds {len(peft_models)} PEFT models; "
                             "call cl_core.integrations.peft.save_ema_adapter(peft_model, callback.engine, dir) "
                             "for the one to export")
        return attach.save_ema_adapter(self.engine, peft_models[0][1], os.fspath(out_dir), adapter_name)


# --------------------------------------------------------------------------- helpers


def _mark_step_called(inner, wrapper):
    # An LR scheduler built on the inner optimizer watches its step() to warn when the
    # scheduler steps first; the fused wrapper never calls inner.step(), so say it was called.
    def mark(*_):
        inner._opt_called = True

    wrapper.register_step_post_hook(mark)


def _same_optimizer(a, b) -> bool:
    a = getattr(a, "_optimizer", a)    # a LightningOptimizer wraps the real one
    return a is b


def _check_strategy(trainer):
    from lightning.pytorch import strategies

    # ModelParallelStrategy exists from Lightning 2.4 on
    sharded = tuple(getattr(strategies, name) for name in ("DeepSpeedStrategy", "FSDPStrategy", "ModelParallelStrategy")
                    if hasattr(strategies, name))
    strategy = trainer.strategy
    if isinstance(strategy, sharded):
        raise ValueError(f"DEMACallback (Lightning) does not support {type(strategy).__name__} yet: sharded "
                         "parameters need per-tensor statistics summed across ranks. Use a single device or "
                         "DDP, or the Hugging Face Trainer's cl_core.DEMACallback")
