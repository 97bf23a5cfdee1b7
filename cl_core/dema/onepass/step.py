"""One pass per step: the optimizer update and DEMA fused (docs/design.md §3, "One pass, exact").

`FusedStep` replaces `inner.step(); engine.update()` of a `DEMAOptimizer` whose inner
optimizer is a plain `torch.optim.Adam`, `AdamW` or `SGD`. Each step sweeps every
parameter once: it finishes the previous step's EMA update (its α was decided from
statistics reduced during the previous sweep), applies the optimizer update, and
accumulates this step's statistics. The EMA in memory lags one step, so the engine's
`flush()` (called by every EMA read: `ema_tensors`, `swap`, `state_dict`,
`copy_to_params`) finishes it first. Results equal inner step + generic DEMA.

The optimizer state lives where torch keeps it (`optimizer.state[p]["exp_avg"]`, ...),
so the wrapped optimizer's `state_dict()` and a switch back to the generic path work.
CPU tensors run the native kernels (cl_core/kernels/cpu_fused.py, driven by cpu_driver.py),
CUDA tensors the Triton kernel (cl_core/kernels/triton_fused.py, driven by triton_driver.py);
anything else keeps the generic path.

Two interfaces (Protocols in cl_core/dema/onepass/protocols.py), as torch.optim dispatches `adam()` to its
implementations: the engine (cl_core.dema.engine.DEMA) is the one owner of the DEMA state,
its counters and the flag "an EMA update is pending from the one-pass step"; it is handed
a `OnePassStep` once (DEMAOptimizer builds a FusedStep and calls `engine.attach_one_pass`),
calls its `step` from `engine.one_pass_update()`, and decides when to `flush` (every EMA
read, the next two-pass update, a pickle). FusedStep in turn drives one `FusedDriver` per
engine group: `CpuFusedDriver` (cpu_driver.py, native C kernels) or `TritonFusedDriver`
(triton_driver.py). Implementations write only the GroupState tensors of the groups they
are handed, in place (as torch's fused Adam writes exp_avg); nothing is handed back to the
engine but return values.

Host work per step does not loop over tensors in Python beyond reading each tensor's
`.grad` and the checks (`map` over C methods): hyper-parameters are one row per optimizer
param group (`H_*` slots), step counts one CPU tensor per engine group whose elements are
torch's own `state["step"]` tensors, bumped by one op; the optimizer state of a tensor is
created (the way torch does) only at its first gradient.
"""
from __future__ import annotations

import functools
import logging
import math
import operator
from typing import Sequence

import torch

from cl_core.dema.distributed import is_dtensor
from cl_core.dema.onepass.protocols import FusedDriver, GroupMembers, OnePassResult, StepBatch
from cl_core.kernels import layouts as L
from cl_core.kernels import native

log = logging.getLogger(__name__)

KIND_ADAM, KIND_ADAMW, KIND_SGD = L.KIND_ADAM, L.KIND_ADAMW, L.KIND_SGD
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_GRAD = operator.attrgetter("grad")
_IS_NONE = functools.partial(operator.is_, None)


def _log_beta(beta: float) -> float:
    """log β for the kernels' β^step = exp(step · log β). torch accepts β = 0 (no moment
    averaging: 0^step = 0 for every step >= 1, so the bias correction is 1); log 0 is
    -inf here, and exp(step · -inf) = 0 gives that same correction exactly."""
    return math.log(beta) if beta > 0.0 else -math.inf


def optimizer_kind(opt: torch.optim.Optimizer) -> int | None:
    # Exact types only: a subclass may change step().
    return {torch.optim.Adam: KIND_ADAM, torch.optim.AdamW: KIND_ADAMW, torch.optim.SGD: KIND_SGD}.get(type(opt))


