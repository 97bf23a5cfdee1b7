"""Triton kernels of the DEMA update and their torch wrapper (the "triton" backend).

All tensors of one (device, dtype) group are handled by each launch: the kernels read
a table of `data_ptr()`s (int64, cast in-kernel with `.to(tl.pointer_type(...))`) and
a block table mapping each program to its tensor. So one update is three launches
whatever the number of LoRA tensors:

    stats   grid = blocks   partial a, b, c and a NaN/inf probe per block
    decide  grid = tensors  sums the partials of its tensor (and the previous step's
                            d partials), computes α on the device, updates flags
    apply   grid = blocks   θ* ← (1−α)θ* + αθ, g_prev ← g, partial d = |θ − θ*|

With a `reduce_stats` hook (sharded parameters) `decide` is split in two around it.
Nothing here reads a device value on the host. Under TRITON_INTERPRET=1 the same
kernels run on CPU tensors, which is how the tests check them.

The sweeping kernels (stats, apply) take ALIGNED (every address 16-byte aligned and
every numel a multiple of the vector width, checked on the host per update): with it
each thread's VEC elements are one 128-bit access (tests/test_triton_compile.py checks
the PTX for sm_80 and sm_90); without it the same kernels run unhinted on any layout.
"""
from __future__ import annotations

import functools
import logging
import operator

import torch
import triton
import triton.language as tl

from cl_core.dema.config import DEMAConfig
from cl_core.dema.state import GroupState
from cl_core.kernels import layouts as L

log = logging.getLogger(__name__)

# Launch shape of the sweeping kernels: VEC = 16 bytes / element size elements per
# thread (one 128-bit θ/g access; θ*, g_prev are fp32: one or two), 4 warps. Compiled,
# stats and apply use 26-53 registers per thread, no spills (tests/test_triton_compile.py):
# 10-16 blocks per SM, 62-100% occupancy on A100/H100, so registers never limit these
# one-pass kernels; BLOCK elements per program (512 fp32, 1,024 16-bit) keep a LoRA step
# at tens of thousands of programs, enough to fill any GPU.
NUM_WARPS = 4
CHUNK = 128  # partials summed per loop iteration in `decide`
DECIDE_WARPS = 1  # decide reads 4 partials x a few blocks per tensor: one warp is plenty
SWEEP_LAUNCH = {"num_warps": NUM_WARPS, "maxnreg": 128}  # the register budget ptxas may use
DECIDE_LAUNCH = {"num_warps": DECIDE_WARPS}
# decide's two halves (REDUCE, DECIDE): both at once, or split around a reduce_stats hook
DECIDE_ALL, DECIDE_REDUCE_ONLY, DECIDE_ONLY = (True, True), (True, False), (False, True)


def launch_shape(elem_size: int) -> tuple[int, int]:
    """(VEC, BLOCK) for parameters of `elem_size` bytes."""
    vec = 16 // elem_size
    return vec, vec * 32 * NUM_WARPS


@triton.jit
def alpha_rule(a, b, c, d, use_dynamic, formula, scale, fallback, beta):
    """α of docs/design.md §2 from a tensor's sums (same operation order as the reference);
    `use_dynamic` is false where the formula cannot apply (no gradient or no previous
    one). `formula` is a runtime value (FORMULA_*): a few scalar operations per program."""
    q = (1.0 + b) / (a * c)
    dyn = tl.where(formula == L.FORMULA_OFFICIAL, q * scale, q * d)
    dyn = tl.where((dyn > 0.0) & (dyn < 1.0), dyn, fallback)
    al = tl.where(use_dynamic, dyn, fallback)
    return tl.where(formula == L.FORMULA_FIXED, 1.0 - beta, al)


@triton.jit
def _bcast(flag, BLOCK: tl.constexpr):
    """A per-tensor scalar switch as a [BLOCK] mask. The interpreter rejects a scalar
    bool combined with a block mask; compiled, this folds away."""
    return (tl.zeros([BLOCK], dtype=tl.int32) + flag.to(tl.int32)) != 0


@triton.jit
def _block_of_program(blk_tensor, blk0, BLOCK: tl.constexpr):
    """(t, offsets) of this program's block."""
    pid = tl.program_id(0)
    t = tl.load(blk_tensor + pid)
    start = (pid - tl.load(blk0 + t)) * BLOCK
    return t, start + tl.arange(0, BLOCK)


