"""CPU half of the one-pass optimizer+DEMA step: the driver of one CPU engine group.

`cl_core.dema.onepass.step.FusedStep` drives a `CpuFusedDriver` through the FusedDriver protocol
(cl_core/dema/onepass/protocols.py) (prepare / step / flush / pending_stats); triton_driver.py is its twin on
CUDA. The driver builds and owns the tables of the native kernels (their layout and the
calls: cl_core/kernels/cpu_fused.py) and points them at the engine's GroupState, which
the kernels update in place.

The tables (static, dynamic, hyper and the per-tensor state addresses CS_*) are described
where the kernels read them: cl_core/kernels/cpu_fused.py's docstring.

Memory safety: every step `prepare` checks (dtype, device, contiguity, numel of
parameters and gradients, parameter addresses) against what the tables were built for,
so a model moved to another dtype or given new storage after the optimizer was built
is rebuilt for or sent to the generic path, never swept as the old layout.
"""
from __future__ import annotations

import functools
import logging

import torch

from cl_core.dema.onepass.protocols import check_tensors
from cl_core.kernels import cpu_fused as K
from cl_core.kernels import layouts as L
from cl_core.kernels import native
from cl_core.kernels.native import int64_table

log = logging.getLogger(__name__)

_PTR = torch.Tensor.data_ptr
_NUMEL = torch.Tensor.numel


class CpuFusedDriver:
    """The fused-step driver of one CPU engine group (the FusedDriver protocol of
    cl_core/dema/onepass/protocols.py)."""

    def __init__(self, members):
        K.library()  # built and its layout checked before any table points into it
        self.members = members
        self.state = s = members.state
        self.device = torch.device("cpu")
        self.dtype = members.dtype
        self.n = n = len(s)
        self.numels = list(s.numels)
        # θ* and g_prev: float32, or (DEMAConfig(ema_dtype="param")) bf16/fp16, which the
        # kernels read as the parameter dtype: parameters of any other dtype are refused
        # per step (prepare), never swept against buffers of another width.
        self.ema_dtype = s.ema_dtype
        self._unsupported = None
        if s.ema_dtype not in (torch.float32, *K.EMA_PARAM_DTYPES):
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
        arrays = [None] * K.N_CS
        arrays[K.CS_STARTED], arrays[K.CS_HAS_PREV], arrays[K.CS_D] = s.started, s.has_prev, s.d
        arrays[K.CS_ALPHA], arrays[K.CS_SKIPS] = s.alpha, s.skips
        arrays[K.CS_PEND_MODE], arrays[K.CS_PEND_STATS] = self.pend_mode, self.pend_stats
        arrays[K.CS_PEND_HAS_GRAD], arrays[K.CS_PEND_HAS_PREV] = self.pend_has_grad, self.pend_has_prev
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
        fns = K.kernels(dtype, self.ema_dtype)
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
        if dtype not in K.PARAM_DTYPES:
            return f"the parameters are now {dtype}; the fused kernel takes float32, bfloat16 or float16"
        reason = check_tensors(mem.params, batch.grads, dtype, self.device, batch.has_all_grads, self.ema_dtype)
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
        K.step(self._fns, self.runner, batch.kind, self.stab, self.dyn, batch.hyper, self.cs, *batch.consts)
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
        K.flush(self._fns, self.runner, self.stab, theta, self.cs, *self._consts)
        del keep  # the converted temporaries had to live through the call
        self._pending = False

    def pending_stats(self):
        """(alpha, skips) per tensor as the pending update will record them (the same C
        rule, nothing changed); None when no step is pending."""
        if not self._pending or self.n == 0:
            return None
        alpha = torch.empty(self.n, dtype=torch.float32)
        skips = torch.empty(self.n, dtype=torch.int64)
        K.pending(self.n, self.cs, alpha, skips, *self._consts, dtype=self.ema_dtype, ema_dtype=self.ema_dtype)
        return alpha, skips

    def pending_inputs(self):
        """(tag, fields, convert) of the pending decision (the FusedDriver protocol)."""
        if not self._pending or self.n == 0:
            return None
        fields = (self.pend_stats, self.pend_mode, self.pend_has_grad, self.pend_has_prev, self.state.alpha)
        return "fused-cpu", fields, functools.partial(regime_inputs, fixed=self._consts[0] == L.FORMULA_FIXED)


def regime_inputs(stats, mode, has_grad, has_prev, alpha, fixed: bool):
    """classify's (stats, use) from batched pending state of the CPU fused kernels. Only a
    started tensor leaves an update pending (its statistics in pend_stats); one that started
    in the step's sweep has α its start value, or 0 when NaN/inf skipped it."""
    pend = mode == L.PEND_EMA
    stats = stats.clone()
    stats[..., L.DS_NONFINITE] = torch.where(pend, stats[..., L.DS_NONFINITE], (alpha == 0).float())
    if not fixed:
        pend = pend & (has_grad != 0) & (has_prev != 0)
    return stats, pend
