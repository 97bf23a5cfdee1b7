"""DEMACallback: dynamic EMA in a Hugging Face ``Trainer`` with one line.

    trainer = Trainer(model=peft_model, args=args, train_dataset=ds, callbacks=[DEMACallback()])

* ``on_train_begin``: builds ``.engine`` (a :class:`cl_core.DEMA`) over the LoRA tensors of
  the active adapter of a PEFT model, else over every trainable parameter. The DEMA state
  travels inside the optimizer state the Trainer already saves and restores (see
  "Checkpoints" below), so a resumed run picks it up with nothing to find on disk.
  With the Trainer's AdamW/Adam/SGD it puts a DEMAOptimizer inside the Trainer's optimizer,
  so each step is one fused optimizer+DEMA pass (``.fused``, ``.not_fused_reason``).
* ``on_optimizer_step`` (where the official code hooks in): one update per optimizer
  step, on the accumulated and clipped gradient; a step that accelerate's GradScaler
  skipped (overflow) is counted with ``engine.skip_step()`` and not averaged. A first
  step where no averaged tensor has a gradient stops training (never a silent fixed EMA).
* ``on_save``: a standalone copy of the DEMA state goes into the checkpoint folder as
  ``dema_state.pt`` (one ``dema_state_rank{r}.pt`` per rank when the parameters are FSDP
  shards or DeepSpeed partitions; ``callback.load_state(folder)`` reads it), and the EMA as
  a PEFT adapter into ``cl_core/ema_adapter/`` (one level deeper than the adapter folders the
  Trainer's resume loads into the model, so a resumed model keeps exactly its own adapters).
* ``on_log``: mean α, the regime of the updates since the last line (fallback share by
  cause, jumps, α quantiles; cl_core/dema/regime.py) and the skip counters in each training
  log line, before the ``report_to`` callbacks see it (so every logging backend gets them);
  the run out of regime is warned once.
* ``on_train_end``: the EMA replaces the live weights (the official "EMA replace"),
  unless ``replace_at_end=False``. ``eval_with_ema=True``: evaluations run on the EMA.

Under DDP (``torchrun``) every rank computes the same EMA, no communication needed;
with FSDP the per-tensor statistics are summed across ranks, and under DeepSpeed (ZeRO
0-3) the gradients are read inside DeepSpeed's step (cl_core.integrations.deepspeed).
The engine choice, the first-step check, ``swap`` and the adapter export are shared with the
Lightning callback (cl_core.integrations.attach), as are the selection (selection.py), the
logged numbers (log_window.py) and the state files (state_files.py); the DEMA state carried in
the optimizer state is carrier.py, the DeepSpeed engine deepspeed.py. This module is the
callback's lifecycle. Needs transformers (``".[hf]"``).

Checkpoints. A state-dict hook on the torch optimizer that holds the averaged tensors puts
the callback's state into the first parameter group of the optimizer's state dict, under
``"cl_core.dema"``: the one place of an optimizer state dict that ``torch.optim.Optimizer.
load_state_dict`` keeps (it restores the saved groups' entries, as it restores their ``lr``).
The Trainer writes that state into ``optimizer.pt`` (DeepSpeed: into each rank's optimizer
file, which suits the per-rank partitions) and loads it back before ``on_train_begin``, where
the callback takes it out of the group again. FSDP saves optimizer states in its own
(consolidated or distributed) format, so FSDP shards resume from the per-rank files instead,
found at ``args.resume_from_checkpoint`` or ``output_dir/checkpoint-{global_step}``.
"""
from __future__ import annotations

import logging
import os

import torch

from cl_core.integrations.extras import missing_extra

try:
    from transformers import TrainerCallback
except ImportError as exc:  # an optional extra
    raise missing_extra("cl_core.integrations.hf (DEMACallback for the transformers Trainer)", "hf",
                        "transformers", exc) from exc

from cl_core.dema import distributed as cl_dist
from cl_core.dema.config import DEMAConfig
from cl_core.dema.optim import DEMAOptimizer
from cl_core.integrations import attach
from cl_core.integrations import fsdp as cl_fsdp
from cl_core.integrations.callback_order import report_before_loggers
from cl_core.integrations.carrier import CARRY_KEY, OptimizerCarrier
from cl_core.integrations.log_window import LogWindow, train_regime
from cl_core.integrations.selection import (active_adapter_names, check_params_arg, is_peft_model, select_parameters,
                                            unwrap_model)
