"""CUDA half of the one-pass optimizer+DEMA step: the driver of one (device, dtype) engine
group on the Triton kernels of cl_core/kernels/triton_fused.py (one launch per step; see
that module for the maths and the double-buffered flags).

`cl_core.dema.onepass.step.FusedStep` drives a `TritonFusedDriver` through the FusedDriver
protocol (cl_core/dema/onepass/protocols.py); cpu_driver.py is its twin on CPU. The driver owns the tables
(a static per-tensor table: addresses of θ, the optimizer state, θ*, g_prev; numel;
param group; first tile, built when the group's tensors change; a dynamic table:
gradient address, step count, flags, uploaded once per step in one copy with the
hyper-parameter rows) and the partials, per-tensor totals, tickets and flags the kernels
exchange between steps. Every pointer it passes is 16-byte aligned (the halves of the
double-buffered tables are padded, the hyper rows start on a 16-byte boundary of the upload),
as the compiled specialisations assume (tests/kernels/test_triton_alignment.py). The
engine's GroupState (started, has_prev, d) is written by `flush`, `alpha` and `skips` by
every step.

Every call that launches or touches these buffers runs under the group's device, refuses
CUDA-graph capture and orders its stream after the one that last used them; CUDA tensors
with the kernels interpreted (TRITON_INTERPRET=1) are refused (cl_core/dema/cuda_launch.py).
The flush sums the per-tile partials per tensor with the reducing half of the DEMA
backend's `decide` kernel (what its `canonicalize` runs): one program per sum, a fixed
order, so the canonical d is the same bits on every run (no float atomics).
"""
from __future__ import annotations

import functools
import logging
import operator

import torch

from cl_core.dema.cuda_launch import LaunchGuard, refuse_interpreter_on_cuda
from cl_core.dema.onepass.protocols import check_tensors
from cl_core.dema.state import round_sum
from cl_core.kernels import layouts as L
from cl_core.kernels import triton_dema as KD
from cl_core.kernels import triton_fused as K

log = logging.getLogger(__name__)

_PTR = torch.Tensor.data_ptr
_DTYPE = operator.attrgetter("dtype")


def _or_all(values) -> int:
    return functools.reduce(operator.or_, values, 0)


def _aligned_halves(shape, dtype, device) -> torch.Tensor:
    """A zeroed [2, *shape] table whose two halves each start 16-byte aligned: a view of
    [2, padded] storage (a plain [2, *shape] puts half [1] at 4·prod(shape) bytes, e.g.
    not aligned for the flags of an odd tensor count)."""
    k = 1
    for x in shape:
        k *= x
    pad = L.aligned_count(k, torch.empty(0, dtype=dtype).element_size())
    return torch.zeros(2, pad, dtype=dtype, device=device)[:, :k].view(2, *shape)