@triton.jit
def _block_pointers(blk_tensor, blk0, numel, dyn_tab, e_tab, gp_tab, T, DTYPE: tl.constexpr,
                    ALIGNED: tl.constexpr, VEC: tl.constexpr, BLOCK: tl.constexpr):
    """This program's block of its tensor t: (t, offsets, numel, θ, g, has_g, θ*, g_prev
    pointers). On the ALIGNED path the addresses and sizes carry the alignment and
    contiguity the host checked, so the compiler emits 128-bit accesses."""
    t, offs = _block_of_program(blk_tensor, blk0, BLOCK)
    n = tl.load(numel + t)
    th_ptr = tl.load(dyn_tab + L.DT_PARAM * T + t).to(tl.pointer_type(DTYPE))
    g_ptr = tl.load(dyn_tab + L.DT_GRAD * T + t).to(tl.pointer_type(DTYPE))
    has_g = tl.load(dyn_tab + L.DT_HAS_GRAD * T + t) != 0
    e_ptr = tl.load(e_tab + t).to(tl.pointer_type(tl.float32))
    gp_ptr = tl.load(gp_tab + t).to(tl.pointer_type(tl.float32))
    if ALIGNED:
        th_ptr = tl.multiple_of(th_ptr, 16)
        g_ptr = tl.multiple_of(g_ptr, 16)
        e_ptr = tl.multiple_of(e_ptr, 16)
        gp_ptr = tl.multiple_of(gp_ptr, 16)
        n = tl.multiple_of(n, VEC)
        offs = tl.max_contiguous(tl.multiple_of(offs, BLOCK), BLOCK)
    return t, offs, n, th_ptr, g_ptr, has_g, e_ptr, gp_ptr


