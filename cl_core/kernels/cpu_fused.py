"""Launchers of the native CPU one-pass optimizer+DEMA kernels (csrc/fused_cpu.c): the
library's layout check, its typed entry points, and calls that take the int64 tables,
the state arrays and the config's scalars.

The engine's CPU driver (cl_core/dema/onepass/cpu_driver.py, `CpuFusedDriver`) builds and owns the
tables; cl_core/kernels/triton_fused.py is this module's twin on CUDA. The kernel
sweeps each tensor once per step (finish the previous EMA
update, optimizer update, this step's statistics), tensors split over threads by
`native.ShardedRunner`. θ* and g_prev are fp32, or with DEMAConfig(ema_dtype="param") of
the parameter dtype (bf16/fp16): then the `cpu_fused_*_param_*` entry points round the
DEMA half exactly as the engine's dema_cpu_param_* kernels do.

Tables (slot names in kernels/layouts.py; csrc/dema_common.h mirrors them and the
library exports its numbers, checked against Python before first use):
- static, int64 [N_STATIC, T]: addresses of θ, exp_avg, exp_avg_sq, θ*, g_prev, numel,
  optimizer param group. Built once; rewritten only when a parameter's storage, the
  parameters' dtype or the optimizer state (members.version) changed.
- dynamic, int64 [N_DYNAMIC, T]: gradient address, torch's step count, flags. Rows are
  written only when they changed (gradients often come back at the same address).
- hyper: the step's float64 rows, one per optimizer param group (StepBatch.hyper, as is).
- CS (this file's own, CS_* below): addresses of the per-tensor state arrays.

Memory safety: every step the driver's `prepare` checks (dtype, device, contiguity, numel of
parameters and gradients, parameter addresses) against what the tables were built for,
so a model moved to another dtype or given new storage after the optimizer was built
is rebuilt for or sent to the generic path, never swept as the old layout.
"""
from __future__ import annotations

import ctypes

import torch

from cl_core.kernels import layouts as L
from cl_core.kernels import native
from cl_core.kernels.native import address


# The CPU group's own table (CL_CORE_CPU_LAYOUT in csrc/fused_cpu.c): addresses of the
# engine's per-tensor state arrays and of the decision the last step left pending.
N_CS = 9
CS_STARTED = 0  # uint8 [T]   GroupState.started
CS_HAS_PREV = 1  # uint8 [T]  GroupState.has_prev
CS_D = 2  # fp32 [T]          GroupState.d
CS_ALPHA = 3  # fp32 [T]      GroupState.alpha
CS_SKIPS = 4  # int64 [T]     GroupState.skips
CS_PEND_MODE = 5  # uint8 [T]  PEND_* left for the next step / flush
CS_PEND_STATS = 6  # fp32 [T, N_DSTAT]  that step's statistics (DS_* columns)
CS_PEND_HAS_GRAD = 7  # uint8 [T]  that step had a gradient
CS_PEND_HAS_PREV = 8  # uint8 [T]  ... and a previous gradient

_SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}
# ema_dtype="param": θ* and g_prev in the parameter dtype (cpu_fused_*_param_*)
_PARAM_SUFFIX = {torch.bfloat16: "param_bf16", torch.float16: "param_f16"}
PARAM_DTYPES = tuple(_SUFFIX)  # parameter dtypes the kernels take
EMA_PARAM_DTYPES = tuple(_PARAM_SUFFIX)  # ... and those whose θ*, g_prev may be of that dtype

_vp, _i64, _f32, _int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
_SIGNATURES = {
    "cpu_fused_step": [_int, _i64, _vp, _vp, _vp, _vp, _vp, _i64, _int, _f32, _f32, _f32],
    "cpu_fused_flush": [_i64, _vp, _vp, _vp, _vp, _i64, _int, _f32, _f32, _f32],
}
_functions: dict = {}
_layout_checked = False


def native_layout(lib) -> dict[str, int]:
    """The (name -> number) table the C library was compiled with."""
    fn = lib.cpu_fused_layout
    fn.restype = ctypes.c_int
    fn.argtypes = [_i64, ctypes.POINTER(ctypes.c_char_p), ctypes.POINTER(_i64)]
    out, name, value, i = {}, ctypes.c_char_p(), _i64(), 0
    while fn(i, ctypes.byref(name), ctypes.byref(value)):
        out[name.value.decode()] = value.value
        i += 1
    return out


