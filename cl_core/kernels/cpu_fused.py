"""CPU half of the one-pass optimizer+DEMA step: the tables and calls of the native fused
kernels (csrc/fused_cpu.c) for one CPU engine group.

`cl_core.dema.fused.FusedStep` drives a `CpuFusedDriver` through the per-step interface
documented there (prepare / step / flush / pending_stats); `cl_core/kernels/triton_fused.py` is
its twin on CUDA. The kernel sweeps each tensor once per step (finish the previous EMA
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

Memory safety: every step `prepare` checks (dtype, device, contiguity, numel of
parameters and gradients, parameter addresses) against what the tables were built for,
so a model moved to another dtype or given new storage after the optimizer was built
is rebuilt for or sent to the generic path, never swept as the old layout.
"""
from __future__ import annotations

import ctypes
import logging
import operator

import torch

from cl_core.kernels import layouts as L
from cl_core.kernels import native
from cl_core.kernels.native import address, int64_table

log = logging.getLogger(__name__)

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
_PTR = torch.Tensor.data_ptr
_NUMEL = torch.Tensor.numel

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


def _library():
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
        lib.cpu_fused_pending.restype = None
        lib.cpu_fused_pending.argtypes = [_i64, _vp, _vp, _vp, _int, _f32, _f32, _f32]
        _layout_checked = True
    return lib


def _kernels(dtype, ema_dtype=torch.float32):
    """(step, flush) entry points for parameters of `dtype` whose θ* and g_prev are
    `ema_dtype` (float32, or `dtype` itself), or None when the library has none (float16
    where the compiler lacks _Float16)."""
    key = (dtype, ema_dtype)
    if key not in _functions:
        lib = _library()
        suffix = _SUFFIX[dtype] if ema_dtype == torch.float32 else _PARAM_SUFFIX[dtype]
        step = getattr(lib, f"cpu_fused_step_{suffix}", None)
        flush = getattr(lib, f"cpu_fused_flush_{suffix}", None)
        _functions[key] = (step, flush) if step is not None and flush is not None else None
    return _functions[key]


