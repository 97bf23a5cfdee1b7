"""Triton kernels of the one-pass optimizer step + DEMA (one launch per step), and the
fused group that launches them for one (device, dtype) group of a DEMA engine.

Each program sweeps one tile (TILE elements) of one tensor. Per element it finishes the
previous step's EMA update, applies Adam/AdamW/SGD exactly as torch orders the maths,
and accumulates this step's statistics (a, b with the NaN/inf probe folded in, c) and
d for the tile.

Per-tensor decisions need the whole tensor's statistics, which the previous launch left
as per-tile partials: every program of a tensor sums them itself (a few dozen loads),
so no second launch is needed. Per-tensor flags are double-buffered by step parity
(read [r], written [w] by the tensor's first tile), so no program reads what another
program of the same launch writes (tests/test_program_order.py runs the programs in
shuffled order). The engine's canonical state (started, has_prev, d, alpha, skips) is
written by `flush` (only when the EMA is read); `alpha` and `skips` are kept current by
every step.

Tables (names in kernels/layouts.py): a static per-tensor table (addresses of θ, the
optimizer state, θ*, g_prev; numel; param group; first tile), built when the group's
tensors change, never per step; a dynamic per-tensor table (gradient address, step
count, flags) uploaded once per step in one copy; one hyper-parameter row per optimizer
param group.

θ* and g_prev are float32, or with DEMAConfig(ema_dtype="param") on 16-bit parameters
the parameters' dtype (EMA_IN_PARAM_DTYPE): then every difference, product, sum and norm
of the EMA maths is rounded to that dtype as the reference (cl_core/dema/reference.py)
and the native CPU kernel (cl_core/kernels/csrc/dema_cpu.c, DEFINE_PARAM_FN) do (tests/test_triton_fused_param.py);
8 B per element and step less traffic (θ*, g_prev read and written in 2 B, not 4).

Machine code (checked by tests/test_triton_compile.py for sm_80 and sm_90 from the PTX
and `ptxas -v`): with ALIGNED (every address 16-byte aligned, every numel a multiple of
the vector width, decided on the host per step) all θ, g, m, v, θ*, g_prev accesses are
128-bit; otherwise the same kernel without the hints (scalar accesses, any numel).
"""
from __future__ import annotations

import functools
import logging
import operator
import os

import torch
import triton
import triton.language as tl

from cl_core.kernels import layouts as L
from cl_core.kernels.triton_dema import _bcast, alpha_rule, expect_v4, round_to, to_f32, to_rtne

log = logging.getLogger(__name__)

# Launch shape. Each thread owns VEC contiguous elements per iteration: VEC = 16 bytes /
# element size, so a thread's θ, g, m, v access is one 128-bit load/store (θ*, g_prev:
# one or two in fp32, one in the parameter dtype). 4 warps x 32 threads x VEC = BLOCK. Why 4 warps: the registers per
# thread do not depend on the warp count, and small blocks fill the SMs evenly over the
# ~1,250 tiles of a LoRA-7B step. Compiled (tests/test_triton_compile.py, bench/README.md),
# the step kernel uses 80-90 registers per thread for fp32 and 107-128 for 16-bit
# parameters (8 elements per thread), no spills: 5-6 (fp32) or 4 (16-bit) blocks per SM,
# 25-38% occupancy on A100/H100. Enough for a streaming kernel: each thread has 6
# independent 128-bit loads in flight per iteration, >= 16 warps x 32 x 96 B ≈ 48 KB per
# SM, above the ≈ 18 KB per SM that HBM3 bandwidth x latency (3.35 TB/s x ~700 ns / 132
# SMs) asks for.
NUM_WARPS = 4
# ptxas's own heuristic targets ~80 registers on sm_80 and spills a few bytes to get
# there (seen on the general path); telling it the real budget keeps every
# specialisation spill-free at <= 128 (tests/test_triton_compile.py).
MAX_REGISTERS = 128
# FMA contraction off, stated (not left to Triton's default, announced to change): with
# IEEE sqrt and division below, compiled code rounds each operation as the interpreter,
# the reference and torch's CPU AdamW do.
LAUNCH = {"num_warps": NUM_WARPS, "maxnreg": MAX_REGISTERS, "enable_fp_fusion": False}
PENDING_LAUNCH = {"num_warps": 1, "enable_fp_fusion": False}  # one tensor per program, a few dozen partials
TILE = 16384  # elements per program: few partials per tensor, ~1,250 programs per LoRA-7B step
CHUNK = 64  # partial rows summed per iteration in the pending decision
# a block-shape width must be a tl.constexpr for Triton < 3.8 (see triton_dema.N_STAT)
N_PART: tl.constexpr = tl.constexpr(L.N_PART)