@triton.jit(do_not_specialize=["T", "need_gp"])
def _dema_stats_kernel(
    blk_tensor, blk0, numel, dyn_tab, e_tab, gp_tab, partials, T, need_gp,
    DTYPE: tl.constexpr, ALIGNED: tl.constexpr, VEC: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    t, offs, n, th_ptr, g_ptr, has_g, e_ptr, gp_ptr = _block_pointers(
        blk_tensor, blk0, numel, dyn_tab, e_tab, gp_tab, T, DTYPE, ALIGNED, VEC, BLOCK)
    mask = offs < n
    th = tl.load(th_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask & _bcast(has_g, BLOCK), other=0.0).to(tl.float32)
    e = tl.load(e_ptr + offs, mask=mask, other=0.0)
    gprev = tl.load(gp_ptr + offs, mask=mask & _bcast(need_gp != 0, BLOCK), other=0.0)
    row = partials + pid * L.N_STAT
    # x - x is NaN exactly where x is NaN or inf: a cheap finiteness probe.
    tl.store(row + L.ST_PROBE, tl.sum(th - th, axis=0) + tl.sum(g - g, axis=0))
    tl.store(row + L.ST_A, tl.sum(tl.abs(th - e), axis=0))
    tl.store(row + L.ST_B, tl.sum(tl.abs(g), axis=0))
    tl.store(row + L.ST_C, tl.where(need_gp != 0, tl.sum(tl.abs(g - gprev), axis=0), 0.0))


@triton.jit(do_not_specialize=["T", "formula", "need_gp"])
def _dema_decide_kernel(
    blk0, partials, dpart, stats, mode, started, has_prev, d, alpha, skips, dyn_tab, T,
    formula, need_gp, scale, fallback, beta,
    REDUCE: tl.constexpr, DECIDE: tl.constexpr, CHUNK: tl.constexpr,
):
    t = tl.program_id(0)
    if REDUCE:
        b_lo = tl.load(blk0 + t)
        b_hi = tl.load(blk0 + t + 1)
        rows = tl.arange(0, CHUNK)[:, None]
        cols = tl.arange(0, L.N_STAT)[None, :]
        acc = tl.zeros([CHUNK, L.N_STAT], dtype=tl.float32)
        acc_d = tl.zeros([CHUNK], dtype=tl.float32)
        for j in range(b_lo, b_hi, CHUNK):
            idx = j + rows
            acc += tl.load(partials + idx * L.N_STAT + cols, mask=(idx < b_hi) & (cols >= 0), other=0.0)
            idx1 = j + tl.arange(0, CHUNK)
            acc_d += tl.load(dpart + idx1, mask=idx1 < b_hi, other=0.0)
        s = tl.sum(acc, axis=0)
        c1 = tl.arange(0, L.N_STAT)
        probe = tl.sum(tl.where(c1 == L.ST_PROBE, s, 0.0), axis=0)
        # d of the previous update lives in its apply's partials, unless that update
        # skipped this tensor (then d keeps its value).
        d_prev = tl.where(tl.load(mode + t) != L.MODE_SKIP, tl.sum(acc_d, axis=0), tl.load(d + t))
        tl.store(d + t, d_prev)
        out = stats + t * L.N_DSTAT
        tl.store(out + L.DS_A, tl.sum(tl.where(c1 == L.ST_A, s, 0.0), axis=0))
        tl.store(out + L.DS_B, tl.sum(tl.where(c1 == L.ST_B, s, 0.0), axis=0))
        tl.store(out + L.DS_C, tl.sum(tl.where(c1 == L.ST_C, s, 0.0), axis=0))
        tl.store(out + L.DS_NONFINITE, tl.where(probe != probe, 1.0, 0.0))
        tl.store(out + L.DS_D, d_prev)
    if DECIDE:
        row = stats + t * L.N_DSTAT
        skip = tl.load(row + L.DS_NONFINITE) > 0
        st = tl.load(started + t) != 0
        hp = tl.load(has_prev + t) != 0
        hg = tl.load(dyn_tab + L.DT_HAS_GRAD * T + t) != 0
        al = alpha_rule(tl.load(row + L.DS_A), tl.load(row + L.DS_B), tl.load(row + L.DS_C), tl.load(row + L.DS_D),
                        st & hg & hp, formula, scale, fallback, beta)
        tl.store(alpha + t, tl.where(skip, 0.0, al))
        tl.store(mode + t, tl.where(skip, L.MODE_SKIP, tl.where(st, L.MODE_EMA, L.MODE_INIT)).to(tl.int8))
        tl.store(skips + t, tl.load(skips + t) + skip.to(tl.int64))
        tl.store(started + t, tl.where(skip, st, True).to(tl.uint8))
        tl.store(has_prev + t, tl.where(need_gp == 0, hp, tl.where(skip, hp, hg)).to(tl.uint8))


@triton.jit(do_not_specialize=["T", "need_gp"])
def _dema_apply_kernel(
    blk_tensor, blk0, numel, dyn_tab, e_tab, gp_tab, mode, alpha, dpart, T, need_gp,
    DTYPE: tl.constexpr, ALIGNED: tl.constexpr, VEC: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    t, offs, n, th_ptr, g_ptr, has_g, e_ptr, gp_ptr = _block_pointers(
        blk_tensor, blk0, numel, dyn_tab, e_tab, gp_tab, T, DTYPE, ALIGNED, VEC, BLOCK)
    md = tl.load(mode + t)
    upd = (offs < n) & _bcast(md != L.MODE_SKIP, BLOCK)
    al = tl.load(alpha + t)
    th = tl.load(th_ptr + offs, mask=upd, other=0.0).to(tl.float32)
    e = tl.load(e_ptr + offs, mask=upd, other=0.0)
    e_new = tl.where(_bcast(md == L.MODE_EMA, BLOCK), e * (1.0 - al) + th * al, th)
    tl.store(e_ptr + offs, e_new, mask=upd)
    tl.store(dpart + pid, tl.sum(tl.where(upd, tl.abs(th - e_new), 0.0), axis=0))
    gm = upd & _bcast(has_g & (need_gp != 0), BLOCK)
    g = tl.load(g_ptr + offs, mask=gm, other=0.0).to(tl.float32)
    tl.store(gp_ptr + offs, g, mask=gm)


_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
_PTR = torch.Tensor.data_ptr


class TritonBackend:
    """Runs one (device, dtype) group of the engine through the kernels above."""

    def __init__(self, state: GroupState, config: DEMAConfig, dtype: torch.dtype):
        if dtype not in _TL_DTYPES:
            raise ValueError(f"the triton DEMA backend supports float32/bfloat16/float16 parameters, got {dtype}")
        for buf in [state.ema_flat] + ([state.gprev_flat] if state.gprev_flat is not None else []):
            if buf.dtype != torch.float32:  # the kernels address θ* and g_prev as fp32
                raise ValueError(f"the triton DEMA backend keeps the EMA in float32, got {buf.dtype} buffers; "
                                 "use backend='torch' for an EMA in the parameter dtype")
        self.state, self.config = state, config
        s, dev = state, state.device
        self.numel = torch.tensor(s.numels, dtype=torch.int64, device=dev)
        e = [v.data_ptr() for v in s.ema_views]
        gp = [v.data_ptr() for v in s.gprev_views] if s.gprev_views is not None else e
        self.e_tab = torch.tensor(e, dtype=torch.int64, device=dev)
        self.gp_tab = torch.tensor(gp, dtype=torch.int64, device=dev)
        self._ema_addresses = e + gp
        self.dyn_tab = torch.zeros(L.N_DT, max(1, len(s)), dtype=torch.int64, device=dev)
        self.stats = torch.zeros(len(s), L.N_DSTAT, dtype=torch.float32, device=dev)
        self.mode = torch.zeros(len(s), dtype=torch.int8, device=dev)
        self._dyn_key = None
        self._aligned = False
        self.dpart = None
        self._bind(dtype)

    def _bind(self, dtype: torch.dtype) -> None:
        """Block tables for parameters of `dtype` (again when the parameters' dtype changed
        after the engine was built, e.g. model.to(torch.bfloat16))."""
        s, dev = self.state, self.state.device
        self.dtype = dtype
        self.vec, self.block = launch_shape(torch.empty(0, dtype=dtype).element_size())
        counts = [(n + self.block - 1) // self.block for n in s.numels]
        blk0 = [0]
        for c in counts:
            blk0.append(blk0[-1] + c)
        if self.dpart is not None:  # pending d partials belong to the old blocks: fold them first
            self.canonicalize()
        self.n_blocks = blk0[-1]
        self.blk_tensor = torch.tensor([t for t, c in enumerate(counts) for _ in range(c)], dtype=torch.int32, device=dev)
        self.blk0 = torch.tensor(blk0, dtype=torch.int32, device=dev)
        # θ* and g_prev views are aligned when every numel is a multiple of VEC
        self._static_aligned = (functools.reduce(operator.or_, self._ema_addresses, 0) & 15) == 0 and all(
            n % self.vec == 0 for n in s.numels)
        self.partials = torch.zeros(max(1, self.n_blocks), L.N_STAT, dtype=torch.float32, device=dev)
        self.dpart = torch.zeros(max(1, self.n_blocks), dtype=torch.float32, device=dev)
        self._dyn_key = None

    def _set_pointers(self, thetas, grads) -> None:
        th = list(map(_PTR, thetas))
        g = [th[i] if x is None else x.data_ptr() for i, x in enumerate(grads)]
        key = (th, g)
        if key != self._dyn_key:  # grads are re-created by zero_grad(set_to_none=True)
            rows = [None] * L.N_DT
            rows[L.DT_PARAM], rows[L.DT_GRAD] = th, g
            rows[L.DT_HAS_GRAD] = [0 if x is None else 1 for x in grads]
            host = torch.tensor(rows, dtype=torch.int64)
            cuda = self.dyn_tab.device.type == "cuda"
            # pinned + non_blocking: no host sync (torch's host allocator keeps the block
            # until the copy has run)
            self.dyn_tab.copy_(host.pin_memory() if cuda else host, non_blocking=cuda)
            self._dyn_key = key
            self._aligned = self._static_aligned and (functools.reduce(operator.or_, th + g, 0) & 15) == 0

    def update(self, thetas, grads, reduce_stats=None) -> None:
        s, cfg = self.state, self.config
        dtypes = {x.dtype for x in thetas}
        if len(dtypes) == 1 and self.dtype not in dtypes and next(iter(dtypes)) in _TL_DTYPES:
            log.info("triton DEMA backend: parameters are now %s (built for %s); block tables rebuilt",
                     next(iter(dtypes)), self.dtype)
            self._bind(next(iter(dtypes)))
        for x in list(thetas) + [g for g in grads if g is not None]:
            if not x.is_contiguous() or x.dtype != self.dtype or x.device != s.device:
                raise ValueError(
                    f"the triton DEMA backend was built for contiguous {self.dtype} tensors on {s.device}; got a "
                    f"{'non-contiguous ' if not x.is_contiguous() else ''}{x.dtype} tensor on {x.device}"
                )
        if len(s) == 0:
            return
        self._set_pointers(thetas, grads)
        formula, scale, fallback, beta = cfg.kernel_scalars()
        need_gp = int(s.needs_grad_prev)
        dt, n = _TL_DTYPES[self.dtype], len(s)
        sweep = dict(DTYPE=dt, ALIGNED=self._aligned, VEC=self.vec, BLOCK=self.block, **SWEEP_LAUNCH)
        if self.n_blocks:
            _dema_stats_kernel[(self.n_blocks,)](
                self.blk_tensor, self.blk0, self.numel, self.dyn_tab, self.e_tab, self.gp_tab, self.partials,
                n, need_gp, **sweep,
            )
        decide_args = (
            self.blk0, self.partials, self.dpart, self.stats, self.mode, s.started, s.has_prev, s.d,
            s.alpha, s.skips, self.dyn_tab, n, formula, need_gp, scale, fallback, beta,
        )
        halves = [DECIDE_ALL] if reduce_stats is None else [DECIDE_REDUCE_ONLY, DECIDE_ONLY]
        for k, (red, dec) in enumerate(halves):
            if k == 1:
                reduce_stats(self.stats)
            _dema_decide_kernel[(n,)](*decide_args, REDUCE=red, DECIDE=dec, CHUNK=CHUNK, **DECIDE_LAUNCH)
        if self.n_blocks:
            _dema_apply_kernel[(self.n_blocks,)](
                self.blk_tensor, self.blk0, self.numel, self.dyn_tab, self.e_tab, self.gp_tab, self.mode,
                s.alpha, self.dpart, n, need_gp, **sweep,
            )

    def canonicalize(self) -> None:
        """Fold the pending d partials into state.d (for checkpoints and reads)."""
        s = self.state
        if len(s) == 0 or self.n_blocks == 0:
            return
        sums = torch.zeros(len(s), dtype=torch.float32, device=s.device)
        sums.index_add_(0, self.blk_tensor.long(), self.dpart)
        s.d.copy_(torch.where(self.mode != L.MODE_SKIP, sums, s.d))
        self.mode.zero_()

    def state_loaded(self) -> None:
        """A checkpoint was written into the shared state: drop pending partials."""
        self.mode.zero_()
        self.dpart.zero_()


def expect_v4(vec: int, param_loads: int, fp32_loads: int, param_stores: int, fp32_stores: int) -> dict:
    """128-bit accesses per loop iteration of an ALIGNED sweep: one per stream in the
    parameter dtype (VEC elements), VEC / 4 per fp32 stream (θ*, g_prev)."""
    return {"ld_v4": param_loads + fp32_loads * vec // 4, "st_v4": param_stores + fp32_stores * vec // 4}


def compile_specs():
    """Every specialisation the launcher above can produce: (name, kernel, signature,
    constexprs, launch options, expected 128-bit accesses or None). tests/test_triton_compile.py
    compiles each for sm_80/sm_90."""
    ptr = "*i64"
    sweep_sig = dict(blk_tensor="*i32", blk0="*i32", numel="*i64", dyn_tab=ptr, e_tab=ptr, gp_tab=ptr)
    stats_sig = dict(sweep_sig, partials="*fp32", T="i32", need_gp="i32")
    apply_sig = dict(sweep_sig, mode="*i8", alpha="*fp32", dpart="*fp32", T="i32", need_gp="i32")
    decide_sig = dict(blk0="*i32", partials="*fp32", dpart="*fp32", stats="*fp32", mode="*i8", started="*u8",
                      has_prev="*u8", d="*fp32", alpha="*fp32", skips="*i64", dyn_tab=ptr, T="i32", formula="i32",
                      need_gp="i32", scale="fp32", fallback="fp32", beta="fp32")
    specs = []
    for dtype, tdt in _TL_DTYPES.items():
        vec, block = launch_shape(torch.empty(0, dtype=dtype).element_size())
        name = str(dtype).replace("torch.", "")
        for aligned in (True, False):
            tag = "aligned" if aligned else "general"
            ce = dict(DTYPE=tdt, ALIGNED=aligned, VEC=vec, BLOCK=block)
            # stats reads θ, g, θ*, g_prev; apply reads θ, g, θ* and writes θ*, g_prev
            specs.append((f"dema_stats/{name}/{tag}", _dema_stats_kernel, stats_sig, ce, SWEEP_LAUNCH,
                          expect_v4(vec, 2, 2, 0, 0) if aligned else None))
            specs.append((f"dema_apply/{name}/{tag}", _dema_apply_kernel, apply_sig, ce, SWEEP_LAUNCH,
                          expect_v4(vec, 2, 1, 0, 2) if aligned else None))
    for red, dec in (DECIDE_ALL, DECIDE_REDUCE_ONLY, DECIDE_ONLY):
        specs.append((f"dema_decide/reduce={int(red)}/decide={int(dec)}", _dema_decide_kernel, decide_sig,
                      dict(REDUCE=red, DECIDE=dec, CHUNK=CHUNK), DECIDE_LAUNCH, None))
    return specs