def layout_mismatches(lib) -> list[str]:
    """Names whose number differs between the C library and Python (layouts.py for the
    shared names, this module for CS_*), or that Python does not define."""
    bad = []
    for name, value in native_layout(lib).items():
        ours = globals().get(name) if name.startswith(("CS_", "N_CS")) else getattr(L, name, None)
        if ours != value:
            bad.append(f"{name}: C {value}, Python {ours}")
    return bad


def library():
    """The fused library with its layout checked and its entry points declared."""
    global _layout_checked
    lib = native.load("fused")
    if lib is None:
        raise RuntimeError("the native CPU fused kernels could not be built here (fused.unsupported_reason checks this)")
    if not _layout_checked:
        bad = layout_mismatches(lib)
        if bad:
            raise RuntimeError("csrc/dema_common.h / fused_cpu.c and kernels/layouts.py disagree: " + "; ".join(bad))
        for suffix in [*_SUFFIX.values(), *_PARAM_SUFFIX.values()]:
            for prefix, argtypes in _SIGNATURES.items():
                fn = getattr(lib, f"{prefix}_{suffix}", None)
                if fn is not None:
                    fn.restype, fn.argtypes = None, argtypes
        for suffix in ["", *(f"_{x}" for x in _PARAM_SUFFIX.values())]:
            fn = getattr(lib, f"cpu_fused_pending{suffix}", None)
            if fn is not None:
                fn.restype, fn.argtypes = None, [_i64, _vp, _vp, _vp, _int, _f32, _f32, _f32]
        _layout_checked = True
    return lib


def kernels(dtype, ema_dtype=torch.float32):
    """(step, flush) entry points for parameters of `dtype` whose θ* and g_prev are
    `ema_dtype` (float32, or `dtype` itself), or None when the library has none (float16
    where the compiler lacks _Float16)."""
    key = (dtype, ema_dtype)
    if key not in _functions:
        lib = library()
        suffix = _SUFFIX[dtype] if ema_dtype == torch.float32 else _PARAM_SUFFIX[dtype]
        step = getattr(lib, f"cpu_fused_step_{suffix}", None)
        flush = getattr(lib, f"cpu_fused_flush_{suffix}", None)
        _functions[key] = (step, flush) if step is not None and flush is not None else None
    return _functions[key]


def step(fns, runner: native.ShardedRunner, kind: int, stab: torch.Tensor, dyn: torch.Tensor, hyper: torch.Tensor,
         cs: torch.Tensor, formula: int, scale: float, fallback: float, beta: float) -> None:
    """The fused sweep of one step over the tensors `runner` covers. `fns`: `kernels(...)`;
    stab / dyn: the static and dynamic int64 tables (S_*, D_* rows, one column per tensor);
    hyper: float64 [param groups, N_HYPER], contiguous; cs: the CS_* address table."""
    if hyper.dtype != torch.float64 or hyper.dim() != 2 or hyper.shape[1] != L.N_HYPER or not hyper.is_contiguous():
        raise ValueError(f"fused DEMA step: hyper-parameters must be a contiguous float64 [groups, {L.N_HYPER}] table")
    step_fn = fns[0]
    args = (address(stab), address(dyn), address(hyper), address(cs), stab.shape[1], formula, scale, fallback, beta)
    runner.run(lambda count, idx: step_fn(kind, count, idx, *args))


def flush(fns, runner: native.ShardedRunner, stab: torch.Tensor, theta: torch.Tensor, cs: torch.Tensor,
          formula: int, scale: float, fallback: float, beta: float) -> None:
    """Finish the EMA update the last `step` left pending, θ read through `theta` (an int64
    table of θ addresses: stab's S_PARAM row, or converted copies)."""
    flush_fn = fns[1]
    args = (address(stab), address(theta), address(cs), stab.shape[1], formula, scale, fallback, beta)
    runner.run(lambda count, idx: flush_fn(count, idx, *args))


def pending(n: int, cs: torch.Tensor, alpha: torch.Tensor, skips: torch.Tensor,
            formula: int, scale: float, fallback: float, beta: float, dtype=None,
            ema_dtype=torch.float32) -> None:
    """The decision of the pending update (α, skip count per tensor) written to `alpha`
    (fp32 [n]) and `skips` (int64 [n]), by the C rule the flush applies; nothing else changes.
    An EMA in the 16-bit parameter `dtype` (ema_dtype == dtype) decides α in its arithmetic."""
    name = "cpu_fused_pending" if ema_dtype == torch.float32 else f"cpu_fused_pending_{_PARAM_SUFFIX[dtype]}"
    getattr(library(), name)(n, address(cs), address(alpha), address(skips), formula, scale, fallback, beta)