def launch_shape(elem_size: int, aligned: bool) -> tuple[int, int, int]:
    """(VEC, BLOCK, ITERS) for parameters of `elem_size` bytes. The general (unaligned)
    path accesses memory element by element anyway, so it keeps 4 elements per thread:
    8 would cost 16-bit parameters > 128 registers there for nothing."""
    vec = 16 // elem_size if aligned else 4
    block = vec * 32 * NUM_WARPS
    return vec, block, TILE // block


@triton.jit
def _vsum(x, BLOCK: tl.constexpr, VEC: tl.constexpr):
    """Sum each thread's VEC elements in registers: accumulators of BLOCK // VEC lanes
    (one register per thread) instead of BLOCK (VEC registers): fewer live registers."""
    return tl.sum(tl.reshape(x, (BLOCK // VEC, VEC)), axis=1)


@triton.jit
def _tile_sums(part, t0, t1, CHUNK: tl.constexpr):
    """Column sums of rows t0..t1 of a [tiles, N_PART] partials table: (a, b, c, d)."""
    rows = tl.arange(0, CHUNK)[:, None]
    cols = tl.arange(0, N_PART)[None, :]
    acc = tl.zeros([CHUNK, N_PART], dtype=tl.float32)
    for j in range(t0, t1, CHUNK):
        idx = j + rows
        acc += tl.load(part + idx * L.N_PART + cols, mask=(idx < t1) & (cols >= 0), other=0.0)
    s = tl.sum(acc, axis=0)
    c1 = tl.arange(0, N_PART)
    a = tl.sum(tl.where(c1 == L.P_A, s, 0.0), axis=0)
    b = tl.sum(tl.where(c1 == L.P_B, s, 0.0), axis=0)
    c = tl.sum(tl.where(c1 == L.P_C, s, 0.0), axis=0)
    d = tl.sum(tl.where(c1 == L.P_D, s, 0.0), axis=0)
    return a, b, c, d


@triton.jit
def _tiles_of(stab, t, T, n_tiles):
    """(t0, t1): the tile range of tensor t (tiles of a tensor are consecutive)."""
    t0 = tl.load(stab + L.S_TILE0 * T + t).to(tl.int32)
    last = t + 1 >= T
    t1 = tl.where(last, n_tiles, tl.load(stab + L.S_TILE0 * T + t + 1, mask=last == 0, other=0).to(tl.int32))
    return t0, t1


@triton.jit
def _tile_of_program(tile_tensor, stab, T, n_tiles, TILE: tl.constexpr):
    """(t, t0, t1, start): this program's tensor, its tile range and the tile's element
    offset, in int64: (pid − t0)·TILE wraps in int32 at 2^31 elements. The callers
    advance their pointers by it once, so per-element offsets stay 32-bit."""
    pid = tl.program_id(0)
    t = tl.load(tile_tensor + pid)
    t0, t1 = _tiles_of(stab, t, T, n_tiles)
    return t, t0, t1, (pid - t0).to(tl.int64) * TILE


@triton.jit
def _pending(part_r, flags_r, dcarry_r, t, t0, t1, T, formula, scale, fallback, beta, CHUNK: tl.constexpr,
             EMA_DTYPE: tl.constexpr):
    """The decision on the EMA update the previous launch left pending for tensor t:
    (apply, alpha, skip, d_in, pend). With the EMA in a 16-bit EMA_DTYPE each norm is
    the fp32 total rounded to it (the reference's `l1(x).to(dtype)`; round_to is a no-op
    for fp32); d carried from an earlier step (dcarry) was rounded when it was summed."""
    pend = tl.load(flags_r + L.F_PEND * T + t)
    a, b, c, d_sum = _tile_sums(part_r, t0, t1, CHUNK)
    a = round_to(a, EMA_DTYPE)
    b = round_to(b, EMA_DTYPE)  # NaN (the probe) stays NaN
    c = round_to(c, EMA_DTYPE)
    d_sum = round_to(d_sum, EMA_DTYPE)
    d_in = tl.where(tl.load(flags_r + L.F_APPLIED * T + t) != 0, d_sum, tl.load(dcarry_r + t))
    finite = b == b  # P_B carries the NaN/inf probe
    skip = (pend != L.PEND_NONE) & (finite == 0)
    use = (tl.load(flags_r + L.F_PEND_HAS_GRAD * T + t) != 0) & (tl.load(flags_r + L.F_PEND_HAS_PREV * T + t) != 0)
    al = alpha_rule(a, b, c, d_in, use, formula, scale, fallback, beta)
    apply = (pend == L.PEND_EMA) & finite
    return apply, al, skip, d_in, pend


@triton.jit
def _record_decision(alpha, skips, t, apply, al, skip, pend, formula, fallback, beta):
    """Canonical α (0 when skipped; the start value after an init) and skip count of tensor t."""
    init_alpha = tl.where(formula == L.FORMULA_FIXED, 1.0 - beta, fallback)
    new_alpha = tl.where(skip, 0.0, tl.where(apply, al, tl.where(pend == L.PEND_INIT, init_alpha, tl.load(alpha + t))))
    tl.store(alpha + t, new_alpha)
    tl.store(skips + t, tl.load(skips + t) + skip.to(tl.int64))


@triton.jit(do_not_specialize=["T", "n_tiles", "formula"])
def _fused_step_kernel(
    tile_tensor, stab, dyn, hyper, part_r, part_w, flags_r, flags_w, dcarry_r, dcarry_w, alpha, skips, T, n_tiles,
    formula, scale, fallback, beta,
    DTYPE: tl.constexpr, KIND: tl.constexpr, ALIGNED: tl.constexpr, EMA_IN_PARAM_DTYPE: tl.constexpr,
    VEC: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr, CHUNK: tl.constexpr,
):
    # The formula is a runtime value, not a specialisation: it only changes a few scalar
    # operations per program (and, for "fixed", masks that switch g_prev traffic off).
    # EMA_IN_PARAM_DTYPE: θ* and g_prev are stored in DTYPE and the EMA maths is rounded
    # to DTYPE step by step (round_to: integer RTNE for bf16, so that the interpreter,
    # which truncates on a bf16 cast, computes what a GPU does), exactly as
    # kernels/csrc/dema_cpu.c (DEFINE_PARAM_FN). EDT: θ*, g_prev in memory and the
    # dtype of the EMA maths (fp32: round_to is a no-op).
    EDT: tl.constexpr = DTYPE if EMA_IN_PARAM_DTYPE else tl.float32
    pid = tl.program_id(0)
    t, t0, t1, start = _tile_of_program(tile_tensor, stab, T, n_tiles, BLOCK * ITERS)
    apply, al, skip, d_in, pend = _pending(part_r, flags_r, dcarry_r, t, t0, t1, T, formula, scale, fallback, beta, CHUNK,
                                           EDT)
    # An init left pending becomes "started" once its probe shows it was finite.
    started = (tl.load(flags_r + L.F_STARTED * T + t) != 0) | ((pend == L.PEND_INIT) & (skip == 0))
    init_now = started == 0
    hp = tl.load(flags_r + L.F_HAS_PREV * T + t) != 0
    need_gp = formula != L.FORMULA_FIXED
    # Pointers at this tile's first element (64-bit `start`); n: the elements left from
    # there, at most a tile, a 32-bit number.
    n = tl.minimum(tl.load(stab + L.S_NUMEL * T + t) - start, BLOCK * ITERS).to(tl.int32)
    th_ptr = tl.load(stab + L.S_PARAM * T + t).to(tl.pointer_type(DTYPE)) + start
    m_ptr = tl.load(stab + L.S_EXP_AVG * T + t).to(tl.pointer_type(DTYPE)) + start
    v_ptr = tl.load(stab + L.S_EXP_AVG_SQ * T + t).to(tl.pointer_type(DTYPE)) + start
    e_ptr = tl.load(stab + L.S_EMA * T + t).to(tl.pointer_type(EDT)) + start
    gp_ptr = tl.load(stab + L.S_GRAD_PREV * T + t).to(tl.pointer_type(EDT)) + start
    hrow = hyper + tl.load(stab + L.S_GROUP * T + t) * L.N_HYPER
    g_ptr = tl.load(dyn + L.D_GRAD * T + t).to(tl.pointer_type(DTYPE)) + start
    dflags = tl.load(dyn + L.D_FLAGS * T + t)
    has_g = (dflags & L.DF_HAS_GRAD) != 0
    if ALIGNED:
        # The host checked every address is 16-byte aligned and every numel a multiple
        # of VEC: with these hints each thread's VEC elements are one 128-bit access and
        # the mask `offs < n` is uniform per vector.
        th_ptr = tl.multiple_of(th_ptr, 16)
        m_ptr = tl.multiple_of(m_ptr, 16)
        v_ptr = tl.multiple_of(v_ptr, 16)
        e_ptr = tl.multiple_of(e_ptr, 16)
        gp_ptr = tl.multiple_of(gp_ptr, 16)
        g_ptr = tl.multiple_of(g_ptr, 16)
        n = tl.multiple_of(n, VEC)
    # Hyper-parameters arrive in fp64 (Python floats); derived scalars are rounded to
    # fp32 the way torch rounds a Python scalar for an fp32 tensor op.
    lr64 = tl.load(hrow + L.H_LR)
    wd64 = tl.load(hrow + L.H_WEIGHT_DECAY)
    lr = lr64.to(tl.float32)
    wd = wd64.to(tl.float32)
    if KIND == L.KIND_SGD:
        mom64 = tl.load(hrow + L.H_MOMENTUM)
        mom = mom64.to(tl.float32)
        w_damp = (1.0 - tl.load(hrow + L.H_DAMPENING)).to(tl.float32)
        nesterov = tl.load(hrow + L.H_NESTEROV) != 0.0
        first = (dflags & L.DF_FIRST) != 0
        has_mom = mom64 != 0.0
    else:
        # Bias corrections from this tensor's step count (device-side, like torch's
        # capturable Adam): β^step = exp(step · log β) in fp64.
        step = tl.load(dyn + L.D_STEP * T + t).to(tl.float64)
        bc1 = 1.0 - tl.exp(step * tl.load(hrow + L.H_LOG_BETA1))
        bc2 = 1.0 - tl.exp(step * tl.load(hrow + L.H_LOG_BETA2))
        step_size = (lr64 / bc1).to(tl.float32)
        bc2_sqrt = tl.sqrt(bc2).to(tl.float32)  # fp64: sqrt.rn.f64 (IEEE) already
        eps = tl.load(hrow + L.H_EPS).to(tl.float32)
        decay = (1.0 - lr64 * wd64).to(tl.float32)
        beta1 = tl.load(hrow + L.H_BETA1)
        beta2 = tl.load(hrow + L.H_BETA2)
        w_m = (1.0 - beta1).to(tl.float32)
        b2 = beta2.to(tl.float32)
        w_v = (1.0 - beta2).to(tl.float32)
    need = (init_now == 0) & has_g & hp & need_gp  # this step's a, b, c are meaningful
    keep_al = 1.0 - al
    sa = tl.zeros([BLOCK // VEC], dtype=tl.float32)
    sb = tl.zeros([BLOCK // VEC], dtype=tl.float32)
    sc = tl.zeros([BLOCK // VEC], dtype=tl.float32)
    sd = tl.zeros([BLOCK // VEC], dtype=tl.float32)
    # Only the blocks this tile covers (a small tensor's tile is mostly past its end).
    for it in range(0, tl.minimum(tl.cdiv(n, BLOCK), ITERS)):
        offs = it * BLOCK + tl.arange(0, BLOCK)
        if ALIGNED:
            offs = tl.max_contiguous(tl.multiple_of(offs, BLOCK), BLOCK)
        mask = offs < n
        gm = mask & _bcast(has_g, BLOCK)
        # The optimizer update first (θ, g, m, v live), then the EMA (θ*, g_prev): fewer
        # values live at once than loading everything up front.
        th = to_f32(tl.load(th_ptr + offs, mask=mask, other=0.0))
        g = to_f32(tl.load(g_ptr + offs, mask=gm, other=0.0))
        if KIND == L.KIND_SGD:
            gw = g + wd * th
            bm = gm & _bcast(has_mom, BLOCK)
            buf = to_f32(tl.load(m_ptr + offs, mask=bm & _bcast(first == 0, BLOCK), other=0.0))
            buf = to_rtne(tl.where(_bcast(first, BLOCK), gw, buf * mom + w_damp * gw), DTYPE)
            tl.store(m_ptr + offs, buf, mask=bm)
            buf = to_f32(buf)
            gw = tl.where(_bcast(has_mom, BLOCK), tl.where(_bcast(nesterov, BLOCK), gw + mom * buf, buf), gw)
            th2 = th - lr * gw
        else:
            if KIND == L.KIND_ADAMW:
                gw = g
                th2 = th * decay
            else:
                gw = g + wd * th
                th2 = th
            mm = to_f32(tl.load(m_ptr + offs, mask=gm, other=0.0))
            vv = to_f32(tl.load(v_ptr + offs, mask=gm, other=0.0))
            mm = to_rtne(mm + w_m * (gw - mm), DTYPE)
            vv = to_rtne(vv * b2 + w_v * gw * gw, DTYPE)
            tl.store(m_ptr + offs, mm, mask=gm)
            tl.store(v_ptr + offs, vv, mask=gm)
            # IEEE sqrt and division, as torch (tl.sqrt is sqrt.approx.ftz: flushes a
            # subnormal v with eps=0; `/` is div.full: 2 ulp)
            denom = tl.div_rn(tl.sqrt_rn(to_f32(vv)), bc2_sqrt) + eps
            th2 = th2 - tl.div_rn(step_size * to_f32(mm), denom)
        th2 = to_rtne(tl.where(_bcast(has_g, BLOCK), th2, th), DTYPE)
        tl.store(th_ptr + offs, th2, mask=gm)
        th2 = to_f32(th2)
        # Finish the previous step's EMA update with θ_t (th, before this step's update).
        # In the parameter dtype: round(round(θ*·(1−α)) + round(θ·α)) (no FMA can form
        # across the roundings); an fp32 EMA keeps the plain expression.
        e = to_f32(tl.load(e_ptr + offs, mask=mask, other=0.0))
        if EMA_IN_PARAM_DTYPE:
            e_new = round_to(round_to(e * keep_al, EDT) + round_to(th * al, EDT), EDT)
        else:
            e_new = e * keep_al + th * al
        e = tl.where(_bcast(apply, BLOCK), e_new, e)
        sd += _vsum(tl.where(mask & _bcast(apply, BLOCK), tl.abs(round_to(th - e, EDT)), 0.0), BLOCK, VEC)
        e = tl.where(_bcast(init_now, BLOCK), th2, e)
        # exact: e is a DTYPE number in the parameter-dtype mode
        tl.store(e_ptr + offs, to_rtne(e, EDT), mask=mask & _bcast(apply | init_now, BLOCK))
        # x - x is NaN exactly where x is NaN or inf: the probe rides on b's sum.
        nm = mask & _bcast(need, BLOCK)
        sb += _vsum(tl.where(nm, tl.abs(g), 0.0) + (th2 - th2) + (g - g), BLOCK, VEC)
        sa += _vsum(tl.where(nm, tl.abs(round_to(th2 - e, EDT)), 0.0), BLOCK, VEC)
        gprev = to_f32(tl.load(gp_ptr + offs, mask=nm, other=0.0))
        sc += _vsum(tl.where(nm, tl.abs(round_to(g - gprev, EDT)), 0.0), BLOCK, VEC)
        tl.store(gp_ptr + offs, to_rtne(g, EDT), mask=gm & _bcast(need_gp, BLOCK))
    row = part_w + pid * L.N_PART
    tl.store(row + L.P_A, tl.sum(sa, axis=0))
    tl.store(row + L.P_B, tl.sum(sb, axis=0))
    tl.store(row + L.P_C, tl.sum(sc, axis=0))
    tl.store(row + L.P_D, tl.sum(sd, axis=0))
    if pid == t0:  # the tensor's first tile records its per-tensor state
        tl.store(flags_w + L.F_STARTED * T + t, started.to(tl.int32))
        tl.store(flags_w + L.F_HAS_PREV * T + t, tl.where(need_gp, has_g, hp).to(tl.int32))
        tl.store(flags_w + L.F_PEND * T + t, tl.where(init_now, L.PEND_INIT, L.PEND_EMA).to(tl.int32))
        tl.store(flags_w + L.F_PEND_HAS_GRAD * T + t, has_g.to(tl.int32))
        tl.store(flags_w + L.F_PEND_HAS_PREV * T + t, hp.to(tl.int32))
        tl.store(flags_w + L.F_APPLIED * T + t, apply.to(tl.int32))
        # d of this step if nothing is applied now: kept on a skip, 0 after an init.
        tl.store(dcarry_w + t, tl.where(init_now | (pend == L.PEND_INIT), 0.0, d_in))
        _record_decision(alpha, skips, t, apply, al, skip, pend, formula, fallback, beta)


@triton.jit(do_not_specialize=["T", "n_tiles", "formula"])
def _fused_flush_kernel(
    tile_tensor, stab, theta, part_r, part_w, flags_r, dcarry_r, alpha, skips, T, n_tiles, formula, scale, fallback,
    beta, DTYPE: tl.constexpr, ALIGNED: tl.constexpr, EMA_IN_PARAM_DTYPE: tl.constexpr, VEC: tl.constexpr,
    BLOCK: tl.constexpr, ITERS: tl.constexpr, CHUNK: tl.constexpr,
):
    """Finish the pending EMA update (θ read through `theta`, a table of θ addresses)."""
    EDT: tl.constexpr = DTYPE if EMA_IN_PARAM_DTYPE else tl.float32
    pid = tl.program_id(0)
    t, t0, t1, start = _tile_of_program(tile_tensor, stab, T, n_tiles, BLOCK * ITERS)
    apply, al, skip, d_in, pend = _pending(part_r, flags_r, dcarry_r, t, t0, t1, T, formula, scale, fallback, beta, CHUNK,
                                           EDT)
    n = tl.minimum(tl.load(stab + L.S_NUMEL * T + t) - start, BLOCK * ITERS).to(tl.int32)  # as the step kernel
    th_ptr = tl.load(theta + t).to(tl.pointer_type(DTYPE)) + start
    e_ptr = tl.load(stab + L.S_EMA * T + t).to(tl.pointer_type(EDT)) + start
    if ALIGNED:
        th_ptr = tl.multiple_of(th_ptr, 16)
        e_ptr = tl.multiple_of(e_ptr, 16)
        n = tl.multiple_of(n, VEC)
    keep_al = 1.0 - al
    sd = tl.zeros([BLOCK // VEC], dtype=tl.float32)
    # Only the blocks this tile covers (a small tensor's tile is mostly past its end).
    for it in range(0, tl.minimum(tl.cdiv(n, BLOCK), ITERS)):
        offs = it * BLOCK + tl.arange(0, BLOCK)
        if ALIGNED:
            offs = tl.max_contiguous(tl.multiple_of(offs, BLOCK), BLOCK)
        m = (offs < n) & _bcast(apply, BLOCK)
        th = to_f32(tl.load(th_ptr + offs, mask=m, other=0.0))
        e = to_f32(tl.load(e_ptr + offs, mask=m, other=0.0))
        if EMA_IN_PARAM_DTYPE:  # as in the step kernel
            e = round_to(round_to(e * keep_al, EDT) + round_to(th * al, EDT), EDT)
        else:
            e = e * keep_al + th * al
        tl.store(e_ptr + offs, to_rtne(e, EDT), mask=m)
        sd += _vsum(tl.where(m, tl.abs(round_to(th - e, EDT)), 0.0), BLOCK, VEC)
    tl.store(part_w + pid * L.N_PART + L.P_D, tl.sum(sd, axis=0))
    if pid == t0:
        _record_decision(alpha, skips, t, apply, al, skip, pend, formula, fallback, beta)


@triton.jit(do_not_specialize=["T", "n_tiles", "formula"])
def _fused_pending_kernel(
    stab, part_r, flags_r, dcarry_r, alpha, skips, alpha_out, skips_out, T, n_tiles, formula, scale, fallback, beta,
    CHUNK: tl.constexpr, EMA_DTYPE: tl.constexpr,
):
    """Grid = tensors: the decision on the pending update (α, skip count) written to
    alpha_out/skips_out, without touching the EMA (engine stats between flushes).
    EMA_DTYPE: fp32, or the 16-bit dtype the norms are rounded to (ema_dtype="param")."""
    t = tl.program_id(0)
    t0, t1 = _tiles_of(stab, t, T, n_tiles)
    apply, al, skip, d_in, pend = _pending(part_r, flags_r, dcarry_r, t, t0, t1, T, formula, scale, fallback, beta, CHUNK,
                                           EMA_DTYPE)
    init_alpha = tl.where(formula == L.FORMULA_FIXED, 1.0 - beta, fallback)
    new_alpha = tl.where(skip, 0.0, tl.where(apply, al, tl.where(pend == L.PEND_INIT, init_alpha, tl.load(alpha + t))))
    tl.store(alpha_out + t, new_alpha)
    tl.store(skips_out + t, tl.load(skips + t) + skip.to(tl.int64))


_TL = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
_PTR = torch.Tensor.data_ptr
_DTYPE = operator.attrgetter("dtype")


def _or_all(values) -> int:
    return functools.reduce(operator.or_, values, 0)


class TritonFusedGroup:
    """The fused group of one (device, dtype) engine group on the Triton kernels; the
    per-step interface is documented in cl_core/dema/fused.py."""

    def __init__(self, members):
        from cl_core.dema.fused import check_tensors

        self._check = check_tensors
        self.members = members
        eg = members.engine_group
        self.state, self.device, self.dtype = eg.state, eg.device, eg.dtype
        s, dev, n = eg.state, eg.device, len(eg.state)
        self.n = n
        tile0 = [0]
        for k in s.numels:
            tile0.append(tile0[-1] + (k + TILE - 1) // TILE)
        self.n_tiles = tile0[-1]
        self.tile0 = tile0[:-1]
        self.tile_tensor = torch.tensor([t for t, k in enumerate(s.numels) for _ in range((k + TILE - 1) // TILE)],
                                        dtype=torch.int32, device=dev)
        self.stab = torch.zeros(L.N_STATIC, max(1, n), dtype=torch.int64, device=dev)
        self.part = torch.zeros(2, max(1, self.n_tiles), L.N_PART, dtype=torch.float32, device=dev)
        self.flags = torch.zeros(2, L.N_FLAGS, max(1, n), dtype=torch.int32, device=dev)
        self.dcarry = torch.zeros(2, max(1, n), dtype=torch.float32, device=dev)
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
        mem = self.members
        dtypes = set(map(_DTYPE, mem.params))
        if len(dtypes) != 1 or next(iter(dtypes)) not in _TL:
            return f"the parameters of one group have dtypes {sorted(map(str, dtypes))}; the fused kernel needs one of float32/bfloat16/float16"
        dtype = next(iter(dtypes))
        reason = self._check(mem.params, batch.grads, dtype, self.device, batch.has_all_grads, self.ema_dtype)
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
        staging = torch.empty(L.N_DYNAMIC * n + n_hyper, dtype=torch.int64, pin_memory=cuda)
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
        st[L.N_DYNAMIC * n:].view("float64")[:] = batch.hyper.numpy().reshape(-1)
        if self.upload is None or self.upload.numel() != staging.numel():
            self.upload = torch.empty(staging.numel(), dtype=torch.int64, device=self.device)
        self.upload.copy_(staging, non_blocking=cuda)
        dyn = self.upload[: L.N_DYNAMIC * n]
        hyper = self.upload[L.N_DYNAMIC * n:].view(torch.float64)
        formula, scale, fallback, beta = batch.consts
        w, r = self.parity, 1 - self.parity
        vec, block, iters = launch_shape(torch.empty(0, dtype=self.dtype).element_size(), aligned)
        if self.n_tiles:
            _fused_step_kernel[(self.n_tiles,)](
                self.tile_tensor, self.stab, dyn, hyper, self.part[r], self.part[w], self.flags[r], self.flags[w],
                self.dcarry[r], self.dcarry[w], s.alpha, s.skips, n, self.n_tiles, formula, scale, fallback, beta,
                DTYPE=_TL[self.dtype], KIND=batch.kind, ALIGNED=aligned, EMA_IN_PARAM_DTYPE=self.ema_in_param_dtype,
                VEC=vec, BLOCK=block, ITERS=iters, CHUNK=CHUNK, **LAUNCH,
            )
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
        """Finish the pending EMA update and write the engine's canonical state."""
        s, n = self.state, self.n
        if n == 0 or self._dirty or not self._pending or self.n_tiles == 0:
            return
        theta, keep = self._theta_table()
        formula, scale, fallback, beta = self._consts
        w, r = self.parity, 1 - self.parity
        aligned = self._static_aligned and keep is None
        vec, block, iters = launch_shape(torch.empty(0, dtype=self.dtype).element_size(), aligned)
        self.part[w].zero_()
        _fused_flush_kernel[(self.n_tiles,)](
            self.tile_tensor, self.stab, theta, self.part[r], self.part[w], self.flags[r], self.dcarry[r], s.alpha,
            s.skips, n, self.n_tiles, formula, scale, fallback, beta, DTYPE=_TL[self.dtype], ALIGNED=aligned,
            EMA_IN_PARAM_DTYPE=self.ema_in_param_dtype, VEC=vec, BLOCK=block, ITERS=iters, CHUNK=CHUNK, **LAUNCH,
        )
        del keep  # the temporaries live until the launch is queued (stream order keeps them valid)
        # Canonical per-tensor state from the flags the last step wrote (torch ops, no sync).
        fr = self.flags[r, :, :n]
        pend = fr[L.F_PEND]
        idx = self.tile_tensor.long()
        probe = torch.zeros(n, dtype=torch.float32, device=s.device)
        probe.index_add_(0, idx, self.part[r, : self.n_tiles, L.P_B])
        finite = probe == probe
        started = (fr[L.F_STARTED] != 0) | ((pend == L.PEND_INIT) & finite)
        d_flush = torch.zeros(n, dtype=torch.float32, device=s.device)
        d_flush.index_add_(0, idx, self.part[w, : self.n_tiles, L.P_D])
        d_prev = torch.zeros_like(d_flush)
        d_prev.index_add_(0, idx, self.part[r, : self.n_tiles, L.P_D])
        if self.ema_in_param_dtype:  # the norm d is a number of the EMA dtype, as in the kernels
            d_flush = d_flush.to(self.ema_dtype).float()
            d_prev = d_prev.to(self.ema_dtype).float()
        d_in = torch.where(fr[L.F_APPLIED] != 0, d_prev, self.dcarry[r, :n])
        applied_now = (pend == L.PEND_EMA) & finite
        d = torch.where(applied_now, d_flush, torch.where(pend == L.PEND_INIT, 0.0, d_in))
        s.started.copy_(started.to(torch.uint8))
        s.has_prev.copy_(fr[L.F_HAS_PREV].to(torch.uint8))
        s.d.copy_(d)
        self._dirty = True
        self._pending = False

    def pending_stats(self):
        """(alpha, skips) of the pending step, decided on the device (one small launch
        over the tensors, no host sync, the EMA untouched); None when nothing is pending."""
        s, n = self.state, self.n
        if n == 0 or self._dirty or not self._pending or self.n_tiles == 0:
            return None
        formula, scale, fallback, beta = self._consts
        r = 1 - self.parity
        alpha = torch.empty_like(s.alpha)
        skips = torch.empty_like(s.skips)
        _fused_pending_kernel[(n,)](
            self.stab, self.part[r], self.flags[r], self.dcarry[r], s.alpha, s.skips, alpha, skips, n, self.n_tiles,
            formula, scale, fallback, beta, CHUNK=CHUNK, EMA_DTYPE=_TL[self.ema_dtype], **PENDING_LAUNCH,
        )
        return alpha, skips


# The EMA-in-parameter-dtype specialisations compiled on every test run: each dtype, each
# optimizer kind, both paths and the flush appear at least once, and the register-heaviest
# step kernel of each dtype (Adam, ALIGNED, 8 elements per thread: 127 / 119 registers).
# The other step specialisations differ from one of these only in the dtype's rounding or
# Adam vs AdamW (a few scalar operations). CL_CORE_COMPILE_EVERY_SPEC=1 compiles all 18
# (do that after changing a kernel; last run: 96-127 registers, no spills, the expected
# 128-bit accesses). Why not always: the compile test's CPU budget (~50 CPU-s before ema_dtype="param";
# these 9 add ~11 CPU-s, all 18 would add ~22).
_PARAM_EMA_SPECS_ALWAYS = (
    "fused_step/adam/bfloat16/param-ema/aligned",
    "fused_step/adam/float16/param-ema/aligned",
    "fused_step/sgd/bfloat16/param-ema/aligned",
    "fused_step/adamw/bfloat16/param-ema/general",
    "fused_step/sgd/float16/param-ema/general",
    "fused_flush/bfloat16/param-ema/aligned",
    "fused_flush/float16/param-ema/general",
    "fused_pending/bfloat16/param-ema",
    "fused_pending/float16/param-ema",
)


def compile_specs(every: bool | None = None):
    """Every specialisation the launchers above can produce: (name, kernel, signature,
    constexprs, launch options, expected 128-bit accesses or None). tests/test_triton_compile.py
    compiles each for sm_80/sm_90. Of the ema_dtype="param" ones (EMA_IN_PARAM_DTYPE)
    only _PARAM_EMA_SPECS_ALWAYS unless `every` (default: CL_CORE_COMPILE_EVERY_SPEC=1)."""
    if every is None:
        every = os.environ.get("CL_CORE_COMPILE_EVERY_SPEC", "0") not in ("", "0")
    ptr = "*i64"
    step_sig = dict(tile_tensor="*i32", stab=ptr, dyn=ptr, hyper="*fp64", part_r="*fp32", part_w="*fp32",
                    flags_r="*i32", flags_w="*i32", dcarry_r="*fp32", dcarry_w="*fp32", alpha="*fp32",
                    skips="*i64", T="i32", n_tiles="i32", formula="i32", scale="fp32", fallback="fp32", beta="fp32")
    flush_sig = dict(tile_tensor="*i32", stab=ptr, theta=ptr, part_r="*fp32", part_w="*fp32", flags_r="*i32",
                     dcarry_r="*fp32", alpha="*fp32", skips="*i64", T="i32", n_tiles="i32", formula="i32",
                     scale="fp32", fallback="fp32", beta="fp32")
    pend_sig = dict(stab=ptr, part_r="*fp32", flags_r="*i32", dcarry_r="*fp32", alpha="*fp32", skips="*i64",
                    alpha_out="*fp32", skips_out="*i64", T="i32", n_tiles="i32", formula="i32", scale="fp32",
                    fallback="fp32", beta="fp32")
    kinds = {L.KIND_ADAM: "adam", L.KIND_ADAMW: "adamw", L.KIND_SGD: "sgd"}
    specs = []
    for dtype, tdt in _TL.items():
        size = torch.empty(0, dtype=dtype).element_size()
        name = str(dtype).replace("torch.", "")
        # the EMA in fp32, and for 16-bit parameters also in their dtype (ema_dtype="param")
        for param_ema in (False, True) if size == 2 else (False,):
            mode = "/param-ema" if param_ema else ""
            # 128-bit accesses per iteration: θ*, g_prev are parameter-dtype streams
            # (one v4 each) in that mode, fp32 streams (VEC/4 v4 each) otherwise
            ema_bytes = size if param_ema else 4
            for aligned in (True, False):
                vec, block, iters = launch_shape(size, aligned)
                shape = dict(VEC=vec, BLOCK=block, ITERS=iters, CHUNK=CHUNK)
                tag = "aligned" if aligned else "general"
                ce = dict(DTYPE=tdt, ALIGNED=aligned, EMA_IN_PARAM_DTYPE=param_ema)
                for kind, kname in kinds.items():
                    # Adam reads θ, g, m, v, θ*, g_prev and writes θ, m, v, θ*, g_prev; SGD has no v
                    streams = (3, 2, 2, 2) if kind == L.KIND_SGD else (4, 2, 3, 2)
                    specs.append((f"fused_step/{kname}/{name}{mode}/{tag}", _fused_step_kernel, step_sig,
                                  dict(ce, KIND=kind, **shape), LAUNCH,
                                  expect_v4(vec, *streams, ema_bytes=ema_bytes) if aligned else None))
                # the flush reads θ, θ* and writes θ*
                specs.append((f"fused_flush/{name}{mode}/{tag}", _fused_flush_kernel, flush_sig, dict(ce, **shape),
                              LAUNCH, expect_v4(vec, 1, 1, 0, 1, ema_bytes=ema_bytes) if aligned else None))
            if param_ema:
                specs.append((f"fused_pending/{name}{mode}", _fused_pending_kernel, pend_sig,
                              dict(CHUNK=CHUNK, EMA_DTYPE=tdt), PENDING_LAUNCH, None))
    # every fp32-EMA launch uses this one
    specs.append(("fused_pending", _fused_pending_kernel, pend_sig, dict(CHUNK=CHUNK, EMA_DTYPE=tl.float32),
                  PENDING_LAUNCH, None))
    if not every:
        specs = [s for s in specs if "/param-ema" not in s[0] or s[0] in _PARAM_EMA_SPECS_ALWAYS]
    return specs
