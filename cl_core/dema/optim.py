"""DEMAOptimizer: add dynamic EMA to any ``torch.optim.Optimizer`` in one line.

    opt = cl_core.DEMAOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-4))
    ...
    loss.backward(); opt.step(); opt.zero_grad()
    with opt.engine.swap(): evaluate(model)      # EMA weights inside
    opt.engine.copy_to_params()                   # the "EMA replace" at the end of a task

``step()`` runs the inner step, then one DEMA update over the parameters of the inner
optimizer that have ``requires_grad``.  The wrapper is a ``torch.optim.Optimizer``
(LR schedulers, ``torch.amp.GradScaler`` and accelerate accept it): ``param_groups``,
``state`` and ``defaults`` are the inner optimizer's own objects, and ``state_dict()``
is the inner state dict plus one key ``"dema"`` with the engine state (``load_state_dict``
also takes a state that ``DEMACallback`` wrote through a Trainer, where it rides in the first
param group as ``"cl_core.dema"``).

With ``GradScaler``, ``scaler.step(opt)`` calls ``opt.step()`` only when the gradients are
finite, so a step the scaler skips is neither taken nor averaged. Such a step is counted
(``engine.stats.skipped_steps``) at the next ``opt.zero_grad()``: gradients computed after
the last step (a new gradient tensor, or one changed in place) that are cleared without a
step mean a skipped step. (A loop that clears gradients with ``model.zero_grad()`` instead
is not seen here; ``DEMACallback`` counts the Trainer's skipped steps itself.)

Gradients the one-pass fused kernel cannot read (sparse, another dtype than the parameter,
non-contiguous) are found by the fused step before anything changes; that step takes the
generic path (logged once per reason), and the engine averages sparse gradients as dense.
"""
from __future__ import annotations

import logging
import functools
import operator
import os
import weakref
from collections import OrderedDict

import torch

from cl_core.dema.config import DEMAConfig

DEMA_STATE_KEY = "dema"
# Where DEMACallback carries its state inside a Trainer's optimizer state dict (cl_core.integrations.hf).
CARRIED_KEY = "cl_core.dema"
log = logging.getLogger(__name__)
_GRAD = operator.attrgetter("grad")
_IS_NONE = functools.partial(operator.is_, None)


def check_fused_arg(fused, who: str) -> None:
    """The one check of a ``fused=`` argument (DEMAOptimizer and both trainer callbacks)."""
    if fused not in ("auto", True, False):
        raise ValueError(f"{who}(fused={fused!r}): use 'auto', True or False")


