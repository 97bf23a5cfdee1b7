"""One pass per step: the optimizer update and DEMA fused (DESIGN.md §3, "One pass, exact").

`FusedStep` replaces `inner.step(); engine.update()` of a `DEMAOptimizer` whose inner
optimizer is a plain `torch.optim.Adam`, `AdamW` or `SGD`. Each step sweeps every
parameter once: it finishes the previous step's EMA update (its α was decided from
statistics reduced during the previous sweep), applies the optimizer update, and
accumulates this step's statistics. The EMA in memory lags one step, so the engine's
`flush()` (called by every EMA read: `ema_tensors`, `swap`, `state_dict`,
`copy_to_params`) finishes it first. Results equal inner step + generic DEMA.

The optimizer state lives where torch keeps it (`optimizer.state[p]["exp_avg"]`, ...),
so the wrapped optimizer's `state_dict()` and a switch back to the generic path work.
CPU tensors run the native kernels (csrc/fused_cpu.c), CUDA tensors the Triton kernel
(kernels/fused_dema.py); anything else keeps the generic path.
"""
from __future__ import annotations

import logging

import torch

from cl_core.kernels import native
from cl_core.kernels.cpu_fused import NONNULL, CpuFusedGroup

log = logging.getLogger(__name__)

KIND_ADAM, KIND_ADAMW, KIND_SGD = 0, 1, 2
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_ZERO_ROW = [0.0] * 8


def optimizer_kind(opt: torch.optim.Optimizer) -> int | None:
    # Exact types only: a subclass may change step().
    return {torch.optim.Adam: KIND_ADAM, torch.optim.AdamW: KIND_ADAMW, torch.optim.SGD: KIND_SGD}.get(type(opt))


def unsupported_reason(opt: torch.optim.Optimizer, engine) -> str | None:
    """Why the fused path cannot run this optimizer/engine, or None when it can."""
    kind = optimizer_kind(opt)
    if kind is None:
        return f"{type(opt).__name__} has no fused kernel (Adam, AdamW and SGD do)"
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
        if hasattr(p, "to_local"):
            return "the parameters are DTensors (sharded)"
    for group in engine.groups:
        if group.backend_name == "triton":
            continue  # resolve_backend already checked that triton can run there
        if group.device.type != "cpu":
            return f"no fused kernel for {group.device} tensors without triton"
        if native.load("fused") is None:
            return "the native CPU kernels could not be built here"
    return None