from cl_core.integrations.state_files import atomic_save, load_state_file, names_mismatch

logger = logging.getLogger(__name__)

STATE_FILE = "dema_state.pt"
STATE_FORMAT = "cl_core.DEMACallback"
STATE_VERSION = 1
# Where on_save writes the EMA adapter inside checkpoint-N/. The Trainer's resume loads as a
# model adapter every direct subfolder of the checkpoint that holds adapter weights (every
# transformers version since multi-adapter checkpoints: before 5.23 it then never restores the
# live adapter, from 5.23 it adds a second one); one level deeper nothing scans, so
# checkpoint-N/cl_core/ema_adapter/ stays cl_core's. (cl_core/ itself holds no adapter file.)
CHECKPOINT_SUBDIR = "cl_core"
CHECKPOINT_ADAPTER = os.path.join(CHECKPOINT_SUBDIR, "ema_adapter")
# What the Trainer callback adds to the shared first-step check and fusability reasons.
_FIRST_STEP_HINT = (". The training engine hides the gradients from Trainer callbacks (supported: plain, DDP, "
                    "FSDP, DeepSpeed ZeRO 0-3 through TrainingArguments(deepspeed=...)), or the averaged tensors "
                    "take no part in the loss")
_NOT_FUSABLE_HINT = (" (the Trainer's default TrainingArguments(optim='adamw_torch_fused'), 'adamw_torch' and "
                     "'sgd' have one)")


def state_file_name(rank: int | None = None) -> str:
    """``dema_state.pt``, or ``dema_state_rank{rank}.pt`` for per-rank (sharded) state."""
    return STATE_FILE if rank is None else f"dema_state_rank{rank}.pt"


