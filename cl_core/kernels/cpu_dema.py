"""Launcher of the native CPU DEMA kernels (csrc/dema_cpu.c): one call sweeps the tensors
of one (device, dtype) group from int64 address tables and per-tensor state arrays.

The kernel sweeps each tensor once while it is hot in cache (statistics, the α rule, the
EMA update, g_prev), tensors split over torch's intra-op threads by
`native.ShardedRunner`. `dema_cpu_*` entry points keep θ* and g_prev in float32,
`dema_cpu_param_*` in the 16-bit parameter dtype (the reference's rounding). The engine's
"torch" backend (cl_core/dema/twopass/torch_backend.py) fills the tables and calls
`launch`; nothing here knows the engine.
"""
from __future__ import annotations

import torch

from cl_core.kernels import native
from cl_core.kernels.native import address

# What one call does (MODE_* of csrc/dema_cpu.c): the statistics, the update, or both in
# one sweep (a reduce_stats hook sums the statistics across ranks between the two).
MODE_STATS, MODE_APPLY, MODE_BOTH = 1, 2, 3


def kernel_for(dtype: torch.dtype, ema_in_param_dtype: bool = False):
    """The entry point for parameters of `dtype` (θ* and g_prev in float32, or in `dtype`
    itself), or None where the library is not built or has none for that dtype."""
    if ema_in_param_dtype:
        return native.function_for(dtype, "dema_cpu_param")
    return native.function_for(dtype)


def launch(fn, mode: int, runner: native.ShardedRunner, numel: torch.Tensor, theta_ptrs: torch.Tensor,
           grad_ptrs: torch.Tensor, ema_ptrs: torch.Tensor, gprev_ptrs: torch.Tensor, started: torch.Tensor,
           has_prev: torch.Tensor, d: torch.Tensor, alpha: torch.Tensor, skips: torch.Tensor,
           stats: torch.Tensor, formula: int, scale: float, fallback: float, beta: float,
           odd_fn=None, odd_idx: torch.Tensor | None = None) -> None:
    """One sweep of `fn` in `mode` over the tensors `runner` covers, then (odd_idx) over the
    positions in `odd_idx` by `odd_fn` (tensors read through converted copies).

    Tables (int64 [T]): element counts and the addresses of θ, g (0 = no gradient), θ*
    and g_prev (0 = a formula without g_prev). Per-tensor state (written in place):
    started, has_prev (uint8), d, alpha (fp32), skips (int64); stats fp32 [T, 5], the
    statistics a reduce_stats hook sees. Scalars: DEMAConfig.kernel_scalars()."""
    args = [numel, theta_ptrs, grad_ptrs, ema_ptrs, gprev_ptrs, started, has_prev, d, alpha, skips, stats]
    ptrs = [address(a) for a in args]
    consts = (formula, scale, fallback, beta)
    runner.run(lambda count, idx: fn(mode, count, idx, *ptrs, *consts))
    if odd_idx is not None:
        odd_fn(mode, odd_idx.numel(), address(odd_idx), *ptrs, *consts)