class TritonFusedDriver:
    """The fused group of one (device, dtype) engine group on the Triton kernels (the
    FusedDriver protocol of cl_core/dema/onepass/protocols.py)."""

    def __init__(self, members):
        self.members = members
        self.state, self.device, self.dtype = members.state, members.device, members.dtype
        s, dev, n = members.state, members.device, len(members.state)
        refuse_interpreter_on_cuda(dev, K._fused_step_kernel, "the fused DEMA step")
        self.n = n
        self.guard = LaunchGuard(dev, self._buffers, "the fused DEMA step")
        with self.guard("building its tables"):
            self._build()

    def _buffers(self):
        """The tensors kept between calls: the tables, partials, totals, tickets, flags and the group's state."""
        s = self.state
        return [self.tile_tensor, self.stab, self.part, self.tot, self.ticket, self.flags, self.dcarry, self.upload,
                self.fold_blk0, self.fold_mode, s.ema_flat, s.gprev_flat, s.started, s.has_prev, s.d, s.alpha, s.skips]

    def _build(self) -> None:
        s, dev, n = self.state, self.device, self.n
        tile = K.TILE  # read at build time: the tests shrink it to get several tiles per tensor
        tile0 = [0]
        for k in s.numels:
            tile0.append(tile0[-1] + (k + tile - 1) // tile)
        self.n_tiles = tile0[-1]
        self.tile0 = tile0[:-1]
        self.tile_tensor = torch.tensor([t for t, k in enumerate(s.numels) for _ in range((k + tile - 1) // tile)],
                                        dtype=torch.int32, device=dev)
        self.stab = torch.zeros(L.N_STATIC, max(1, n), dtype=torch.int64, device=dev)
        # float64 partials and totals for an EMA in the parameter dtype: its norms are
        # exact sums rounded once (kernels/triton_dema.py round_sum)
        part_dtype = torch.float32 if s.ema_dtype == torch.float32 else torch.float64
        self.part = torch.zeros(2, max(1, self.n_tiles), L.N_PART, dtype=part_dtype, device=dev)
        # per-tensor totals of a step's partials, by parity (written by the tensor's last
        # program, read by the next launch), and the tickets that find that program
        self.tot = torch.zeros(2, max(1, n), L.N_PART, dtype=part_dtype, device=dev)
        self.ticket = torch.zeros(max(1, n), dtype=torch.int32, device=dev)
        # halves [1] of the double-buffered tables start 16-byte aligned at any tensor
        # count (the compiled kernels assume every pointer argument is): each half padded
        self.flags = _aligned_halves((L.N_FLAGS, max(1, n)), torch.int32, dev)
        self.dcarry = _aligned_halves((max(1, n),), torch.float32, dev)
        # The flush's fold (see `_fold`): 2n sums, the first n over one column of tiles,
        # the next n over a second column laid after it; mode != MODE_SKIP: d is the sum.
        self.fold_blk0 = torch.tensor(self.tile0 + [t + self.n_tiles for t in self.tile0] + [2 * self.n_tiles],
                                      dtype=torch.int32, device=dev)
        self.fold_mode = torch.full((max(1, 2 * n),), L.MODE_EMA, dtype=torch.int8, device=dev)
        self.upload = None  # device copy of this step's dynamic table + hyper rows (one H2D copy)
        self.parity = 0
        self._dirty = True  # the canonical state is newer than the flags
        # (param addresses, dtype, members object, members.version) the static table
        # describes: a new members object (optimizer state loaded) restarts its version
        self._built = None
        self._static_aligned = False
        self._pending = False  # a step ran since the last flush
        self.unaligned_steps = 0  # steps that took the general (unaligned) kernel
        # θ* and g_prev in fp32, or (DEMAConfig(ema_dtype="param")) in the parameters'
        # 16-bit dtype: then the kernels run with EMA_IN_PARAM_DTYPE, and only for
        # parameters of exactly that dtype (prepare() refuses any other).
        self.ema_dtype = s.ema_dtype
        self.ema_in_param_dtype = s.ema_dtype != torch.float32

    # ------------------------------------------------------------------ tables
    def _build_static(self, ptrs, dtype) -> str | None:
        """The per-tensor static table for parameters at `ptrs` of `dtype` (on a rebuild
        the optimizer state is checked too: the kernel reads it as `dtype`)."""
        mem, s, dev = self.members, self.state, self.device
        for x in list(mem.exp_avg) + list(mem.exp_avg_sq):
            if x is not None and (x.dtype != dtype or x.device != dev or not x.is_contiguous()):
                return f"optimizer state of dtype {x.dtype} on {x.device} does not match the parameters ({dtype} on {dev})"
        for k, (x, p) in enumerate(zip(mem.exp_avg, mem.params)):
            if x is not None and x.numel() != p.numel():
                return f"optimizer state of tensor {k} has {x.numel()} elements, its parameter {p.numel()}"
        m = [ptrs[k] if x is None else x.data_ptr() for k, x in enumerate(mem.exp_avg)]
        v = [ptrs[k] if x is None else x.data_ptr() for k, x in enumerate(mem.exp_avg_sq)]
        e = [x.data_ptr() for x in s.ema_views]
        gp = [x.data_ptr() for x in s.gprev_views] if s.gprev_views is not None else e
        rows = [None] * L.N_STATIC
        rows[L.S_PARAM], rows[L.S_EXP_AVG], rows[L.S_EXP_AVG_SQ] = ptrs, m, v
        rows[L.S_EMA], rows[L.S_GRAD_PREV] = e, gp
        rows[L.S_NUMEL], rows[L.S_GROUP], rows[L.S_TILE0] = s.numels, mem.param_group, self.tile0
        self.stab.copy_(torch.tensor(rows, dtype=torch.int64))
        vec = 16 // torch.empty(0, dtype=dtype).element_size()
        # 128-bit accesses need 16-byte aligned addresses and numels that are a multiple
        # of the vector width (then the views of θ*, g_prev, fp32 or 16-bit, are aligned too).
        self._static_aligned = (_or_all(ptrs + m + v + e + gp) & 15) == 0 and all(k % vec == 0 for k in s.numels)
        self.dtype = dtype
        self._built = (ptrs, dtype, mem, mem.version)
        return None

    # ------------------------------------------------------------------ the interface
    def prepare(self, batch) -> str | None:
        with self.guard("optimizer.step()"):  # refuses a captured step before anything changes
            return self._prepare(batch)

    def _prepare(self, batch) -> str | None:
        mem = self.members
        dtypes = set(map(_DTYPE, mem.params))
        if len(dtypes) != 1 or next(iter(dtypes)) not in K.DTYPES:
            return f"the parameters of one group have dtypes {sorted(map(str, dtypes))}; the fused kernel needs one of float32/bfloat16/float16"
        dtype = next(iter(dtypes))
        reason = check_tensors(mem.params, batch.grads, dtype, self.device, batch.has_all_grads, self.ema_dtype)
        if reason is not None:
            return reason
        # The tiles were laid out for these element counts: a parameter or gradient given
        # other storage of another size (p.data = x[:k]) must never be swept past its end.
        numels = self.state.numels
        if list(map(torch.Tensor.numel, mem.params)) != numels or any(
                g is not None and g.numel() != n for g, n in zip(batch.grads, numels)):
            return "a parameter or gradient no longer has the element count the tables were built for"
        ptrs = list(map(_PTR, mem.params))
        if (self._built is None or self._built[0] != ptrs or self._built[1] != dtype or self._built[2] is not mem
                or self._built[3] != mem.version):
            if self._built is not None and self._built[1] != dtype:
                log.info("fused DEMA step: parameters are now %s (tables were built for %s); rebuilt", dtype, self._built[1])
            return self._build_static(ptrs, dtype)
        return None

    def step(self, batch) -> None:
        with self.guard("optimizer.step()"):
            self._step(batch)

    def _step(self, batch) -> None:
        s, mem, n = self.state, self.members, self.n
        if n == 0:
            return
        if self._built is None or self._built[2] is not mem or self._built[3] != mem.version:  # new optimizer state
            reason = self._build_static(list(map(_PTR, mem.params)), self.dtype)
            if reason is not None:
                raise RuntimeError(f"fused DEMA step: {reason}")
        if self._dirty:
            self._from_canonical()
        grads = batch.grads
        ptrs = self._built[0]
        if batch.has_all_grads:
            gptr = list(map(_PTR, grads))
        else:  # θ's address for a missing gradient: valid, never read (DF_HAS_GRAD off)
            gptr = [ptrs[k] if g is None else g.data_ptr() for k, g in enumerate(grads)]
        aligned = self._static_aligned and (_or_all(gptr) & 15) == 0
        if not aligned:
            self.unaligned_steps += 1
        # One staging buffer, one host-to-device copy: the dynamic table then the hyper
        # rows (float64 bits). Fresh pinned memory per step: torch's host allocator reuses
        # a block only after the copy that read it has finished.
        n_hyper = batch.hyper.numel()
        cuda = self.device.type == "cuda"
        n_dyn = L.aligned_count(L.N_DYNAMIC * n, 8)  # the hyper rows start 16-byte aligned
        staging = torch.zeros(n_dyn + n_hyper, dtype=torch.int64, pin_memory=cuda)
        st = staging.numpy()
        st[L.D_GRAD * n:(L.D_GRAD + 1) * n] = gptr
        if mem.steps is not None:
            st[L.D_STEP * n:(L.D_STEP + 1) * n] = mem.steps.numpy()
        else:
            st[L.D_STEP * n:(L.D_STEP + 1) * n] = 0
        fl = st[L.D_FLAGS * n:(L.D_FLAGS + 1) * n]
        if batch.has_all_grads:
            fl[:] = L.DF_HAS_GRAD
        else:
            fl[:] = [0 if g is None else L.DF_HAS_GRAD for g in grads]
        for k in batch.first:
            fl[k] |= L.DF_FIRST
        st[n_dyn:].view("float64")[:] = batch.hyper.numpy().reshape(-1)
        if self.upload is None or self.upload.numel() != staging.numel():
            self.upload = torch.empty(staging.numel(), dtype=torch.int64, device=self.device)
        self.upload.copy_(staging, non_blocking=cuda)
        dyn = self.upload[: L.N_DYNAMIC * n]
        hyper = self.upload[n_dyn:].view(torch.float64)
        w, r = self.parity, 1 - self.parity
        K.step(self.n_tiles, self.tile_tensor, self.stab, dyn, hyper, self.tot[r], self.part[w], self.tot[w],
               self.ticket, self.flags[r], self.flags[w], self.dcarry[r], self.dcarry[w], s.alpha, s.skips, n,
               *batch.consts, dtype=self.dtype, kind=batch.kind, aligned=aligned,
               ema_in_param_dtype=self.ema_in_param_dtype)
        self.parity = r
        self._consts = batch.consts
        self._pending = True

    def _from_canonical(self) -> None:
        s, r = self.state, 1 - self.parity
        self.flags[r].zero_()
        self.flags[r, L.F_STARTED, : self.n].copy_(s.started)
        self.flags[r, L.F_HAS_PREV, : self.n].copy_(s.has_prev)
        self.dcarry[r, : self.n].copy_(s.d)
        self._dirty = False

    def _theta_table(self):
        """Addresses of θ for the flush, as the tables assumed (dtype, device,
        contiguity); temporary converted copies where the parameters changed since."""
        mem = self.members
        ptrs = list(map(_PTR, mem.params))
        if ptrs == self._built[0] and all(p.dtype == self.dtype and p.device == self.device for p in mem.params):
            return self.stab[L.S_PARAM], None
        try:
            tmp = [p.detach().to(device=self.device, dtype=self.dtype).contiguous() for p in mem.params]
        except (RuntimeError, NotImplementedError) as exc:
            raise RuntimeError(
                "DEMA: the EMA update left pending by the last fused step needs the parameters' values, "
                f"but they cannot be read on {self.device} any more ({exc}); read the EMA (engine.flush()) "
                "before moving the parameters"
            ) from exc
        return torch.tensor([t.data_ptr() for t in tmp], dtype=torch.int64, device=self.device), tmp

    def flush(self) -> None:
        """Finish the pending EMA update and write the engine's canonical state (entered
        at every EMA read, so the read is ordered after the last step's stream)."""
        with self.guard("an EMA read (flush)"):
            self._flush()

    def _fold(self, w: int, r: int):
        """Per tensor, from the partials: (finite, d_flush, d_prev): the NaN/inf probe of
        the pending step (column P_B of part[r]), and d summed over the flush's tiles
        (P_D of part[w]) and over the last step's (P_D of part[r]), rounded to the EMA
        dtype. One launch of the reducing half of triton_dema's decide kernel over 2n
        sums (the one `canonicalize` of the DEMA backend runs): each sum is one
        program's, in a fixed order, so every run gives the same bits (index_add_ would
        use float atomics on CUDA)."""
        s, n, nt = self.state, self.n, self.n_tiles
        dev = self.device
        partials = torch.zeros(2 * nt, L.N_STAT, dtype=self.part.dtype, device=dev)
        partials[:nt, L.ST_PROBE] = self.part[r, :nt, L.P_B]
        dpart = torch.cat([self.part[w, :nt, L.P_D], self.part[r, :nt, L.P_D]])
        stats = torch.empty(2 * n, L.N_DSTAT, dtype=torch.float32, device=dev)
        d = torch.empty(2 * n, dtype=torch.float32, device=dev)
        # started/has_prev/alpha/skips/the table are only read by the deciding half, not run here
        KD.dema_decide(self.fold_blk0, partials, dpart, stats, self.fold_mode, s.started, s.has_prev, d, s.alpha,
                       s.skips, self.stab, 2 * n, 0, *self._consts, *KD.DECIDE_REDUCE_ONLY, ema_dtype=self.ema_dtype)
        return stats[:n, L.DS_NONFINITE] == 0, d[:n], d[n:]

    def _flush(self) -> None:
        s, n = self.state, self.n
        if n == 0 or self._dirty or not self._pending or self.n_tiles == 0:
            return
        theta, keep = self._theta_table()
        w, r = self.parity, 1 - self.parity
        aligned = self._static_aligned and keep is None
        self.part[w].zero_()
        K.flush(self.n_tiles, self.tile_tensor, self.stab, theta, self.tot[r], self.part[w], self.flags[r],
                self.dcarry[r], s.alpha, s.skips, n, *self._consts, dtype=self.dtype, aligned=aligned,
                ema_in_param_dtype=self.ema_in_param_dtype)
        del keep  # the temporaries live until the launch is queued (stream order keeps them valid)
        # Canonical per-tensor state from the flags the last step wrote (torch ops, no sync).
        fr = self.flags[r, :, :n]
        pend = fr[L.F_PEND]
        # the norm d is a number of the EMA dtype, as in the kernels (the fold rounds it)
        finite, d_flush, d_prev = self._fold(w, r)
        started = (fr[L.F_STARTED] != 0) | ((pend == L.PEND_INIT) & finite)
        d_in = torch.where(fr[L.F_APPLIED] != 0, d_prev, self.dcarry[r, :n])
        applied_now = (pend == L.PEND_EMA) & finite
        # right after an init d_in is the init's d (0 for an fp32 EMA); an init that saw
        # NaN/inf did not start: d stays 0
        d = torch.where(applied_now, d_flush, torch.where((pend == L.PEND_INIT) & ~finite, 0.0, d_in))
        s.started.copy_(started.to(torch.uint8))
        s.has_prev.copy_(fr[L.F_HAS_PREV].to(torch.uint8))
        s.d.copy_(d)
        self._dirty = True
        self._pending = False

    def pending_stats(self):
        """(alpha, skips) of the pending step, decided on the device (one small launch
        over the tensors, no host sync, the EMA untouched); None when nothing is pending."""
        with self.guard("a read of the stats"):
            return self._pending_stats()

    def _pending_stats(self):
        s, n = self.state, self.n
        if n == 0 or self._dirty or not self._pending or self.n_tiles == 0:
            return None
        r = 1 - self.parity
        alpha = torch.empty_like(s.alpha)
        skips = torch.empty_like(s.skips)
        K.pending(self.tot[r], self.flags[r], self.dcarry[r], s.alpha, s.skips, alpha, skips, n, *self._consts,
                  ema_dtype=self.ema_dtype)
        return alpha, skips

    def pending_inputs(self):
        """(tag, fields, convert) of the pending decision (the FusedDriver protocol): the
        totals and flags the kernels' `_pending` reads, copied as they are (three copies)."""
        n = self.n
        if n == 0 or self._dirty or not self._pending or self.n_tiles == 0:
            return None
        r = 1 - self.parity
        fields = (self.tot[r, :n], self.flags[r, :, :n], self.dcarry[r, :n])
        return "fused-triton", fields, functools.partial(regime_inputs, ema_dtype=self.ema_dtype,
                                                         fixed=self._consts[0] == L.FORMULA_FIXED)


def regime_inputs(tot, flags, dcarry, ema_dtype: torch.dtype, fixed: bool):
    """classify's (stats, use) from batched pending totals and flags, as triton_fused's
    `_pending` forms its decision: norms rounded once to a 16-bit EMA dtype, d carried
    unless the last launch applied an update, the NaN/inf probe in column P_B."""
    rs = (lambda x: x.float()) if ema_dtype == torch.float32 else (lambda x: round_sum(x, ema_dtype))
    a, b, c, d_sum = (rs(tot[..., k]) for k in (L.P_A, L.P_B, L.P_C, L.P_D))
    d_in = torch.where(flags[..., L.F_APPLIED, :] != 0, d_sum, dcarry)
    pend = flags[..., L.F_PEND, :]
    nonfinite = (pend != L.PEND_NONE) & (b != b)  # P_B carries the NaN/inf probe
    use = pend == L.PEND_EMA
    if not fixed:
        use = use & (flags[..., L.F_PEND_HAS_GRAD, :] != 0) & (flags[..., L.F_PEND_HAS_PREV, :] != 0)
    return torch.stack([a, b, c, nonfinite.float(), d_in], -1), use