class DEMACallback(TrainerCallback):
    """Dynamic EMA (LCIA) for ``transformers.Trainer``.

    config:         :class:`cl_core.DEMAConfig` (default settings when None).
    replace_at_end: copy the EMA into the model at the end of training (default True).
    record_alpha:   keep ``.alpha_history``, one 1-D float CPU tensor of per-tensor α per
                    optimizer step (this syncs with the device each step, hence opt-in).
    params:         ``"lora"`` (the adapter tensors of the active adapter; every trainable
                    tensor of a model without adapters) or ``"trainable"`` (every trainable tensor).
    fused:          ``"auto"``: the Trainer's AdamW/Adam/SGD runs the one-pass optimizer+DEMA
                    step (``.fused``; ``.not_fused_reason`` and a log line when not); ``True``
                    raises where it cannot; ``False``: optimizer step, then a DEMA pass.
    save_adapter:   each ``checkpoint-*`` folder gets ``cl_core/ema_adapter/`` (a PEFT adapter,
                    where the Trainer's resume does not load it into the model).
    eval_with_ema:  ``trainer.evaluate()`` (during and after training) runs on the EMA weights
                    (default False, as in the Lightning callback: cl_core.integrations.attach).
    precision:      under DeepSpeed, what is averaged. ``"fp32"`` (default): DeepSpeed's fp32
                    master weights and fp32 gradients (every ZeRO stage; more precise than the
                    published run). ``"official"``: what the official LCIA run averaged, at ZeRO
                    stage 0 with bf16 only: the engine's bf16 weights and bf16 gradients, a bf16
                    EMA with the official arithmetic (the config needs ``ema_dtype="param"``;
                    None gives ``DEMAConfig(ema_dtype="param")``). Other stages, and fp32 at
                    stage 0, are refused at the start of training: the official code runs a
                    fixed beta=0.99 EMA there. Without DeepSpeed the tensors are averaged as they
                    are (the official run without DeepSpeed: fp32 LoRA tensors). See docs/fidelity.md.
    measure_lag:    keep a copy of the averaged tensors at the start of training, so that
                    ``.regime.lag`` at its end is the EMA's lag ‖θ* − θ‖₁ / ‖θ_start − θ‖₁ (a
                    copy of the averaged tensors' memory; default False).
    warn_regime:    warn once when the run is out of DEMA's regime (default True; the runner
                    turns it off and says it once per method instead).

    After training: ``.regime``, the :class:`cl_core.dema.regime.RegimeReport` of the whole
    ``train()`` (where α sat and why; its ``lag`` with ``measure_lag=True``).
    """

    def __init__(self, config: DEMAConfig | None = None, *, params: str = "lora", replace_at_end: bool = True,
                 record_alpha: bool = False, fused="auto", save_adapter: bool = True,
                 eval_with_ema: bool = attach.EVAL_WITH_EMA_DEFAULT, precision: str = "fp32",
                 measure_lag: bool = False, warn_regime: bool = True):
        attach.check_config_arg(config)
        if precision not in attach.PRECISIONS:
            raise ValueError(f"DEMACallback(precision={precision!r}) is not known; allowed: "
                             f"{', '.join(map(repr, attach.PRECISIONS))}")
        if precision == "official":
            if config is None:
                config = DEMAConfig(ema_dtype="param")
            elif config.ema_dtype != "param":
                raise ValueError(f"DEMACallback(precision='official') keeps the EMA and its arithmetic in bf16 as the "
                                 f"official code does, but config has ema_dtype={config.ema_dtype!r}; pass "
                                 "DEMAConfig(..., ema_dtype='param')")
        self.precision = precision
        check_params_arg(params)
        attach.check_fused_arg(fused, "DEMACallback")
        self.params = params
        self._fused_arg = fused
        self.save_adapter = bool(save_adapter)
        self.eval_with_ema = bool(eval_with_ema)
        self._swap_ctx = None              # the engine's swap() while an evaluation runs on the EMA
        self._log = LogWindow()            # device sums of α since the last training log line
        self._eval_hook = None
        self.fused = False                 # the Trainer's optimizer step runs optimizer + DEMA in one pass
        self.not_fused_reason: str | None = None
        self._owns_update = True           # False when a DEMAOptimizer inside the Trainer's optimizer updates
        self.config = config if config is not None else DEMAConfig()
        self.replace_at_end = bool(replace_at_end)
        self.record_alpha = bool(record_alpha)
        self.measure_lag = bool(measure_lag)
        self.warn_regime = bool(warn_regime)
        self.regime = None                 # RegimeReport of the last train(), set at its end
        self.engine = None
        self.alpha_history: list[torch.Tensor] = []
        self.resumed_from: str | None = None   # "optimizer", or the state file an FSDP run resumed from
        self._carrier = OptimizerCarrier(self._carried_state)   # the DEMA state inside the optimizer state
        self._user_optimizer = None
        self._sharded = False
        self._model = None
        self._ds_link = None           # cl_core.integrations.deepspeed.DeepSpeedLink under DeepSpeed
        self._first_step = True
        self._pending_step = False     # on_optimizer_step seen for the current step
        self._scale_before = None      # GradScaler scale before the step (fp16 only)

    # ------------------------------------------------------------------ set-up

    def _build_engine(self, model, optimizer=None):
        named = select_parameters(model, self.params)
        self._owns_update, self.fused, self.not_fused_reason = True, False, None
        self._user_optimizer = None    # the user's own DEMAOptimizer, when the Trainer runs one
        if self._ds_link is not None:
            self._ds_link.close()
            self._ds_link = None
        ds_opt = attach.deepspeed_optimizer(optimizer)
        if ds_opt is None and any(hasattr(p, "ds_id") or hasattr(p, "_hp_mapping") for _, p in named):
            raise RuntimeError(
                "DEMACallback: the parameters are managed by DeepSpeed, but the optimizer the Trainer passed is "
                f"{type(optimizer).__name__}, not accelerate's DeepSpeed wrapper, so the callback cannot reach the "
                "gradients; run DeepSpeed through TrainingArguments(deepspeed=...)")
        if ds_opt is not None:
            # Gradients live inside DeepSpeed's step only: read them there.
            from cl_core.integrations import deepspeed as cl_ds

            self._ds_link, engine = cl_ds.attach_deepspeed(ds_opt, named, self.config, self.precision)
            self._sharded = self._ds_link.partitioned and cl_dist.world_size() > 1
            self.fused, self.not_fused_reason = False, "DeepSpeed steps its own optimizer (DEMA reads it in the step)"
            return engine
        params = [p for _, p in named]
        reduce_stats = cl_fsdp.auto_reduce_stats(params, model)
        self._sharded = reduce_stats is not None
        inner = getattr(optimizer, "optimizer", optimizer)
        user = inner if isinstance(inner, DEMAOptimizer) else None
        if user is not None:
            missing = [n for n, p in named if id(p) not in {id(q) for q in user.engine.params}]
            if missing:
                raise ValueError(f"DEMACallback: the Trainer's DEMAOptimizer does not average {len(missing)} of the "
                                 f"tensors the callback selects (e.g. {missing[0]!r}); build it over them")
        chosen = attach.choose_engine(named, inner, self.config, fused_arg=self._fused_arg,
                                      install=lambda wrapper: _install(optimizer, wrapper),
                                      canonical={id(p): n for n, p in named}, user=user, owner="the Trainer's",
                                      sharded=self._sharded, reduce_stats=reduce_stats, hint=_NOT_FUSABLE_HINT)
        self._owns_update, self.fused, self.not_fused_reason = chosen.owns_update, chosen.fused, chosen.not_fused_reason
        self._user_optimizer = user
        chosen.engine.names = chosen.names
        return chosen.engine

    def on_init_end(self, args, state, control, **kwargs):
        self._report_before_loggers()

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if model is None:
            raise RuntimeError("DEMACallback.on_train_begin got no model; it must be used as a Trainer callback")
        self._model = unwrap_model(model)
        self._swap_out()
        self.engine = self._build_engine(self._model, optimizer)
        if self._eval_hook is not None:
            self._eval_hook.remove()
            self._eval_hook = None
        if self.eval_with_ema:
            # The Trainer has no "evaluation begins" event: the first forward in eval mode swaps
            # the EMA in; on_evaluate / on_predict / the next training step swap it out.
            self._eval_hook = self._model.register_forward_pre_hook(self._eval_forward)
        self.alpha_history = []
        self.resumed_from = None
        self._pending_step = False
        self._first_step = True
        self._log.reset()
        self._carrier.attach(optimizer, ds_inner=self._ds_link.inner if self._ds_link is not None else None,
                             sharded=self._sharded, user_optimizer=self._user_optimizer)
        carried = self._carrier.take()
        if state.global_step > 0:
            self._resume(args, state, carried)
        self.regime = None
        if self.measure_lag:
            self.engine.mark_start()   # θ_start of this train() (a resumed one: of the resumed part)
        self._report_before_loggers()

    def _carried_state(self):
        """What the optimizer state dict carries: this callback's state (None before training)."""
        return None if self.engine is None else self.state_dict()

    def _resume(self, args, state, carried) -> None:
        if carried is not None:
            self.load_state_dict(carried, source=f"the DEMA state in the resumed optimizer state (step "
                                                 f"{state.global_step}, param_groups[0][{CARRY_KEY!r}])")
            self.resumed_from = "optimizer"
            return
        if self._carrier.optimizer is None:     # FSDP shards: the per-rank state files of the checkpoint
            path = self._checkpoint_state_file(args, state)
            if path is not None:
                self.load_state(path)
                self.resumed_from = path
                return
            logger.warning("DEMACallback: training resumes at step %d, but no %s was found in "
                           "args.resume_from_checkpoint or %s/checkpoint-%d (FSDP shards resume from these "
                           "files; set TrainingArguments(resume_from_checkpoint=<folder>) when it is elsewhere, or "
                           "call callback.load_state(folder)); the EMA restarts from the current weights",
                           state.global_step, os.path.basename(self._state_path("")), args.output_dir,
                           state.global_step)
            return
        found = self._checkpoint_state_file(args, state)
        if found is not None:
            # e.g. save_only_model=True: the Trainer restored no optimizer state, the file is there
            logger.warning("DEMACallback: training resumes at step %d, but the Trainer restored no DEMA state with "
                           "the optimizer (save_only_model=True writes no optimizer state); %s holds the EMA of that "
                           "checkpoint and was not used, because a resume takes the EMA from the optimizer state. "
                           "Call callback.load_state(%r) before trainer.train(resume_from_checkpoint=...), or save "
                           "with save_only_model=False; the EMA restarts from the current weights",
                           state.global_step, found, found)
            return
        logger.warning("DEMACallback: training resumes at step %d, but the optimizer state the Trainer restored "
                       "carries no DEMA state (the checkpoint was written without DEMACallback, or its optimizer "
                       "state was not saved: with save_only_model=True, call callback.load_state(<checkpoint "
                       "folder>) before training to use its %s); the EMA restarts from the current weights",
                       state.global_step, os.path.basename(self._state_path("")))

    def _checkpoint_state_file(self, args, state) -> str | None:
        """The state file of the checkpoint a run resumes from (resume_from_checkpoint, else
        output_dir/checkpoint-{global_step}), or None where there is none."""
        for folder in (getattr(args, "resume_from_checkpoint", None),
                       os.path.join(args.output_dir, f"checkpoint-{state.global_step}")):
            path = self._state_path(os.fspath(folder)) if isinstance(folder, (str, os.PathLike)) else None
            if path is not None and os.path.isfile(path):
                return path
        return None

    def _report_before_loggers(self) -> None:
        report_before_loggers(self)

    # ------------------------------------------------------------------ per step

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self._scale_before = _scaler_scale(optimizer)

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if self.engine is None:
            raise RuntimeError("DEMACallback.on_optimizer_step before on_train_begin: the callback must be "
                               "passed to the Trainer (callbacks=[DEMACallback()]), not called by hand")
        scale_before, self._scale_before = self._scale_before, None
        skipped = _step_was_skipped(optimizer, scale_before)
        if self._ds_link is not None:
            seen = self._ds_link.feed()          # the gradients copied inside DeepSpeed's step
        else:
            seen = any(p.grad is not None for p in self.engine.params)
        if skipped:
            self.engine.skip_step()
        else:
            if self._first_step:
                # Nothing to read would be an engine that steps and clears the gradients out of our sight.
                attach.check_first_step_gradients(self.engine, self.engine.names, seen, hint=_FIRST_STEP_HINT)
            self._first_step = False
            if self._owns_update:
                self.engine.update()
            # else: the DEMAOptimizer inside the Trainer's optimizer updated in its step
            self._log.add(self.engine)
        if self.record_alpha:
            if skipped:  # nothing was averaged at this step
                self.alpha_history.append(torch.zeros(len(self.engine.params), dtype=torch.float32))
            else:
                self.engine.flush()      # the one-pass step leaves the EMA (and α) one step behind
                self.alpha_history.append(self.engine.stats.alpha.detach().to("cpu", torch.float32).clone())
        self._pending_step = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        """Adds the DEMA numbers to each training log line (``trainer.state.log_history``, every
        ``report_to`` backend, the progress bar): ``dema/alpha_mean`` and the regime
        (``dema/fallback_share`` by cause, ``dema/jump_share``, quantiles) over the updates
        since the last line, ``dema/out_of_regime``, and the running counts
        ``dema/nonfinite_skips``, ``dema/missing_grads``, ``dema/skipped_steps``, ``dema/updates``
        (cl_core.integrations.log_window.LogWindow, shared with the Lightning callback)."""
        if self.engine is None or logs is None or "loss" not in logs or not self._log:
            return
        numbers = self._log.metrics(self.engine, check=self.warn_regime)
        logs.update(numbers)
        # the Trainer appended a copy of these logs to its history just before this event
        last = state.log_history[-1] if state.log_history else None
        if isinstance(last, dict) and last.get("step") == state.global_step and "loss" in last:
            last.update(numbers)

    def _eval_forward(self, module, args):
        if (self.eval_with_ema and not module.training and self._swap_ctx is None and self.engine is not None
                and self.engine.initialized):
            self._swap_ctx = self.engine.swap()
            self._swap_ctx.__enter__()

    def _swap_out(self) -> None:
        if self._swap_ctx is not None:
            ctx, self._swap_ctx = self._swap_ctx, None
            ctx.__exit__(None, None, None)

    def on_evaluate(self, args, state, control, **kwargs):
        self._swap_out()

    def on_predict(self, args, state, control, **kwargs):
        self._swap_out()

    def on_step_begin(self, args, state, control, **kwargs):
        self._swap_out()

    def on_step_end(self, args, state, control, **kwargs):
        if self.engine is None:
            raise RuntimeError("DEMACallback.on_step_end before on_train_begin: the callback must be passed "
                               "to the Trainer (callbacks=[DEMACallback()])")
        if not self._pending_step:
            raise RuntimeError(
                "DEMACallback: an optimizer step ended without on_optimizer_step being called, so the EMA "
                "was not updated. DEMACallback needs a Trainer that calls on_optimizer_step after "
                "optimizer.step() (transformers >= 4.41) and a training loop that takes optimizer steps")
        self._pending_step = False

    # ------------------------------------------------------------------ checkpoints

    def _state_path(self, folder: str) -> str:
        rank = cl_dist.rank() if self._sharded else None
        return os.path.join(folder, state_file_name(rank))

    def state_dict(self) -> dict:
        if self.engine is None:
            raise RuntimeError("DEMACallback.state_dict: no engine yet (training has not begun)")
        sd = {"format": STATE_FORMAT, "version": STATE_VERSION, "engine": self.engine.state_dict(),
              "names": list(self.engine.names)}
        if self.record_alpha:
            sd["alpha_history"] = [a.clone() for a in self.alpha_history]
        return sd

    def load_state_dict(self, sd: dict, *, source: str = "state dict") -> None:
        if self.engine is None:
            raise RuntimeError("DEMACallback.load_state_dict: no engine yet (training has not begun)")
        if not isinstance(sd, dict) or sd.get("format") != STATE_FORMAT:
            raise ValueError(f"{source} is not a DEMACallback state (format {sd.get('format') if isinstance(sd, dict) else type(sd).__name__!r})")
        if sd.get("version") != STATE_VERSION:
            raise ValueError(f"{source}: DEMACallback state version {sd.get('version')} is not supported "
                             f"(this cl_core writes version {STATE_VERSION})")
        saved = list(sd.get("names", []))
        mine = list(self.engine.names)
        detail = names_mismatch(saved, mine, current_what="tensor(s) of the model are",
                                saved_what="are not in the model")
        if detail is not None:
            raise ValueError(f"{source}: the DEMA state does not match the model's trainable tensors "
                             f"({len(saved)} saved vs {len(mine)} in the model): " + detail)
        try:
            self.engine.load_state_dict(sd["engine"])
        except ValueError as exc:
            raise ValueError(f"{source}: the DEMA state does not match the model: {exc}") from exc
        if "alpha_history" in sd and self.record_alpha:
            self.alpha_history = [a.clone() for a in sd["alpha_history"]]

    def save_state(self, folder: str) -> str:
        """Write the DEMA state into ``folder`` (atomically); returns the file path."""
        return atomic_save(self.state_dict(), self._state_path(folder))

    def load_state(self, path: str) -> None:
        """Load a state written by :meth:`save_state` (a file, or the checkpoint folder)."""
        if os.path.isdir(path):
            path = self._state_path(path)
        self.load_state_dict(load_state_file(path), source=path)

    def on_save(self, args, state, control, **kwargs):
        if self.engine is None:
            return
        self._swap_out()          # (the Trainer already wrote the model: the live weights)
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if self._sharded:
            self.save_state(folder)           # every rank its own slice
        elif args.should_save:                # replicated (single process / DDP): rank 0
            if not os.path.isdir(folder):
                logger.warning("DEMACallback: checkpoint folder %s not found (custom output layout?); "
                               "the DEMA state was not saved; call callback.save_state(folder)", folder)
                return
            self.save_state(folder)
        self._save_checkpoint_adapter(args, folder)

    def _save_checkpoint_adapter(self, args, folder):
        """``checkpoint-*/cl_core/ema_adapter/``: the EMA as a PEFT adapter, out of the resume's reach."""
        if not self.save_adapter or not is_peft_model(self._model) or len(active_adapter_names(self._model)) != 1:
            return
        ds_partitioned = self._ds_link is not None and self._ds_link.partitioned and cl_dist.world_size() > 1
        if self._sharded and not ds_partitioned:
            if not getattr(self, "_warned_fsdp_adapter", False):
                self._warned_fsdp_adapter = True
                logger.info("DEMACallback: FSDP shards: checkpoints hold the per-rank DEMA state, no %s/",
                            CHECKPOINT_ADAPTER)
            return
        if ds_partitioned or args.should_save:     # DeepSpeed partitions: a gather every rank joins
            self.save_ema_adapter(os.path.join(folder, CHECKPOINT_ADAPTER))

    # ------------------------------------------------------------------ end

    def on_train_end(self, args, state, control, **kwargs):
        if self.engine is None:
            return
        self._swap_out()
        self.regime = train_regime(self.engine, self.measure_lag, self.warn_regime)
        if self.replace_at_end:
            self.engine.copy_to_params()

    # ------------------------------------------------------------------ helpers

    def save_ema_adapter(self, out_dir: str, adapter_name: str | None = None) -> str:
        """Write the EMA of the adapter as a PEFT adapter folder (see cl_core.integrations.peft;
        needs peft: ``pip install ".[hf]"``).

        Under DDP any rank may call it, also all at once (each leaves the folder complete).
        Under DeepSpeed ZeRO-1/2/3 the EMA is partitioned across ranks: every rank must call
        it (the partitions are gathered once); the main rank writes, the others wait.
        """
        partitioned = self._ds_link is not None and self._ds_link.partitioned and cl_dist.world_size() > 1
        return attach.save_ema_adapter(self.engine, self._model, out_dir, adapter_name,
                                       gather_group=self._ds_link.group if partitioned else None)

    def swap(self):
        """``with callback.swap(): trainer.evaluate()`` — EMA weights live inside."""
        return attach.swap(self.engine)