class DEMAOptimizer(torch.optim.Optimizer):
    """Wrap ``optimizer``; after each of its steps, update the dynamic EMA.

    config:       :class:`cl_core.DEMAConfig` (default settings when None).
    reduce_stats: ``"auto"`` (sum the statistics across ranks when the parameters are
                  FSDP2 DTensor shards), ``None`` (never), or a callable as in
                  :class:`cl_core.DEMA`.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, config: DEMAConfig | None = None, *,
                 reduce_stats="auto", fused="auto"):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"DEMAOptimizer wraps a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(optimizer, DEMAOptimizer):
            raise TypeError("DEMAOptimizer: the optimizer is already wrapped")
        # Not Optimizer.__init__: param_groups/state/defaults are the inner optimizer's.
        self.inner = optimizer
        self.config = config if config is not None else DEMAConfig()
        self._reduce_stats_arg = reduce_stats
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self._patch_step_function()
        self._warned_capturable_if_run_uncaptured = True
        check_fused_arg(fused, "DEMAOptimizer")
        self._fused_arg = fused
        # DEMACallback's state when load_state_dict found one in param_groups[0] (see there)
        self.carried_state = None
        self.engine = self._build_engine()
        # One mutable record shared by reference: Lightning's LightningOptimizer copies this
        # object's __dict__ and runs zero_grad() on the copy while step() runs here, so an
        # attribute rebound on either side would not be seen by the other (every manual-
        # optimization step was counted as skipped).
        self._track = _StepTrack()
        self._track.marks = self._mark_grads()
        self._param_lists = self._param_list_ids()
        self.unaveraged_steps = 0  # steps where a tensor outside the EMA (frozen at wrapping) trained
        if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
            # transformers' DeepSpeed set-up replaces any optimizer handed to the Trainer
            # with its own, so nothing of this wrapper would run: say so where it is built.
            log.warning("DEMAOptimizer built while DeepSpeed is enabled: the Trainer discards optimizers "
                        "passed to it under DeepSpeed, so this one would never step. Use "
                        "Trainer(..., callbacks=[cl_core.DEMACallback()]) instead (README, DeepSpeed).")

    # ------------------------------------------------------------------ engine

    def _dema_params(self) -> list[torch.Tensor]:
        params, seen = [], set()
        for group in self.inner.param_groups:
            for p in group["params"]:
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
        return params

    def _build_engine(self):
        from cl_core.dema.engine import DEMA

        params = self._dema_params()
        if not params:
            raise ValueError("DEMAOptimizer: the optimizer has no parameter with requires_grad=True; "
                             "there is nothing to average")
        reduce_stats = self._reduce_stats_arg
        if isinstance(reduce_stats, str):
            if reduce_stats != "auto":
                raise ValueError(f"DEMAOptimizer: reduce_stats={reduce_stats!r}; use 'auto', None or a callable")
            from cl_core.dema.distributed import auto_reduce_stats

            reduce_stats = auto_reduce_stats(params)
        names = _names_for(self.inner.param_groups, params)
        ids = {id(p) for p in params}
        # tensors the optimizer holds that were frozen when the engine was built: one that
        # gets a gradient later (unfrozen) is seen at each step by a C-level map over these
        self._outside = [p for g in self.inner.param_groups for p in g["params"] if id(p) not in ids]
        engine = DEMA(params, self.config, names=names, reduce_stats=reduce_stats)
        self._fused = self._build_fused(engine)
        return engine

    def _build_fused(self, engine):
        """The one-pass optimizer+DEMA step where the inner optimizer allows it, handed to
        the engine (which owns the state and decides when to finish a pending update)."""
        if self._fused_arg is False:
            return None
        from cl_core.dema.onepass.step import FusedStep, unsupported_reason

        if self._fused_arg is True:
            reason = unsupported_reason(self.inner, engine)
            if reason is not None:
                raise ValueError(f"DEMAOptimizer(fused=True): {reason}; use fused='auto' to fall back")
        fused = FusedStep.create(self.inner, engine)
        if fused is not None:
            engine.attach_one_pass(fused)
        return fused

    # ------------------------------------------------------------------ optimizer API

    @property
    def param_groups(self):
        return self.inner.param_groups

    @param_groups.setter
    def param_groups(self, value):
        self.inner.param_groups = value

    @property
    def state(self):
        return self.inner.state

    @state.setter
    def state(self, value):
        self.inner.state = value

    @property
    def defaults(self):
        return self.inner.defaults

    @defaults.setter
    def defaults(self, value):
        self.inner.defaults = value

    def _param_list_ids(self) -> tuple:
        return tuple(id(g["params"]) for g in self.inner.param_groups)

    def _check_params_unchanged(self) -> None:
        """Refuse a step over parameters the engine was not built for (cheap: list identities).

        DeepSpeed ZeRO, given this wrapper through `optimizer_cls_and_kwargs`, replaces the
        param groups' lists with its own flat fp32 partitions; averaging those would be wrong."""
        ids = self._param_list_ids()
        if ids == self.__dict__.get("_param_lists"):
            return
        engine_ids = {id(p) for p in self.engine.params}
        for group in self.inner.param_groups:
            for p in group["params"]:
                if p.requires_grad and id(p) not in engine_ids:
                    if hasattr(p, "ds_id") or hasattr(p, "_hp_mapping") or \
                            os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
                        from cl_core.dema.distributed import DEMA_OPTIMIZER_UNDER_DEEPSPEED

                        raise RuntimeError(DEMA_OPTIMIZER_UNDER_DEEPSPEED)
                    raise RuntimeError(
                        "DEMAOptimizer: the inner optimizer now updates a tensor the DEMA engine was not built "
                        "for (param_groups were replaced after wrapping); wrap the optimizer after it is final, "
                        "or add groups with DEMAOptimizer.add_param_group before the first step")
        self._param_lists = ids

    def _unfrozen_reason(self) -> str | None:
        """A tensor frozen when the optimizer was wrapped now has a gradient (unfrozen after
        wrapping): the fused kernel only steps the engine's tensors, so this step must take
        the generic path, where the inner optimizer trains it. It is not averaged (the EMA
        was built without it): counted in `unaveraged_steps`, warned once."""
        outside = self.__dict__.get("_outside") or ()
        if not outside or all(map(_IS_NONE, map(_GRAD, outside))):
            return None
        self.unaveraged_steps += 1
        if not self.__dict__.get("_warned_unfrozen"):
            self._warned_unfrozen = True
            names = _names_for(self.inner.param_groups, [p for p in outside if p.grad is not None])
            log.warning("DEMAOptimizer: %s had requires_grad=False when the optimizer was wrapped and now has a "
                        "gradient: the optimizer trains it, but the EMA does not average it (and the end-of-task "
                        "EMA replace leaves it as trained). Unfreeze every tensor before wrapping to average it "
                        "(warned once; DEMAOptimizer.unaveraged_steps counts such steps)", ", ".join(names))
        return "a tensor frozen when the optimizer was wrapped now has a gradient (unfrozen after wrapping)"

    def step(self, closure=None):
        """Inner optimizer step, then the DEMA update. Returns the closure's loss."""
        self._check_params_unchanged()
        self._track.in_step = True  # a closure's zero_grad() inside the step is not a skipped step
        try:
            if self._fused_driver() is not None:
                loss = self._step_fused(closure)
            else:
                loss = self._step_generic(closure)
        finally:
            self._track.in_step = False
        self._track.marks = self._mark_grads()
        return loss

    @property
    def fused(self) -> bool:
        """Whether steps run the one-pass fused optimizer + DEMA kernel."""
        return self._fused_driver() is not None

    def _step_fused(self, closure=None):
        # One sweep per step: the optimizer update and DEMA together (cl_core/dema/onepass/step.py),
        # run by the engine. The one-pass step checks the gradients first and refuses a step
        # whose gradients its kernels cannot read (sparse, another dtype, non-contiguous):
        # that step takes the generic path.
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        unfrozen = self._unfrozen_reason()
        if unfrozen is not None:
            self._step_generic_because(unfrozen)
        elif self.engine.one_pass_update() is not None:  # refused (said and counted by the fused step)
            self.inner.step()
            self.engine.update()
        # The inner optimizer's step() did not run; an LR scheduler built on the inner
        # optimizer checks this flag and would warn that it stepped before the optimizer.
        self.inner._opt_called = True
        return loss

    def _step_generic_because(self, reason: str) -> None:
        """One step of a fused optimizer on the generic path for `reason` (what a refused
        one-pass step does): counted and said, the pending EMA update finished, then the
        optimizer step and a DEMA pass."""
        self._fused.before_generic_step(reason)
        self.engine.flush()
        self.inner.step()
        self.engine.update()

    def _step_generic(self, closure=None):
        # The separate-pass path: any inner optimizer, then one engine update.
        loss = self.inner.step() if closure is None else self.inner.step(closure)
        self._unfrozen_reason()  # said and counted here too (nothing else differs on this path)
        self.engine.update()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        if not self._track.in_step and self._grads_changed():
            # Gradients from a backward pass are cleared without a step: the step was
            # skipped (GradScaler found inf/NaN). See the module docstring.
            self.engine.skip_step()
        self.inner.zero_grad(set_to_none=set_to_none)
        self._track.marks = self._mark_grads()

    def _mark_grads(self) -> list:
        """Which gradient tensor each parameter holds now, and its in-place version."""
        return [None if p.grad is None else (weakref.ref(p.grad), p.grad._version) for p in self.engine.params]

    def _grads_changed(self) -> bool:
        marks = self._track.marks
        if marks is None:  # unknown (just unpickled): count nothing
            return False
        for p, mark in zip(self.engine.params, marks):
            g = p.grad
            if g is not None and (mark is None or mark[0]() is not g or mark[1] != g._version):
                return True
        return False

    def add_param_group(self, param_group: dict) -> None:
        if self.engine.initialized:
            raise RuntimeError("DEMAOptimizer.add_param_group after the first step: the EMA already "
                               "exists for the old parameters; add every group before training")
        self.inner.add_param_group(param_group)
        self.engine = self._build_engine()
        self._track.marks = self._mark_grads()
        self._param_lists = self._param_list_ids()

    def state_dict(self) -> dict:
        """The inner optimizer's state dict plus ``"dema"``: the engine state."""
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        sd = self.inner.state_dict()
        if DEMA_STATE_KEY in sd:
            raise RuntimeError(f"DEMAOptimizer: the inner optimizer's state dict already has a {DEMA_STATE_KEY!r} key")
        sd = dict(sd)
        sd[DEMA_STATE_KEY] = self.engine.state_dict()
        for hook in self._optimizer_state_dict_post_hooks.values():
            out = hook(self, sd)
            if out is not None:
                sd = out
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a dict from :meth:`state_dict` (a plain inner state dict loads the inner state
        and leaves the EMA as it is). A DEMA state that does not match raises ValueError."""
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            out = hook(self, state_dict)
            if out is not None:
                state_dict = out
        state_dict = dict(state_dict)
        dema_sd = state_dict.pop(DEMA_STATE_KEY, None)
        groups = state_dict.get("param_groups")
        carried = None
        if groups and isinstance(groups[0], dict) and CARRIED_KEY in groups[0]:
            # written through a Trainer by DEMACallback: its state rides in the first param group.
            # Kept aside (not in the inner's groups) for a DEMACallback resuming with this optimizer.
            carried = groups[0][CARRIED_KEY]
            if not isinstance(carried, dict) or not isinstance(carried.get("engine"), dict):
                raise ValueError(f"DEMAOptimizer.load_state_dict: param_groups[0][{CARRIED_KEY!r}] is not a "
                                 "DEMACallback state (no 'engine' entry)")
            if dema_sd is None:
                dema_sd = carried["engine"]
            state_dict["param_groups"] = [{k: v for k, v in groups[0].items() if k != CARRIED_KEY}, *groups[1:]]
        # All or nothing: the EMA first (its own checks raise before it changes), then the
        # inner state; if torch refuses that, the EMA gets its previous state back.
        before = self.engine.state_dict() if dema_sd is not None else None
        if dema_sd is not None:
            self.engine.load_state_dict(dema_sd)
        try:
            self.inner.load_state_dict(state_dict)
        except Exception:
            if before is not None:
                self.engine.load_state_dict(before)
            raise
        self.carried_state = carried
        if self._fused_driver() is not None:
            self._fused.reset_step_counts()
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def __getstate__(self):
        # The fused driver holds native handles and pointer tables into this object's
        # tensors: the copy rebuilds it at its first step (the engine finishes any pending
        # EMA update when it is pickled, so nothing is lost).
        state = dict(self.__dict__)
        state["_track"] = _StepTrack()  # weak references do not pickle (marks None: count nothing)
        state["_fused"] = None
        state["_rebuild_fused"] = self._fused is not None or self.__dict__.get("_rebuild_fused", False)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.__dict__.setdefault("_track", _StepTrack())

    def _fused_driver(self):
        """The FusedStep, rebuilt after a copy/unpickle; None on the generic path."""
        if self.__dict__.get("_rebuild_fused"):
            self._rebuild_fused = False
            self._fused = self._build_fused(self.engine)
        return self._fused

    def __repr__(self) -> str:
        return f"DEMAOptimizer({self.inner!r}, config={self.config!r})"


class _StepTrack:
    """Which gradients the last step or zero_grad saw (weak references and versions), and
    whether a step is running: shared by reference with copies of the wrapper's __dict__."""

    __slots__ = ("marks", "in_step")

    def __init__(self):
        self.marks = None  # None: unknown (just unpickled), count nothing
        self.in_step = False


def _names_for(param_groups, params) -> list[str]:
    """Names ``param_groups.G.params.I`` for ``params`` (the index within the inner optimizer)."""
    where = {}
    for gi, g in enumerate(param_groups):
        for pi, p in enumerate(g["params"]):
            where.setdefault(id(p), f"param_groups.{gi}.params.{pi}")
    return [where[id(p)] for p in params]