def option_reason(opt: torch.optim.Optimizer, kind: int) -> str | None:
    """Why an option of some param group cannot be honoured by the fused kernel, or None.
    torch reads every option from `param_groups` at every step, so FusedStep calls this at
    every step too (O(param groups), no tensor loop): an option turned on after wrapping
    (maximize, amsgrad, ...) sends that step to the generic path, never ignored."""
    for i, group in enumerate(opt.param_groups):
        for key in ("amsgrad", "maximize", "capturable", "differentiable"):
            if group.get(key):
                return f"param group {i} sets {key}=True, which the fused kernel does not support"
        for key in ("lr", "weight_decay", "momentum", "dampening"):
            if isinstance(group.get(key), torch.Tensor):
                return f"param group {i} has a tensor {key}; the fused kernel takes Python numbers"
        betas = group.get("betas", ())
        if any(isinstance(b, torch.Tensor) for b in betas):
            return f"param group {i} has tensor betas; the fused kernel takes Python numbers"
    kinds = {KIND_ADAMW if kind == KIND_ADAM and g.get("decoupled_weight_decay") else kind for g in opt.param_groups}
    if len(kinds) > 1:
        return "param groups mix Adam's L2 and AdamW's decoupled weight decay"
    return None


def unsupported_reason(opt: torch.optim.Optimizer, engine) -> str | None:
    """Why the fused path cannot run this optimizer/engine, or None when it can."""
    kind = optimizer_kind(opt)
    if kind is None:
        return f"{type(opt).__name__} has no fused kernel (Adam, AdamW and SGD do)"
    reason = option_reason(opt, kind)
    if reason is not None:
        return reason
    if engine.config.backend == "reference":
        return "backend='reference' asks for the literal per-tensor maths"
    if engine.reduce_stats is not None:
        return "the statistics are reduced across ranks (sharded parameters)"
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    for p in engine.params:
        if id(p) not in in_opt:
            return "the engine averages a tensor the optimizer does not update"
        if p.dtype not in _DTYPES:
            return f"parameter dtype {p.dtype} has no fused kernel"
        if not p.is_contiguous():
            return "a parameter is not contiguous"
        if is_dtensor(p):
            return "the parameters are DTensors (sharded)"
    for group in engine.groups:
        if group.backend_name == "triton":
            continue  # resolve_backend already checked that triton can run there
        if group.device.type != "cpu":
            return f"no fused kernel for {group.device} tensors without triton"
        if native.load("fused") is None:
            return "the native CPU kernels could not be built here"
    return None


