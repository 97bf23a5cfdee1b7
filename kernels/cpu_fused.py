"""CPU half of the one-pass optimizer+DEMA step: tables and calls of the native fused
kernels (csrc/fused_cpu.c) for one (CPU, dtype) group of the engine.

`cl_core.dema.fused.FusedStep` drives it; `kernels/triton_fused.py` is its twin on
CUDA. Per step the orchestration hands over the parameters' current addresses and one
row of hyper-parameters per tensor; the kernel sweeps each tensor once (finish the
previous EMA update, optimizer update, this step's statistics), tensors split over
threads by `native.ShardedRunner`.
"""
from __future__ import annotations

import torch

from cl_core.kernels import native
from cl_core.kernels.native import address, int64_table

# Order of the address table handed to the kernels (P_* in csrc/fused_cpu.c).
FIELDS = (
    "numel", "th", "g", "m", "v", "e", "gp", "started", "has_prev", "d", "alpha", "skips",
    "pend_mode", "pend_stats", "pend_has_grad", "pend_has_prev",
)
HYPER_SLOTS = 8  # numbers per tensor row of the hyper-parameter table
# A valid address for tensors whose data pointer is null (empty local shards): the
# kernels read 0 as "absent", so an empty tensor that is present needs a non-null one.
NONNULL = torch.zeros(1, dtype=torch.float64)


class CpuFusedGroup:
    """Tables of one CPU engine group for the native fused kernels, and their calls."""

    def __init__(self, state, dtype, params):
        self.state, self.dtype, self.params = state, dtype, params
        n = len(params)
        self.pend_mode = torch.zeros(n, dtype=torch.uint8)
        self.pend_stats = torch.zeros(n, 5, dtype=torch.float32)
        self.pend_has_grad = torch.zeros(n, dtype=torch.uint8)
        self.pend_has_prev = torch.zeros(n, dtype=torch.uint8)
        self.hyper = torch.zeros(n, HYPER_SLOTS, dtype=torch.float64)
        self._key = None
        self.numel = int64_table(state.numels)
        self.ptr = {k: torch.zeros(n, dtype=torch.int64) for k in ("th", "g", "m", "v")}
        self.ptr["e"] = int64_table([v.data_ptr() for v in state.ema_views])
        gp = state.gprev_views
        nonnull = NONNULL.data_ptr()  # null g_prev means "no g_prev" to the kernel
        self.ptr["gp"] = int64_table([v.data_ptr() or nonnull for v in gp] if gp is not None else [0] * n)
        arrays = {
            "numel": self.numel, **self.ptr, "started": state.started, "has_prev": state.has_prev,
            "d": state.d, "alpha": state.alpha, "skips": state.skips, "pend_mode": self.pend_mode,
            "pend_stats": self.pend_stats, "pend_has_grad": self.pend_has_grad,
            "pend_has_prev": self.pend_has_prev,
        }
        self.table = int64_table([arrays[k].data_ptr() for k in FIELDS])
        self.runner = native.ShardedRunner(state.numels)
        self.step_fn = native.function_for(dtype, "fused_step")
        self.flush_fn = native.function_for(dtype, "fused_flush")

    def _set_pointers(self, th, g, m, v) -> None:
        key = (th, g, m, v)
        if key != self._key:  # grads move with zero_grad(set_to_none=True)
            for name, vals in zip(("th", "g", "m", "v"), key):
                self.ptr[name].copy_(int64_table(vals))
            self._key = key

    def step(self, kind: int, th, g, m, v, consts) -> None:
        """One fused step; th/g/m/v are per-tensor addresses (0 = absent), `self.hyper`
        holds this step's rows, consts = DEMAConfig.kernel_scalars()."""
        self._set_pointers(th, g, m, v)
        table, hyper = address(self.table), address(self.hyper)
        self.runner.run(lambda count, idx: self.step_fn(kind, count, idx, table, hyper, *consts))

    def flush(self, consts) -> None:
        """Finish the EMA update the last step left pending."""
        # Parameters may have been given new storage since the step (p.data = ...).
        self.ptr["th"].copy_(int64_table([p.data_ptr() for p in self.params]))
        self._key = None
        table = address(self.table)
        self.runner.run(lambda count, idx: self.flush_fn(count, idx, table, *consts))