class FusedStep:
    """The one-pass step of a DEMAOptimizer (see the module docstring)."""

    def __init__(self, optimizer: torch.optim.Optimizer, engine):
        self.opt = optimizer
        self.engine = engine
        self.kind = optimizer_kind(optimizer)
        self._groups = None
        self._engine_groups = None
        self._steps = {}  # id(param) -> optimizer step count (mirror of state["step"])
        self._group_of = {}

    @classmethod
    def create(cls, optimizer, engine):
        """A FusedStep, or None (with a log line saying why) where it cannot run."""
        reason = unsupported_reason(optimizer, engine)
        if reason is not None:
            log.info("DEMAOptimizer uses the generic path (optimizer step, then a DEMA pass): %s", reason)
            return None
        return cls(optimizer, engine)

    def reset_step_counts(self) -> None:
        """Forget the step mirror (after the optimizer's state was loaded)."""
        self._steps = {}

    # ------------------------------------------------------------------ set-up
    def _ensure_groups(self) -> None:
        eng = self.engine
        eng.ensure_groups()
        states = [g.state for g in eng.groups]
        if self._engine_groups != states:  # new after a reset of the engine
            self._groups = [_fused_group(g, eng.params) for g in eng.groups]
            self._engine_groups = states
            self._group_of = {}
            for gi, group in enumerate(self.opt.param_groups):
                for p in group["params"]:
                    self._group_of[id(p)] = gi

    def _optimizer_state(self, p):
        """torch's own per-parameter state, created the way torch creates it."""
        state = self.opt.state[p]
        if self.kind == KIND_SGD:
            return state.get("momentum_buffer"), None
        if len(state) == 0:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state["exp_avg"], state["exp_avg_sq"]

    def _hyper_row(self, p, gi: int, group, rows_cache: dict) -> list[float]:
        """The 8 numbers the kernel needs for parameter p this step (see csrc/fused_cpu.c)."""
        if self.kind == KIND_SGD:
            first = 0.0
            if group["momentum"] != 0 and self.opt.state[p].get("momentum_buffer") is None:
                # torch starts the buffer as a copy of the gradient
                self.opt.state[p]["momentum_buffer"] = torch.empty_like(p, memory_format=torch.preserve_format)
                first = 1.0
            return [group["lr"], group["weight_decay"], group["momentum"], group["dampening"],
                    float(bool(group["nesterov"])), first, 0.0, 0.0]
        pid = id(p)
        if pid not in self._steps:
            self._steps[pid] = int(self.opt.state[p]["step"])  # CPU scalar; read once
        self._steps[pid] += 1
        step = self._steps[pid]
        row = rows_cache.get((gi, step))
        if row is None:  # the same for every parameter of the group at this step count
            beta1, beta2 = group["betas"]
            lr = group["lr"]
            bias_correction1 = 1 - beta1**step
            bias_correction2 = 1 - beta2**step
            row = [lr, group["weight_decay"], beta1, beta2, group["eps"], lr / bias_correction1,
                   bias_correction2**0.5, 0.0]
            rows_cache[(gi, step)] = row
        return row

    def _kind_for(self, group) -> int:
        if self.kind == KIND_ADAM and group.get("decoupled_weight_decay"):
            return KIND_ADAMW
        return self.kind

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self) -> None:
        eng = self.engine
        self._ensure_groups()
        cfg = eng.config
        consts = cfg.kernel_scalars()
        groups = self.opt.param_groups
        kind = self._kind_for(groups[0])  # one kind for all groups: checked by unsupported_reason
        rows_cache, step_counters = {}, []
        for grp in self._groups:
            th, g, m, v, rows = [], [], [], [], []
            for p in grp.params:
                gi = self._group_of[id(p)]
                th.append(p.data_ptr())
                if p.grad is None:  # torch skips such a parameter: no update, no state
                    g.append(0), m.append(0), v.append(0), rows.append(_ZERO_ROW)
                    continue
                if p.grad.is_sparse or p.grad.dtype != p.dtype or not p.grad.is_contiguous():
                    raise RuntimeError("fused DEMA step: gradients must be dense, contiguous and of the parameter dtype")
                # 0 means "no gradient" to the kernels; an empty tensor has a null pointer
                g.append(p.grad.data_ptr() or NONNULL.data_ptr())
                mm, vv = self._optimizer_state(p)
                rows.append(self._hyper_row(p, gi, groups[gi], rows_cache))
                if self.kind == KIND_SGD:
                    mm = self.opt.state[p].get("momentum_buffer")
                else:
                    step_counters.append(self.opt.state[p]["step"])
                m.append(0 if mm is None else mm.data_ptr())
                v.append(0 if vv is None else vv.data_ptr())
            grp.hyper.copy_(torch.tensor(rows, dtype=torch.float64).reshape(-1, 8))
            grp.step(kind, th, g, m, v, consts)
        if step_counters:  # torch's own step counters, in one call
            torch._foreach_add_(step_counters, 1.0)
        eng.count_update()
        eng.set_pending_flush(self.flush)

    @torch.no_grad()
    def flush(self) -> None:
        """Finish the EMA update that the last fused step left pending."""
        if self._groups is None:
            return
        consts = self.engine.config.kernel_scalars()
        for grp in self._groups:
            grp.flush(consts)


def _fused_group(group, params):
    """The fused-kernel driver of one engine group: CPU (native C) or Triton."""
    members = [params[i] for i in group.indices]
    if group.backend_name == "triton":
        from cl_core.kernels.triton_fused import TritonFusedGroup

        return TritonFusedGroup(group.state, group.dtype, members)
    return CpuFusedGroup(group.state, group.dtype, members)