def _scaler_of(optimizer):
    scaler = getattr(optimizer, "scaler", None)
    if scaler is None or not callable(getattr(scaler, "is_enabled", None)) or not scaler.is_enabled():
        return None
    return scaler


def _scaler_scale(optimizer):
    """The GradScaler's scale before the step, as a device tensor (no sync), or None."""
    scaler = _scaler_of(optimizer)
    if scaler is None:
        return None
    scale = getattr(scaler, "_scale", None)
    if isinstance(scale, torch.Tensor):
        return scale.detach().clone()
    return None


def _step_was_skipped(optimizer, scale_before=None) -> bool:
    """Did the optimizer step just taken get skipped for inf/NaN gradients (AMP overflow)?

    accelerate's AcceleratedOptimizer sets ``step_was_skipped`` when its GradScaler did not call
    the inner ``step``. With an optimizer that handles the scaling itself (fused AdamW,
    ``_step_supports_amp_scaling``, the Trainer's default ``adamw_torch_fused``) the scaler always
    calls ``step`` and the optimizer skips internally, so accelerate reports False; the scaler
    then lowers its scale, which is what we check (one scalar sync per step, fp16 only).
    """
    if optimizer is None:
        return False
    if bool(getattr(optimizer, "step_was_skipped", False)):
        return True
    if scale_before is not None:
        scaler = _scaler_of(optimizer)
        after = getattr(scaler, "_scale", None) if scaler is not None else None
        if isinstance(after, torch.Tensor):
            return bool((after.to(scale_before.device) < scale_before).item())
    return False


def _install(accelerated, wrapper) -> None:
    """Put ``wrapper`` (a DEMAOptimizer around the Trainer's optimizer) inside accelerate's
    AcceleratedOptimizer, so the Trainer's ``optimizer.step()`` runs it. The LR scheduler keeps
    working: it reads ``param_groups``, which the wrapper shares with the optimizer it wraps."""
    if accelerated is wrapper.inner or not hasattr(accelerated, "optimizer"):
        raise RuntimeError("DEMACallback: the Trainer's optimizer is not wrapped by accelerate; cannot install "
                           "the one-pass step (pass fused=False)")
    accelerated.optimizer = wrapper
    if hasattr(accelerated, "_optimizer_original_step_method"):
        # with a GradScaler accelerate swaps in a patched step of the optimizer it wraps: rebuild it
        from accelerate.optimizer import patch_optimizer_step

        accelerated._optimizer_original_step_method = wrapper.step
        accelerated._optimizer_patched_step_method = patch_optimizer_step(accelerated, wrapper.step)
