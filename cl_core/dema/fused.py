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

from cl_core import native_cpu
from cl_core.config import FORMULA_CODE
from cl_core.native_cpu import address, int64_table

log = logging.getLogger(__name__)

KIND_ADAM, KIND_ADAMW, KIND_SGD = 0, 1, 2
# Order of the address table handed to the kernels (P_* in csrc/fused_cpu.c).
FIELDS = (
    "numel", "th", "g", "m", "v", "e", "gp", "started", "has_prev", "d", "alpha", "skips",
    "pend_mode", "pend_stats", "pend_has_grad", "pend_has_prev",
)
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_NONNULL = torch.zeros(1, dtype=torch.float64)  # a valid address for empty tensors' gradients
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
    for (device, _), backend in zip(engine._group_keys, engine._backend_names):
        if backend == "triton":
            continue  # resolve_backend already checked that triton can run there
        if device.type != "cpu":
            return f"no fused kernel for {device} tensors without triton"
        if native_cpu.load("fused") is None:
            return "the native CPU kernels could not be built here"
    return None


class _Group:
    """Tables of one (device, dtype) engine group for the fused kernels."""

    def __init__(self, indices, state, params, dtype, use_triton: bool):
        self.indices, self.state, self.dtype = indices, state, dtype
        self.params = [params[i] for i in indices]
        n = len(indices)
        dev = state.device
        self.device = dev
        self.pend_mode = torch.zeros(n, dtype=torch.uint8, device=dev)
        self.pend_stats = torch.zeros(n, 5, dtype=torch.float32, device=dev)
        self.pend_has_grad = torch.zeros(n, dtype=torch.uint8, device=dev)
        self.pend_has_prev = torch.zeros(n, dtype=torch.uint8, device=dev)
        self.hyper = torch.zeros(n, 8, dtype=torch.float64)
        self._key = None
        self.use_triton = use_triton
        if not use_triton:
            self.numel = int64_table(state.numels)
            self.ptr = {k: torch.zeros(n, dtype=torch.int64) for k in ("th", "g", "m", "v")}
            self.ptr["e"] = int64_table([v.data_ptr() for v in state.ema_views])
            gp = state.gprev_views
            nonnull = _NONNULL.data_ptr()  # null g_prev means "no g_prev" to the kernel
            self.ptr["gp"] = int64_table([v.data_ptr() or nonnull for v in gp] if gp is not None else [0] * n)
            arrays = {
                "numel": self.numel, **self.ptr, "started": state.started, "has_prev": state.has_prev,
                "d": state.d, "alpha": state.alpha, "skips": state.skips, "pend_mode": self.pend_mode,
                "pend_stats": self.pend_stats, "pend_has_grad": self.pend_has_grad,
                "pend_has_prev": self.pend_has_prev,
            }
            self.table = int64_table([arrays[k].data_ptr() for k in FIELDS])
            self.runner = native_cpu.ShardedRunner(state.numels)
            self.step_fn = native_cpu.function_for(dtype, "fused_step")
            self.flush_fn = native_cpu.function_for(dtype, "fused_flush")
        else:
            from cl_core.kernels.fused_dema import TritonFusedGroup

            self.triton = TritonFusedGroup(state, dtype, self)

    def set_pointers(self, th, g, m, v) -> None:
        key = (th, g, m, v)
        if key != self._key:  # grads move with zero_grad(set_to_none=True)
            for name, vals in zip(("th", "g", "m", "v"), key):
                self.ptr[name].copy_(int64_table(vals))
            self._key = key


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
        if not eng.initialized:
            eng._init_groups()
        if self._engine_groups is not eng._groups:
            self._groups = [
                _Group(indices, state, eng.params, eng._group_keys[k][1], eng._backend_names[k] == "triton")
                for k, (indices, state, _) in enumerate(eng._groups)
            ]
            self._engine_groups = eng._groups
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
        consts = (FORMULA_CODE[cfg.formula], cfg.scale, cfg.fallback, cfg.beta)
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
                g.append(p.grad.data_ptr() or _NONNULL.data_ptr())
                mm, vv = self._optimizer_state(p)
                rows.append(self._hyper_row(p, gi, groups[gi], rows_cache))
                if self.kind == KIND_SGD:
                    mm = self.opt.state[p].get("momentum_buffer")
                else:
                    step_counters.append(self.opt.state[p]["step"])
                m.append(0 if mm is None else mm.data_ptr())
                v.append(0 if vv is None else vv.data_ptr())
            grp.hyper.copy_(torch.tensor(rows, dtype=torch.float64).reshape(-1, 8))
            if not grp.use_triton:
                grp.set_pointers(th, g, m, v)
                table, hyper = address(grp.table), address(grp.hyper)
                grp.runner.run(lambda count, idx: grp.step_fn(kind, count, idx, table, hyper, *consts))
            else:
                grp.triton.step(kind, th, g, m, v, grp.hyper, cfg)
        if step_counters:  # torch's own step counters, in one call
            torch._foreach_add_(step_counters, 1.0)
        eng.num_updates += 1
        eng._pending_flush = self.flush

    @torch.no_grad()
    def flush(self) -> None:
        """Finish the EMA update that the last fused step left pending."""
        if self._groups is None:
            return
        cfg = self.engine.config
        consts = (FORMULA_CODE[cfg.formula], cfg.scale, cfg.fallback, cfg.beta)
        for grp in self._groups:
            if not grp.use_triton:
                # Parameters may have been given new storage since the step (p.data = ...).
                grp.ptr["th"].copy_(int64_table([p.data_ptr() for p in grp.params]))
                grp._key = None
                table = address(grp.table)
                grp.runner.run(lambda count, idx: grp.flush_fn(count, idx, table, *consts))
            else:
                grp.triton.flush(cfg)