class CpuFusedDriver:
    """The fused-step driver of one CPU engine group (interface: cl_core/dema/fused.py)."""

    def __init__(self, members):
        from cl_core.dema.fused import check_tensors

        self._check = check_tensors
        self._lib = _library()
        self.members = members
        eg = members.engine_group
        self.state = s = eg.state
        self.device = torch.device("cpu")
        self.dtype = eg.dtype
        self.n = n = len(s)
        self.numels = list(s.numels)
        # θ* and g_prev: float32, or (DEMAConfig(ema_dtype="param")) bf16/fp16, which the
        # kernels read as the parameter dtype: parameters of any other dtype are refused
        # per step (prepare), never swept against buffers of another width.
        self.ema_dtype = s.ema_dtype
        self._unsupported = None
        if s.ema_dtype not in (torch.float32, *_PARAM_SUFFIX):
            self._unsupported = f"the EMA buffers are {s.ema_dtype}; the CPU fused kernels take float32, bfloat16 or float16"
        cols = max(1, n)
        self.stab = torch.zeros(L.N_STATIC, cols, dtype=torch.int64)
        self.dyn = torch.zeros(L.N_DYNAMIC, cols, dtype=torch.int64)
        # rows that never change for the life of the engine group's state (the others: _build)
        e = [v.data_ptr() for v in s.ema_views]
        self.stab[L.S_EMA, :n] = int64_table(e)
        gp = [v.data_ptr() for v in s.gprev_views] if s.gprev_views is not None else e  # never read for "fixed"
        self.stab[L.S_GRAD_PREV, :n] = int64_table(gp)
        self.stab[L.S_NUMEL, :n] = int64_table(self.numels)
        self.pend_mode = torch.zeros(n, dtype=torch.uint8)
        self.pend_stats = torch.zeros(n, L.N_DSTAT, dtype=torch.float32)
        self.pend_has_grad = torch.zeros(n, dtype=torch.uint8)
        self.pend_has_prev = torch.zeros(n, dtype=torch.uint8)
        arrays = [None] * N_CS
        arrays[CS_STARTED], arrays[CS_HAS_PREV], arrays[CS_D] = s.started, s.has_prev, s.d
        arrays[CS_ALPHA], arrays[CS_SKIPS] = s.alpha, s.skips
        arrays[CS_PEND_MODE], arrays[CS_PEND_STATS] = self.pend_mode, self.pend_stats
        arrays[CS_PEND_HAS_GRAD], arrays[CS_PEND_HAS_PREV] = self.pend_has_grad, self.pend_has_prev
        self.cs = int64_table([a.data_ptr() for a in arrays])
        self.runner = native.ShardedRunner(self.numels)
        # (parameter addresses, dtype, members object, members.version) the static table
        # describes: a new members object (optimizer state loaded) starts its own count
        self._built = None
        self._fns = None
        self._gptr = None  # gradient addresses in the dynamic table
        self._flags = None  # "all" (every tensor has a gradient) or the flag list in the dynamic table
        self._consts = None  # kernel scalars of the last step (the flush decides with them)
        self._pending = False  # a step ran since the last flush

    # ------------------------------------------------------------------ tables
    def _build(self, ptrs, dtype) -> str | None:
        """The static rows for parameters at `ptrs` of `dtype`; the optimizer state is
        checked too (the kernel reads it as `dtype`, numel elements)."""
        mem, n = self.members, self.n
        fns = _kernels(dtype, self.ema_dtype)
        if fns is None:
            return f"the native CPU fused kernels have no {dtype} entry point (compiler without _Float16)"
        for k, (m, v) in enumerate(zip(mem.exp_avg, mem.exp_avg_sq)):
            for x in (m, v):
                if x is None:
                    continue
                if x.dtype != dtype or x.device.type != "cpu" or not x.is_contiguous() or x.numel() != self.numels[k]:
                    return (f"optimizer state of tensor {k} ({x.dtype}, {x.numel()} elements on {x.device}) does not "
                            f"match its parameter ({dtype}, {self.numels[k]} elements on cpu)")
        m = [ptrs[k] if x is None else x.data_ptr() for k, x in enumerate(mem.exp_avg)]
        v = [ptrs[k] if x is None else x.data_ptr() for k, x in enumerate(mem.exp_avg_sq)]
        if n:
            self.stab[L.S_PARAM, :n] = int64_table(ptrs)
            self.stab[L.S_EXP_AVG, :n] = int64_table(m)
            self.stab[L.S_EXP_AVG_SQ, :n] = int64_table(v)
            self.stab[L.S_GROUP, :n] = int64_table(mem.param_group)
        if self._built is not None and self._built[1] != dtype:
            log.info("fused DEMA step: parameters are now %s (tables were built for %s); rebuilt", dtype, self._built[1])
        self.dtype, self._fns = dtype, fns
        self._built = (ptrs, dtype, mem, mem.version)
        return None

    # ------------------------------------------------------------------ the interface
    def prepare(self, batch) -> str | None:
        """None when this step can run fused (tables rebuilt where needed), else why not."""
        if self._unsupported is not None:
            return self._unsupported
        mem = self.members
        # the first parameter's dtype is the candidate; check_tensors checks every tensor
        dtype = mem.params[0].dtype if mem.params else self.dtype
        if dtype not in _SUFFIX:
            return f"the parameters are now {dtype}; the fused kernel takes float32, bfloat16 or float16"
        reason = self._check(mem.params, batch.grads, dtype, self.device, batch.has_all_grads, self.ema_dtype)
        if reason is not None:
            return reason
        # numel: the kernel sweeps numel elements of θ, g, m, v (a parameter given
        # smaller storage, `p.data = p.data[:k]`, must not be swept past its end)
        if list(map(_NUMEL, mem.params)) != self.numels:
            return "a parameter changed size since the optimizer was built (its EMA has the old size)"
        if batch.has_all_grads:
            if list(map(_NUMEL, batch.grads)) != self.numels:
                return "a gradient's size differs from its parameter's"
        elif any(g is not None and g.numel() != k for g, k in zip(batch.grads, self.numels)):
            return "a gradient's size differs from its parameter's"
        ptrs = list(map(_PTR, mem.params))
        built = self._built
        if built is None or built[0] != ptrs or built[1] != dtype or built[2] is not mem or built[3] != mem.version:
            return self._build(ptrs, dtype)
        return None

    def step(self, batch) -> None:
        """The fused sweep of this step (after a `prepare` that returned None)."""
        n, mem = self.n, self.members
        if n == 0:
            return
        if self._built[2] is not mem or self._built[3] != mem.version:  # optimizer state created after prepare
            reason = self._build(self._built[0], self.dtype)
            if reason is not None:
                raise RuntimeError(f"fused DEMA step: {reason}")
        grads = batch.grads
        if batch.has_all_grads:
            gptr = list(map(_PTR, grads))
        else:  # 0 for a missing gradient: never read (DF_HAS_GRAD off)
            gptr = [0 if g is None else g.data_ptr() for g in grads]
        if gptr != self._gptr:  # gradients re-created by zero_grad(set_to_none=True) often reuse addresses
            self.dyn[L.D_GRAD, :n] = int64_table(gptr)
            self._gptr = gptr
        if mem.steps is not None:
            self.dyn[L.D_STEP, :n].copy_(mem.steps)  # torch's step counts, already bumped for this step
        if batch.has_all_grads and not batch.first:
            flags = "all"
        else:
            flags = [0 if g is None else L.DF_HAS_GRAD for g in grads]
            for k in batch.first:
                flags[k] |= L.DF_FIRST
        if flags != self._flags:
            if flags == "all":
                self.dyn[L.D_FLAGS, :n].fill_(L.DF_HAS_GRAD)
            else:
                self.dyn[L.D_FLAGS, :n] = int64_table(flags)
            self._flags = flags
        hyper = batch.hyper
        if hyper.dtype != torch.float64 or hyper.dim() != 2 or hyper.shape[1] != L.N_HYPER or not hyper.is_contiguous():
            raise ValueError(f"fused DEMA step: hyper-parameters must be a contiguous float64 [groups, {L.N_HYPER}] table")
        step_fn = self._fns[0]
        args = (address(self.stab), address(self.dyn), address(hyper), address(self.cs), self.stab.shape[1],
                *batch.consts)
        kind = batch.kind
        self.runner.run(lambda count, idx: step_fn(kind, count, idx, *args))
        self._consts = batch.consts
        self._pending = True

    def _theta_addresses(self):
        """Addresses of θ as the tables assume them (dtype, contiguity, numel); converted
        temporaries where the parameters changed since the step."""
        params, n = self.members.params, self.n
        ptrs = list(map(_PTR, params))
        same = (ptrs == self._built[0] and all(p.dtype == self.dtype and p.device.type == "cpu" for p in params)
                and list(map(_NUMEL, params)) == self.numels and all(p.is_contiguous() for p in params))
        if same:
            return self.stab[L.S_PARAM], None
        try:
            tmp = [p.detach().to(device="cpu", dtype=self.dtype).contiguous() for p in params]
        except (RuntimeError, NotImplementedError) as exc:
            raise RuntimeError(
                "DEMA: the EMA update left pending by the last fused step needs the parameters' values, but they "
                f"cannot be read any more ({exc}); read the EMA (engine.flush()) before moving the parameters"
            ) from exc
        sizes = [t.numel() for t in tmp]
        if sizes != self.numels:
            k = next(i for i in range(n) if sizes[i] != self.numels[i])
            raise RuntimeError(
                f"DEMA: the EMA update left pending by the last fused step needs parameter {k}'s values, but it now "
                f"has {sizes[k]} elements (its EMA has {self.numels[k]}); read the EMA (engine.flush()) before "
                "resizing parameters"
            )
        return int64_table([t.data_ptr() for t in tmp] + [0] * (self.stab.shape[1] - n)), tmp

    def flush(self) -> None:
        """Finish the EMA update the last step left pending (reads the parameters'
        current storage, never an address the tables assumed)."""
        if not self._pending or self.n == 0:
            return
        theta, keep = self._theta_addresses()
        flush_fn = self._fns[1]
        args = (address(self.stab), address(theta), address(self.cs), self.stab.shape[1], *self._consts)
        self.runner.run(lambda count, idx: flush_fn(count, idx, *args))
        del keep  # the converted temporaries had to live through the call
        self._pending = False

    def pending_stats(self):
        """(alpha, skips) per tensor as the pending update will record them (the same C
        rule, nothing changed); None when no step is pending."""
        if not self._pending or self.n == 0:
            return None
        alpha = torch.empty(self.n, dtype=torch.float32)
        skips = torch.empty(self.n, dtype=torch.int64)
        self._lib.cpu_fused_pending(self.n, address(self.cs), address(alpha), address(skips), *self._consts)
        return alpha, skips