# ---------------------------------------------------------------------- the orchestration
class FusedStep:
    """The one-pass step of a DEMAOptimizer (see the module docstring): an `OnePassStep`
    over the engine's groups, driving one `FusedDriver` per group."""

    def __init__(self, optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor]):
        self.opt = optimizer
        self.params = list(params)  # the engine's tensors, in its order
        self.kind = optimizer_kind(optimizer)
        self._members = None  # [GroupMembers]
        self._drivers = None
        self._engine_states = None
        self._state_obj = None  # opt.state when the members were collected
        self._warned = set()
        self.generic_steps = 0  # steps that took the generic path (a reason was logged once)
        self._alias_key = None  # (id, len) of each param group's list when _alias was computed
        self._alias = None

    @classmethod
    def create(cls, optimizer, engine):
        """A FusedStep for `engine`'s tensors, or None (with a log line saying why) where
        it cannot run. The engine is only read here."""
        reason = unsupported_reason(optimizer, engine)
        if reason is not None:
            log.info("DEMAOptimizer uses the generic path (optimizer step, then a DEMA pass): %s", reason)
            return None
        return cls(optimizer, engine.params)

    def _alias_reason(self) -> str | None:
        """A tensor listed twice in the param groups (torch only warns, then steps it twice):
        the kernel would step it once. Recomputed only when the tensors listed changed: the key
        is every listed tensor's identity (a C-level map per group, not a Python loop), so an
        element replaced in place in the same list is noticed too."""
        key = tuple(tuple(map(id, g["params"])) for g in self.opt.param_groups)
        if key != self._alias_key:
            ids = [i for group_ids in key for i in group_ids]
            self._alias = None if len(set(ids)) == len(ids) else \
                "a tensor appears twice in the param groups (torch steps it twice; the fused kernel would once)"
            self._alias_key = key
        return self._alias

    def reset_step_counts(self) -> None:
        """The optimizer's state was loaded: collect its tensors again at the next step."""
        self._members = None

    # ------------------------------------------------------------------ set-up
    def _setup(self, groups) -> None:
        states = [g.state for g in groups]
        if self._engine_states != states:  # new after a reset of the engine: new drivers
            self._members = None
            self._drivers = None
        if self._members is None or self._state_obj is not self.opt.state:
            self._members = [self._collect(g) for g in groups]
            self._state_obj = self.opt.state
            if self._drivers is None:
                self._drivers = [_driver(g, m) for g, m in zip(groups, self._members)]
                self._engine_states = states
            else:
                for drv, m in zip(self._drivers, self._members):
                    # a fresh members object restarts at version 0: number it past the old
                    # one so a driver comparing versions rebuilds (the old state may be freed)
                    m.version = drv.members.version + 1
                    drv.members = m

    def _collect(self, group) -> GroupMembers:
        """The members of one engine group; torch's step counters become elements of one
        CPU tensor (value kept), so one op bumps them all."""
        params = [self.params[i] for i in group.indices]
        of = {}
        for gi, pg in enumerate(self.opt.param_groups):
            for p in pg["params"]:
                of[id(p)] = gi
        m, v = [], []
        steps = torch.zeros(len(params), dtype=torch.float32) if self.kind != KIND_SGD else None
        for k, p in enumerate(params):
            st = self.opt.state.get(p, {})
            if self.kind == KIND_SGD:
                m.append(st.get("momentum_buffer"))
                v.append(None)
                continue
            m.append(st.get("exp_avg"))
            v.append(st.get("exp_avg_sq"))
            if "step" in st:
                # a CPU scalar in torch's default Adam (no sync); on the device for fused=True
                # groups: read once here, when the tables are (re)collected
                steps[k] = float(st["step"])
                st["step"] = steps[k]
        groups = [of[id(p)] for p in params]
        if self.kind == KIND_SGD:  # SGD without momentum keeps no state
            stateless = [k for k, x in enumerate(m) if x is None and self.opt.param_groups[groups[k]]["momentum"] != 0]
        else:
            stateless = [k for k, x in enumerate(m) if x is None]
        return GroupMembers(group.state, group.device, group.dtype, list(group.indices), params, groups, m, v, steps,
                            stateless)

    def _hyper(self, kind: int) -> torch.Tensor:
        """One float64 row of N_HYPER per optimizer param group (never per tensor)."""
        rows = []
        for pg in self.opt.param_groups:
            row = [0.0] * L.N_HYPER
            row[L.H_LR] = float(pg["lr"])
            row[L.H_WEIGHT_DECAY] = float(pg["weight_decay"])
            if kind == KIND_SGD:
                row[L.H_MOMENTUM] = float(pg["momentum"])
                row[L.H_DAMPENING] = float(pg["dampening"])
                row[L.H_NESTEROV] = float(bool(pg["nesterov"]))
            else:
                beta1, beta2 = (float(b) for b in pg["betas"])
                row[L.H_BETA1], row[L.H_BETA2], row[L.H_EPS] = beta1, beta2, float(pg["eps"])
                row[L.H_LOG_BETA1], row[L.H_LOG_BETA2] = _log_beta(beta1), _log_beta(beta2)
            rows.append(row)
        return torch.tensor(rows, dtype=torch.float64)

    def _create_state(self, mem: GroupMembers, positions) -> list:
        """torch's own per-parameter state for tensors that get their first gradient now,
        created the way torch creates it. Returns the SGD positions whose buffer starts."""
        first = []
        for k in positions:
            p = mem.params[k]
            state = self.opt.state[p]
            if self.kind == KIND_SGD:
                if self.opt.param_groups[mem.param_group[k]]["momentum"] != 0:
                    # torch starts the buffer as a copy of the (decayed) gradient: the
                    # kernel writes it, told by the DF_FIRST flag
                    state["momentum_buffer"] = torch.empty_like(p, memory_format=torch.preserve_format)
                    mem.exp_avg[k] = state["momentum_buffer"]
                    first.append(k)
                continue
            mem.steps[k] = 0.0
            state["step"] = mem.steps[k]
            state["exp_avg"] = mem.exp_avg[k] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = mem.exp_avg_sq[k] = torch.zeros_like(p, memory_format=torch.preserve_format)
        started = set(positions)
        mem.stateless = [k for k in mem.stateless if k not in started]
        mem.version += 1
        return first

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, groups, consts: tuple) -> OnePassResult:
        """One fused optimizer+DEMA step over the engine's `groups` (OnePassStep.step)."""
        # torch reads the options and the tensor lists at every step: so does this step
        # (O(param groups); the aliasing check reruns only when a group's list changed)
        reason = option_reason(self.opt, self.kind) or self._alias_reason()
        if reason is not None:
            self.before_generic_step(reason)
            return OnePassResult(refused=reason)
        self._setup(groups)
        pg0 = self.opt.param_groups[0]
        kind = KIND_ADAMW if self.kind == KIND_ADAM and pg0.get("decoupled_weight_decay") else self.kind
        hyper = self._hyper(kind)
        batches, missing = [], []
        for mem, drv in zip(self._members, self._drivers):
            grads = list(map(_GRAD, mem.params))
            has_all = not any(map(_IS_NONE, grads))  # not `None in grads`: that calls Tensor.__eq__
            batch = StepBatch(kind, consts, hyper, grads, has_all)
            reason = drv.prepare(batch)
            if reason is not None:
                self.before_generic_step(reason)  # said before the engine finishes the pending update
                return OnePassResult(refused=reason)
            batches.append(batch)
        for mem, drv, batch in zip(self._members, self._drivers, batches):
            grads = batch.grads
            if not batch.has_all_grads:
                missing.extend(mem.indices[k] for k, g in enumerate(grads) if g is None)
            new = [k for k in mem.stateless if grads[k] is not None]
            if new:
                batch.first = self._create_state(mem, new)
            if mem.steps is not None:  # torch's state["step"] of the tensors that step now
                if batch.has_all_grads:
                    mem.steps.add_(1.0)
                else:
                    mem.steps.add_(torch.tensor([g is not None for g in grads], dtype=torch.float32))
            drv.step(batch)
        return OnePassResult(missing=missing)

    def before_generic_step(self, reason: str) -> None:
        """This step takes the generic path (optimizer step, then a DEMA pass): count it,
        say why (once per reason), and give the optimizer its own state layout back. `step`
        calls it when it refuses."""
        self.generic_steps += 1
        if reason not in self._warned:
            self._warned.add(reason)
            log.warning("DEMAOptimizer: this step takes the generic path (optimizer step, then a DEMA pass): "
                        "%s (logged once per reason; FusedStep.generic_steps counts such steps)", reason)
        self._restore_step_tensors()
        self._members = None  # the optimizer creates and replaces its own state meanwhile

    def _restore_step_tensors(self) -> None:
        """Before torch's own step: a param group with fused=True or capturable keeps its
        step counters on the parameters' device (torch's layout); give them back there."""
        for mem in self._members or ():
            if mem.steps is None:
                continue
            for k, p in enumerate(mem.params):
                pg = self.opt.param_groups[mem.param_group[k]]
                st = self.opt.state.get(p)
                if st and "step" in st and (pg.get("fused") or pg.get("capturable")) and p.device.type != "cpu":
                    st["step"] = st["step"].to(p.device, copy=True)

    @torch.no_grad()
    def flush(self) -> None:
        """Finish the EMA update that the last fused step left pending (each driver's
        flush is a no-op where nothing is pending, so a retry after an error is safe)."""
        for drv in self._drivers or ():
            drv.flush()

    def pending_stats(self):
        """This step's (alpha, skips) per engine group, decided on the device from the
        pending state without finishing the EMA; None for a group whose driver cannot."""
        return [drv.pending_stats() for drv in self._drivers or ()]

    def pending_inputs(self):
        """Per engine group, the pending decision's inputs (stats [T, 5], use [T]) for the
        regime counters (cl_core/dema/regime.py), on the device; None where nothing is pending."""
        return [drv.pending_inputs() for drv in self._drivers or ()]


def _driver(group, members: GroupMembers) -> FusedDriver:
    """The fused-kernel driver of one engine group: CPU (native C) or Triton."""
    if group.backend_name == "triton":
        from cl_core.dema.onepass.triton_driver import TritonFusedDriver

        return TritonFusedDriver(members)
    from cl_core.dema.onepass.cpu_driver import CpuFusedDriver

    return CpuFusedDriver(members)
