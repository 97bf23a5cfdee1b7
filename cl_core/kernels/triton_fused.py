"""Triton kernels of the one-pass optimizer step + DEMA (one launch per step) and their
launchers; the engine's driver of one (device, dtype) group (cl_core/dema/onepass/triton_driver.py,
`TritonFusedDriver`) builds the tables and calls them.

Each program sweeps one tile (TILE elements) of one tensor. Per element it finishes the
previous step's EMA update, applies Adam/AdamW/SGD exactly as torch orders the maths,
and accumulates this step's statistics (a, b with the NaN/inf probe folded in, c) and
d for the tile.

Per-tensor decisions need the whole tensor's statistics. The cross-tile reduction is
"the last program of a tensor sums its partials" (`_close_tile`): each program stores its
tile's partials (a, b, c, d) and takes a ticket of its tensor (an int32 atomic_add,
acq_rel at GPU scope); the one that takes the tensor's last ticket sums the tensor's
partial rows in tile order (`_tile_sums`: CHUNK row accumulators, then one tree sum) into
the tensor's totals `tot[w]` and resets the ticket. The next launch's programs (step,
flush, pending) read four totals. So every partial is summed once per step: the work is
linear in the tile count (it was quadratic when every program re-summed all partials of
its tensor: +1 ms per step at 8,192 tiles, tens of ms at 1 B elements), still one launch
per step, and the totals are the same bits whichever program comes last, run to run (the
summation order is fixed, no float atomics). Why not a separate reduce launch (grid =
tensors): one more launch per step, and its per-tensor loop is the same serial sum; why
not a two-level tree: a different summation order than the one the tests pinned, for
nothing at LoRA sizes (the last program of a 134 M-element tensor sums 8,192 rows in 128
dependent iterations of 64, ~0.1 ms, against the ~1.8 ms that tensor's 5.9 GB of step
traffic takes at 3.35 TB/s). Per-tensor flags are
double-buffered by step parity (read [r], written [w] by the tensor's first tile), so
apart from the partials the ticket hands over, no program reads what another program of
the same launch writes (tests/kernels/test_program_order.py runs the programs in
shuffled order; tests/kernels/test_cross_tile_reduction.py has 66 tiles in a tensor).
The engine's canonical state (started, has_prev, d, alpha, skips) is written by the
driver's flush (only when the EMA is read); `alpha` and `skips` are kept current by
every step.

Tables (names in kernels/layouts.py; every table and every half of a double-buffered one
starts 16-byte aligned, as the compile tests assume: layouts.aligned_count): a static
per-tensor table (addresses of θ, the optimizer state, θ*, g_prev; numel; param group;
first tile), built when the group's tensors change, never per step; a dynamic per-tensor table (gradient address, step
count, flags) uploaded once per step in one copy; one hyper-parameter row per optimizer
param group.

θ* and g_prev are float32, or with DEMAConfig(ema_dtype="param") on 16-bit parameters
the parameters' dtype (EMA_IN_PARAM_DTYPE): then the EMA maths is the official code's
16-bit arithmetic op for op, as the reference (cl_core/dema/twopass/reference.py) and the native
CPU kernel (cl_core/kernels/csrc/dema_cpu.c, DEFINE_PARAM_FN) compute it: every difference,
product and sum rounded to that dtype, the norms float64 tile partials summed exactly and
rounded once, α's operations rounded, the first update the official copy plus fallback
update (tests/engine/test_official_bits.py, tests/fused/test_triton_fused_param.py);
8 B per element and step less traffic (θ*, g_prev read and written in 2 B, not 4).

Machine code (checked by tests/kernels/test_triton_compile.py for sm_80 and sm_90 from the PTX
and `ptxas -v`): with ALIGNED (every address 16-byte aligned, every numel a multiple of
the vector width, decided on the host per step) all θ, g, m, v, θ*, g_prev accesses are
128-bit; otherwise the same kernel without the hints (scalar accesses, any numel).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from cl_core.kernels import layouts as L
from cl_core.kernels.triton_dema import _bcast, alpha_rule, expect_v4, f32_scalars, round_sum, round_to, to_f32, to_rtne

# Launch shape. Each thread owns VEC contiguous elements per iteration: VEC = 16 bytes /
# element size, so a thread's θ, g, m, v access is one 128-bit load/store (θ*, g_prev:
# one or two in fp32, one in the parameter dtype). 4 warps x 32 threads x VEC = BLOCK. Why 4 warps: the registers per
# thread do not depend on the warp count, and small blocks fill the SMs evenly over the
# ~1,250 tiles of a LoRA-7B step. Compiled (tests/kernels/test_triton_compile.py, bench/README.md),
# the step kernel uses 72-80 registers per thread for fp32 and 107-128 for 16-bit
# parameters (8 elements per thread), no spills: 6-7 (fp32) or 4 (16-bit) blocks per SM,
# 25-44% occupancy on A100/H100. Enough for a streaming kernel: each thread has 6
# independent 128-bit loads in flight per iteration, >= 16 warps x 32 x 96 B ≈ 48 KB per
# SM, above the ≈ 18 KB per SM that HBM3 bandwidth x latency (3.35 TB/s x ~700 ns / 132
# SMs) asks for.
NUM_WARPS = 4
# ptxas's own heuristic targets ~80 registers on sm_80 and spills a few bytes to get
# there (seen on the general path); telling it the real budget keeps every
# specialisation spill-free at <= 128 (tests/kernels/test_triton_compile.py).
MAX_REGISTERS = 128
# FMA contraction off, stated (not left to Triton's default, announced to change): with
# IEEE sqrt and division below, compiled code rounds each operation as the interpreter,
# the reference and torch's CPU AdamW do.
LAUNCH = {"num_warps": NUM_WARPS, "maxnreg": MAX_REGISTERS, "enable_fp_fusion": False}
PENDING_LAUNCH = {"num_warps": 1, "enable_fp_fusion": False}  # one tensor per program, four totals each
TILE = 16384  # elements per program: few partials per tensor, ~1,250 programs per LoRA-7B step
CHUNK = 64  # partial rows summed per iteration by a tensor's last program (_close_tile)
# a block-shape width must be a tl.constexpr for Triton < 3.8 (see triton_dema.N_STAT)
N_PART: tl.constexpr = tl.constexpr(L.N_PART)


def launch_shape(elem_size: int, aligned: bool, ema_size: int = 4) -> tuple[int, int, int]:
    """(VEC, BLOCK, ITERS) for parameters of `elem_size` bytes and θ*/g_prev of `ema_size`
    bytes (4: float32; the parameter's size with ema_dtype="param"). VEC = 4 elements per
    thread for every dtype on the aligned path (the sizes document what it was chosen for):
    fp32 streams are one 128-bit access each, 16-bit streams one 64-bit access. Why not 8
    for 16-bit parameters (one 128-bit access): Triton gives every access its own vector
    width (8 for 16-bit, 4 for fp32), and with a float32 EMA the two layouts met through
    shared memory in every iteration (4 bar.sync and 4 st.shared per iteration in the PTX);
    with a 16-bit EMA the 8-wide loop held 121-128 registers (Triton 3.6: 128 and a 12-byte
    spill for bf16 AdamW). At 4, every aligned specialisation stays at <= 107 registers
    (issue 28; tests/kernels/test_triton_compile.py). A warp's 64-bit accesses still cover
    256 contiguous bytes: whole 32-byte sectors, so the DRAM traffic is the same. The
    general (unaligned) path accesses memory element by element whatever VEC is: 2, which
    keeps its 16-bit-EMA specialisations (float64 sums, scalar masks) under 120 registers
    (122 at 4)."""
    vec = 4 if aligned else 2
    block = vec * 32 * NUM_WARPS
    return vec, block, TILE // block


@triton.jit
def _vsum(x, BLOCK: tl.constexpr, VEC: tl.constexpr):
    """Sum each thread's VEC elements in registers: accumulators of BLOCK // VEC lanes
    (one register per thread) instead of BLOCK (VEC registers): fewer live registers."""
    return tl.sum(tl.reshape(x, (BLOCK // VEC, VEC)), axis=1)


@triton.jit
def _tile_sums(part, t0, t1, CHUNK: tl.constexpr, ACC: tl.constexpr):
    """Column sums of rows t0..t1 of a [tiles, N_PART] partials table: (a, b, c, d), in
    one fixed order (CHUNK row accumulators, then one tree sum), whichever program runs
    it, in the partials' dtype ACC (float64 for an EMA in the parameter dtype). `.cg` loads
    read the rows at L2, past an L1 that may hold lines from before the other programs'
    stores (the ticket's acquire orders them; this keeps it obvious)."""
    rows = tl.arange(0, CHUNK)[:, None]
    cols = tl.arange(0, N_PART)[None, :]
    acc = tl.zeros([CHUNK, N_PART], dtype=ACC)
    for j in range(t0, t1, CHUNK):
        idx = j + rows
        acc += tl.load(part + idx * L.N_PART + cols, mask=(idx < t1) & (cols >= 0), other=0.0, cache_modifier=".cg")
    s = tl.sum(acc, axis=0)
    c1 = tl.arange(0, N_PART)
    a = tl.sum(tl.where(c1 == L.P_A, s, 0.0), axis=0)
    b = tl.sum(tl.where(c1 == L.P_B, s, 0.0), axis=0)
    c = tl.sum(tl.where(c1 == L.P_C, s, 0.0), axis=0)
    d = tl.sum(tl.where(c1 == L.P_D, s, 0.0), axis=0)
    return a, b, c, d


@triton.jit
def _close_tile(part_w, tot_w, ticket, pid, t, t0, t1, a, b, c, d, CHUNK: tl.constexpr, ACC: tl.constexpr):
    """Store this tile's partials (a, b, c, d) and take the tensor's ticket; the program
    that takes the last one (all other tiles of the tensor have stored theirs) sums the
    tensor's partials in tile order into tot_w[t] and resets the ticket for the next
    launch. So each partial is summed once per launch (linear in the tile count), and the
    totals are the same bits whichever program comes last (the sum's order is fixed)."""
    row = part_w + pid * L.N_PART
    tl.store(row + L.P_A, a)
    tl.store(row + L.P_B, b)
    tl.store(row + L.P_C, c)
    tl.store(row + L.P_D, d)
    # every thread's stores before the ticket; acq_rel at GPU scope publishes them to the
    # program that takes the last ticket and makes that one see all the others'
    tl.debug_barrier()
    taken = tl.atomic_add(ticket + t, 1, sem="acq_rel", scope="gpu")
    if taken == t1 - t0 - 1:
        sa, sb, sc, sd = _tile_sums(part_w, t0, t1, CHUNK, ACC)
        out = tot_w + t * L.N_PART
        tl.store(out + L.P_A, sa)
        tl.store(out + L.P_B, sb)
        tl.store(out + L.P_C, sc)
        tl.store(out + L.P_D, sd)
        tl.store(ticket + t, 0)  # every tile of t has taken its ticket: nobody reads it again this launch


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
def _pending(tot_r, flags_r, dcarry_r, t, T, formula, scale, fallback, beta, EMA_DTYPE: tl.constexpr):
    """The decision on the EMA update the previous launch left pending for tensor t:
    (apply, alpha, skip, d_in, pend), from the tensor's totals the previous step's last
    program of t wrote (tot_r: four loads, whatever the tensor's tile count). With the
    EMA in a 16-bit EMA_DTYPE each norm is the exact float64 total rounded once to it
    (round_sum; float32 totals as they are for an fp32 EMA) and α is formed in that dtype's
    arithmetic; d carried from an earlier step (dcarry) was rounded when it was summed."""
    pend = tl.load(flags_r + L.F_PEND * T + t)
    row = tot_r + t * L.N_PART
    a = round_sum(tl.load(row + L.P_A), EMA_DTYPE)
    b = round_sum(tl.load(row + L.P_B), EMA_DTYPE)  # NaN (the probe) stays NaN
    c = round_sum(tl.load(row + L.P_C), EMA_DTYPE)
    d_sum = round_sum(tl.load(row + L.P_D), EMA_DTYPE)
    d_in = tl.where(tl.load(flags_r + L.F_APPLIED * T + t) != 0, d_sum, tl.load(dcarry_r + t))
    finite = b == b  # P_B carries the NaN/inf probe
    skip = (pend != L.PEND_NONE) & (finite == 0)
    use = (tl.load(flags_r + L.F_PEND_HAS_GRAD * T + t) != 0) & (tl.load(flags_r + L.F_PEND_HAS_PREV * T + t) != 0)
    al = alpha_rule(a, b, c, d_in, use, formula, scale, fallback, beta, EMA_DTYPE)
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
    tile_tensor, stab, dyn, hyper, tot_r, part_w, tot_w, ticket, flags_r, flags_w, dcarry_r, dcarry_w, alpha, skips,
    T, n_tiles, formula, scale, fallback, beta,
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
    apply, al, skip, d_in, pend = _pending(tot_r, flags_r, dcarry_r, t, T, formula, scale, fallback, beta, EDT)
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
    # the first update of an EMA in the parameter dtype: the official deepcopy of θ, then
    # its fallback update (the "fixed" formula's α for "fixed")
    al0 = tl.where(formula == L.FORMULA_FIXED, 1.0 - beta, fallback)
    keep_al0 = 1.0 - al0
    # sums in float32, or exact in float64 for a 16-bit EMA (rounded once by _pending)
    ACC: tl.constexpr = tl.float32 if EDT == tl.float32 else tl.float64
    sa = tl.zeros([BLOCK // VEC], dtype=ACC)
    sb = tl.zeros([BLOCK // VEC], dtype=ACC)
    sc = tl.zeros([BLOCK // VEC], dtype=ACC)
    sd = tl.zeros([BLOCK // VEC], dtype=ACC)
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
        sd += _vsum(tl.where(mask & _bcast(apply, BLOCK), tl.abs(round_to(th - e, EDT)), 0.0).to(ACC), BLOCK, VEC)
        if EMA_IN_PARAM_DTYPE:
            e_init = round_to(round_to(th2 * keep_al0, EDT) + round_to(th2 * al0, EDT), EDT)
            # d after the first update (F_APPLIED marks the init: the next decision reads it)
            sd += _vsum(tl.where(mask & _bcast(init_now, BLOCK), tl.abs(round_to(th2 - e_init, EDT)), 0.0).to(ACC),
                        BLOCK, VEC)
        else:
            e_init = th2
        e = tl.where(_bcast(init_now, BLOCK), e_init, e)
        # exact: e is a DTYPE number in the parameter-dtype mode
        tl.store(e_ptr + offs, to_rtne(e, EDT), mask=mask & _bcast(apply | init_now, BLOCK))
        # x - x is NaN exactly where x is NaN or inf: the probe rides on b's sum. Only the
        # tensor's own lanes: past its end θ = g = m = v = 0, and with eps = 0 Adam's
        # update there is 0/0 (NaN) for lanes that must contribute exactly nothing.
        nm = mask & _bcast(need, BLOCK)
        sb += _vsum((tl.where(nm, tl.abs(g), 0.0) + tl.where(mask, (th2 - th2) + (g - g), 0.0)).to(ACC), BLOCK, VEC)
        sa += _vsum(tl.where(nm, tl.abs(round_to(th2 - e, EDT)), 0.0).to(ACC), BLOCK, VEC)
        gprev = to_f32(tl.load(gp_ptr + offs, mask=nm, other=0.0))
        sc += _vsum(tl.where(nm, tl.abs(round_to(g - gprev, EDT)), 0.0).to(ACC), BLOCK, VEC)
        tl.store(gp_ptr + offs, to_rtne(g, EDT), mask=gm & _bcast(need_gp, BLOCK))
    _close_tile(part_w, tot_w, ticket, pid, t, t0, t1, tl.sum(sa, axis=0), tl.sum(sb, axis=0), tl.sum(sc, axis=0),
                tl.sum(sd, axis=0), CHUNK, ACC)
    if pid == t0:  # the tensor's first tile records its per-tensor state
        tl.store(flags_w + L.F_STARTED * T + t, started.to(tl.int32))
        tl.store(flags_w + L.F_HAS_PREV * T + t, tl.where(need_gp, has_g, hp).to(tl.int32))
        tl.store(flags_w + L.F_PEND * T + t, tl.where(init_now, L.PEND_INIT, L.PEND_EMA).to(tl.int32))
        tl.store(flags_w + L.F_PEND_HAS_GRAD * T + t, has_g.to(tl.int32))
        tl.store(flags_w + L.F_PEND_HAS_PREV * T + t, hp.to(tl.int32))
        # an init counts as applied: its tiles summed d (0 for an fp32 EMA, whose init is θ)
        tl.store(flags_w + L.F_APPLIED * T + t, (apply | init_now).to(tl.int32))
        # d of this step if nothing is applied now: kept on a skip, 0 at an init; right
        # after an init, d_in is the init's d
        tl.store(dcarry_w + t, tl.where(init_now, 0.0, d_in))
        _record_decision(alpha, skips, t, apply, al, skip, pend, formula, fallback, beta)


@triton.jit(do_not_specialize=["T", "n_tiles", "formula"])
def _fused_flush_kernel(
    tile_tensor, stab, theta, tot_r, part_w, flags_r, dcarry_r, alpha, skips, T, n_tiles, formula, scale, fallback,
    beta, DTYPE: tl.constexpr, ALIGNED: tl.constexpr, EMA_IN_PARAM_DTYPE: tl.constexpr, VEC: tl.constexpr,
    BLOCK: tl.constexpr, ITERS: tl.constexpr,
):
    """Finish the pending EMA update (θ read through `theta`, a table of θ addresses)."""
    EDT: tl.constexpr = DTYPE if EMA_IN_PARAM_DTYPE else tl.float32
    pid = tl.program_id(0)
    t, t0, t1, start = _tile_of_program(tile_tensor, stab, T, n_tiles, BLOCK * ITERS)
    apply, al, skip, d_in, pend = _pending(tot_r, flags_r, dcarry_r, t, T, formula, scale, fallback, beta, EDT)
    n = tl.minimum(tl.load(stab + L.S_NUMEL * T + t) - start, BLOCK * ITERS).to(tl.int32)  # as the step kernel
    th_ptr = tl.load(theta + t).to(tl.pointer_type(DTYPE)) + start
    e_ptr = tl.load(stab + L.S_EMA * T + t).to(tl.pointer_type(EDT)) + start
    if ALIGNED:
        th_ptr = tl.multiple_of(th_ptr, 16)
        e_ptr = tl.multiple_of(e_ptr, 16)
        n = tl.multiple_of(n, VEC)
    keep_al = 1.0 - al
    ACC: tl.constexpr = tl.float32 if EDT == tl.float32 else tl.float64
    sd = tl.zeros([BLOCK // VEC], dtype=ACC)
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
        sd += _vsum(tl.where(m, tl.abs(round_to(th - e, EDT)), 0.0).to(ACC), BLOCK, VEC)
    tl.store(part_w + pid * L.N_PART + L.P_D, tl.sum(sd, axis=0))
    if pid == t0:
        _record_decision(alpha, skips, t, apply, al, skip, pend, formula, fallback, beta)


@triton.jit(do_not_specialize=["T", "formula"])
def _fused_pending_kernel(
    tot_r, flags_r, dcarry_r, alpha, skips, alpha_out, skips_out, T, formula, scale, fallback, beta,
    EMA_DTYPE: tl.constexpr,
):
    """Grid = tensors: the decision on the pending update (α, skip count) written to
    alpha_out/skips_out, without touching the EMA (engine stats between flushes).
    EMA_DTYPE: fp32, or the 16-bit dtype the norms are rounded to (ema_dtype="param")."""
    t = tl.program_id(0)
    apply, al, skip, d_in, pend = _pending(tot_r, flags_r, dcarry_r, t, T, formula, scale, fallback, beta, EMA_DTYPE)
    init_alpha = tl.where(formula == L.FORMULA_FIXED, 1.0 - beta, fallback)
    new_alpha = tl.where(skip, 0.0, tl.where(apply, al, tl.where(pend == L.PEND_INIT, init_alpha, tl.load(alpha + t))))
    tl.store(alpha_out + t, new_alpha)
    tl.store(skips_out + t, tl.load(skips + t) + skip.to(tl.int64))


_TL = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
DTYPES = tuple(_TL)  # parameter dtypes the kernels take


# ---------------------------------------------------------------------- launchers
# Each takes the group's tables and buffers as tensors and the config as scalars; the
# engine's Triton driver (cl_core/dema/onepass/triton_driver.py) owns and fills them. `r`/`w` of a
# double-buffered table are the halves the previous step wrote and this one writes.
def step(n_tiles: int, tile_tensor, stab, dyn, hyper, tot_r, part_w, tot_w, ticket, flags_r, flags_w, dcarry_r,
         dcarry_w, alpha, skips, T: int, formula: int, scale: float, fallback: float, beta: float, dtype: torch.dtype,
         kind: int, aligned: bool, ema_in_param_dtype: bool) -> None:
    """The one-pass optimizer + DEMA sweep of one step (grid = tiles)."""
    size = torch.empty(0, dtype=dtype).element_size()
    vec, block, iters = launch_shape(size, aligned, size if ema_in_param_dtype else 4)
    scale, fallback, beta = f32_scalars(scale, fallback, beta)
    if n_tiles:
        _fused_step_kernel[(n_tiles,)](
            tile_tensor, stab, dyn, hyper, tot_r, part_w, tot_w, ticket, flags_r, flags_w, dcarry_r, dcarry_w, alpha,
            skips, T, n_tiles, formula, scale, fallback, beta, DTYPE=_TL[dtype], KIND=kind, ALIGNED=aligned,
            EMA_IN_PARAM_DTYPE=ema_in_param_dtype, VEC=vec, BLOCK=block, ITERS=iters, CHUNK=CHUNK, **LAUNCH,
        )


def flush(n_tiles: int, tile_tensor, stab, theta, tot_r, part_w, flags_r, dcarry_r, alpha, skips, T: int,
          formula: int, scale: float, fallback: float, beta: float, dtype: torch.dtype, aligned: bool,
          ema_in_param_dtype: bool) -> None:
    """Finish the EMA update the last step left pending (grid = tiles; θ through `theta`,
    an int64 table of θ addresses)."""
    size = torch.empty(0, dtype=dtype).element_size()
    vec, block, iters = launch_shape(size, aligned, size if ema_in_param_dtype else 4)
    scale, fallback, beta = f32_scalars(scale, fallback, beta)
    if n_tiles:
        _fused_flush_kernel[(n_tiles,)](
            tile_tensor, stab, theta, tot_r, part_w, flags_r, dcarry_r, alpha, skips, T, n_tiles, formula, scale,
            fallback, beta, DTYPE=_TL[dtype], ALIGNED=aligned, EMA_IN_PARAM_DTYPE=ema_in_param_dtype, VEC=vec,
            BLOCK=block, ITERS=iters, **LAUNCH,
        )


def pending(tot_r, flags_r, dcarry_r, alpha, skips, alpha_out, skips_out, T: int, formula: int, scale: float,
            fallback: float, beta: float, ema_dtype: torch.dtype) -> None:
    """The decision on the pending update (α, skip count) into alpha_out/skips_out
    (grid = tensors); the EMA and the state are not touched."""
    scale, fallback, beta = f32_scalars(scale, fallback, beta)
    _fused_pending_kernel[(T,)](
        tot_r, flags_r, dcarry_r, alpha, skips, alpha_out, skips_out, T, formula, scale, fallback, beta,
        EMA_DTYPE=_TL[ema_dtype], **PENDING_LAUNCH,
    )


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
    constexprs, launch options, expected 128-bit accesses or None). tests/kernels/test_triton_compile.py
    compiles each for sm_80/sm_90. Of the ema_dtype="param" ones (EMA_IN_PARAM_DTYPE)
    only _PARAM_EMA_SPECS_ALWAYS unless `every` (default: CL_CORE_COMPILE_EVERY_SPEC=1)."""
    if every is None:
        every = os.environ.get("CL_CORE_COMPILE_EVERY_SPEC", "0") not in ("", "0")
    ptr = "*i64"
    step_sig = dict(tile_tensor="*i32", stab=ptr, dyn=ptr, hyper="*fp64", tot_r="*fp32", part_w="*fp32",
                    tot_w="*fp32", ticket="*i32", flags_r="*i32", flags_w="*i32", dcarry_r="*fp32", dcarry_w="*fp32",
                    alpha="*fp32", skips="*i64", T="i32", n_tiles="i32", formula="i32", scale="fp32", fallback="fp32",
                    beta="fp32")
    flush_sig = dict(tile_tensor="*i32", stab=ptr, theta=ptr, tot_r="*fp32", part_w="*fp32", flags_r="*i32",
                     dcarry_r="*fp32", alpha="*fp32", skips="*i64", T="i32", n_tiles="i32", formula="i32",
                     scale="fp32", fallback="fp32", beta="fp32")
    pend_sig = dict(tot_r="*fp32", flags_r="*i32", dcarry_r="*fp32", alpha="*fp32", skips="*i64",
                    alpha_out="*fp32", skips_out="*i64", T="i32", formula="i32", scale="fp32",
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
                vec, block, iters = launch_shape(size, aligned, ema_bytes)
                shape = dict(VEC=vec, BLOCK=block, ITERS=iters)
                tag = "aligned" if aligned else "general"
                ce = dict(DTYPE=tdt, ALIGNED=aligned, EMA_IN_PARAM_DTYPE=param_ema)
                # a 16-bit EMA's partials are float64 (exact norm sums, rounded once)
                part = {"tot_r": "*fp64", "part_w": "*fp64", "tot_w": "*fp64"} if param_ema else {}
                for kind, kname in kinds.items():
                    # Adam reads θ, g, m, v, θ*, g_prev and writes θ, m, v, θ*, g_prev; SGD has no v
                    streams = (3, 2, 2, 2) if kind == L.KIND_SGD else (4, 2, 3, 2)
                    specs.append((f"fused_step/{kname}/{name}{mode}/{tag}", _fused_step_kernel, dict(step_sig, **part),
                                  dict(ce, KIND=kind, CHUNK=CHUNK, **shape), LAUNCH,
                                  expect_v4(vec, *streams, ema_bytes=ema_bytes, param_bytes=size) if aligned else None))
                # the flush reads θ, θ* and writes θ*
                specs.append((f"fused_flush/{name}{mode}/{tag}", _fused_flush_kernel,
                              dict(flush_sig, **{k: v for k, v in part.items() if k in flush_sig}),
                              dict(ce, **shape),
                              LAUNCH, expect_v4(vec, 1, 1, 0, 1, ema_bytes=ema_bytes, param_bytes=size) if aligned else None))
            if param_ema:
                specs.append((f"fused_pending/{name}{mode}", _fused_pending_kernel, dict(pend_sig, tot_r="*fp64"),
                              dict(EMA_DTYPE=tdt), PENDING_LAUNCH, None))
    # every fp32-EMA launch uses this one
    specs.append(("fused_pending", _fused_pending_kernel, pend_sig, dict(EMA_DTYPE=tl.float32),
                  PENDING_LAUNCH, None))
    if not every:
        specs = [s for s in specs if "/param-ema" not in s[0] or s[0] in _PARAM_EMA_SPECS_ALWAYS]
    return specs
