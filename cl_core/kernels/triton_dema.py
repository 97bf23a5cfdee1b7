"""Triton kernels of the DEMA update and their launchers (the engine's "triton" backend,
cl_core/dema/twopass/triton_backend.py, builds the tables and calls them).

All tensors of one (device, dtype) group are handled by each launch: the kernels read
a table of `data_ptr()`s (int64, cast in-kernel with `.to(tl.pointer_type(...))`) and
a block table mapping each program to its tensor. So one update is three launches
whatever the number of LoRA tensors:

    stats   grid = blocks   partial a, b, c and a NaN/inf probe per block
    decide  grid = tensors  sums the partials of its tensor (and the previous step's
                            d partials), computes α on the device, updates flags
    apply   grid = blocks   θ* ← (1−α)θ* + αθ, g_prev ← g, partial d = |θ − θ*|

θ* and g_prev are float32, or with DEMAConfig(ema_dtype="param") the parameter dtype
(EMA_DTYPE, a compile-time constant of each kernel): then every difference, product and
sum is rounded to that dtype as the reference computes it (and the native CPU kernel,
csrc/dema_cpu.c DEFINE_PARAM_FN), the official code's 16-bit arithmetic op for op:
|round(θ − θ*)| before the sums, the per-tensor totals summed exactly in float64 (block
partials and their sum) and rounded once to the dtype (`round_sum`), α's four operations
rounded (`alpha_rule`), θ* ← round(round(θ*·(1−α)) + round(θ·α)), the first update the
official copy followed by the fallback update. Rounding is `round_to` below, the same
arithmetic compiled and interpreted.

With a `reduce_stats` hook (sharded parameters) `decide` is split in two around it.
Nothing here reads a device value on the host. Under TRITON_INTERPRET=1 the same
kernels run on CPU tensors, which is how the tests check them.

The sweeping kernels (stats, apply) take ALIGNED (every address 16-byte aligned and
every numel a multiple of the vector width, checked on the host per update): with it
each thread's VEC elements are one 128-bit access (tests/kernels/test_triton_compile.py checks
the PTX for sm_80 and sm_90); without it the same kernels run unhinted on any layout.
"""
from __future__ import annotations

import struct

import torch
import triton
import triton.language as tl

from cl_core.kernels import layouts as L

# Launch shape of the sweeping kernels: VEC = 16 bytes / element size elements per
# thread (one 128-bit θ/g access; θ*, g_prev are fp32: one or two, or in the parameter
# dtype with ema_dtype="param": one), 4 warps. Compiled, stats and apply use 26-53
# registers per thread, no spills (tests/kernels/test_triton_compile.py): 10-16 blocks per SM,
# 62-100% occupancy on A100/H100, so registers never limit these one-pass kernels
# (ema_dtype="param": 35-45 aligned, up to 60 on the general path, >= 8 blocks, 50%);
# BLOCK elements per program (512 fp32, 1,024 16-bit) keep a LoRA step at tens of
# thousands of programs, enough to fill any GPU.
NUM_WARPS = 4
# `decide` sums a tensor's block partials CHUNK rows per loop iteration, one program (of
# DECIDE_WARPS warps) per tensor: row r of the accumulator tile takes rows r, r + CHUNK,
# r + 2·CHUNK, ... in that order, then one tree sum: a fixed order, the same bits run to run.
# Each iteration is about one memory latency (the loads feed the sums), so the iteration
# count is the cost: a 2^27-element fp32 tensor has 262,144 blocks, 256 iterations at
# 1,024 rows (it was 2,048 at 128 rows and one warp: an estimated +40-80 % on that
# tensor's update, issue 28). 8 warps keep the tile at 16 values per thread (32 registers
# in float64). At LoRA sizes (a few blocks per tensor) the wider masked tile is noise;
# `make gpu-check` times decide on a 2^27-element tensor.
CHUNK = 1024
DECIDE_WARPS = 8
# enable_fp_fusion=False: no multiply-add is contracted into an FMA, stated here rather
# than left to Triton's default (which Triton has announced will change): compiled code
# then rounds every product and sum as the interpreter, the reference and torch's
# unfused CPU maths do. Free in these memory-bound kernels.
SWEEP_LAUNCH = {"num_warps": NUM_WARPS, "maxnreg": 128, "enable_fp_fusion": False}  # maxnreg: ptxas's budget
DECIDE_LAUNCH = {"num_warps": DECIDE_WARPS, "enable_fp_fusion": False}
# Block shapes must be compile-time constants: Triton < 3.8 rejects a plain module int in
# `tl.zeros([CHUNK, N])` ("'int' object has no attribute 'type'"), so the layout widths
# used as shapes are bound as tl.constexpr.
N_STAT: tl.constexpr = tl.constexpr(L.N_STAT)
# decide's two halves (REDUCE, DECIDE): both at once, or split around a reduce_stats hook;
# the reducing half alone also folds d for a read of the state (canonicalize)
DECIDE_ALL, DECIDE_REDUCE_ONLY, DECIDE_ONLY = (True, True), (True, False), (False, True)


def launch_shape(elem_size: int, ema_size: int = 4) -> tuple[int, int]:
    """(VEC, BLOCK) for parameters of `elem_size` bytes and θ*/g_prev of `ema_size` bytes:
    VEC = what one 128-bit access of the widest stream holds (16-bit parameters with a
    float32 EMA: 4, so that θ, g and θ*, g_prev share one layout and no value goes through
    shared memory between them; see triton_fused.launch_shape)."""
    vec = 16 // max(elem_size, ema_size)
    return vec, vec * 32 * NUM_WARPS


@triton.jit
def alpha_rule(a, b, c, d, use_dynamic, formula, scale, fallback, beta, EMA_DTYPE: tl.constexpr):
    """α of docs/design.md §2 from a tensor's sums (same operation order as the reference);
    `use_dynamic` is false where the formula cannot apply (no gradient or no previous
    one). `formula` is a runtime value (FORMULA_*): a few scalar operations per program.
    With a 16-bit EMA_DTYPE (ema_dtype="param") every result is rounded to it, as the
    official code's 16-bit tensor ops (csrc/dema_common.h decide_alpha, state.py
    dynamic_alpha): t1 = 1 + b, t2 = a·c, q = t1 / t2, α = q · (scale or d). The
    launchers hand the scalars over as float32 values (`f32_scalars`)."""
    # IEEE division (`/` compiles to div.full.f32, 2 ulp)
    q = round_to(tl.div_rn(round_to(1.0 + b, EMA_DTYPE), round_to(a * c, EMA_DTYPE)), EMA_DTYPE)
    dyn = round_to(tl.where(formula == L.FORMULA_OFFICIAL, q * scale, q * d), EMA_DTYPE)
    dyn = tl.where((dyn > 0.0) & (dyn < 1.0), dyn, fallback)
    al = tl.where(use_dynamic, dyn, fallback)
    return tl.where(formula == L.FORMULA_FIXED, 1.0 - beta, al)


@triton.jit
def round_to(x, EMA_DTYPE: tl.constexpr):
    """float32 x rounded to EMA_DTYPE (to nearest, ties to even), as a float32: the
    arithmetic of the reference in that dtype. A no-op for float32. bfloat16 by integer
    arithmetic (the C kernel's f32_to_bf16): the Triton interpreter truncates on a
    float32 -> bfloat16 cast where a GPU rounds, and the tests run the interpreter, so
    the one formula below is what both run. NaN stays NaN."""
    if EMA_DTYPE == tl.bfloat16:
        u = x.to(tl.uint32, bitcast=True)
        r = ((u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
        return tl.where(x != x, x, r)
    elif EMA_DTYPE == tl.float16:
        return x.to(tl.float16).to(tl.float32)  # numpy rounds as the GPU does here
    else:
        return x


@triton.jit
def round_sum(x, EMA_DTYPE: tl.constexpr):
    """A sum of a norm as the statistic: float32 x as it is (float32 EMA), or float64 x
    rounded ONCE to a 16-bit EMA_DTYPE (ema_dtype="param"), as float32. float64 -> float32
    rounds to odd (truncate; set the last bit when inexact), then round_to rounds to
    nearest even: the correct single rounding (a plain cast first could round twice), the
    rule of csrc/dema_common.h round_sum16 and state.py round_sum."""
    if EMA_DTYPE == tl.float32:
        return x
    else:
        f = x.to(tl.float32)
        f64 = f.to(tl.float64)
        inexact = (f64 != x) & (x == x)
        toward_zero = inexact & (tl.abs(f64) > tl.abs(x))
        u = f.to(tl.uint32, bitcast=True)
        u = (u - toward_zero.to(tl.uint32)) | inexact.to(tl.uint32)
        return round_to(u.to(tl.float32, bitcast=True), EMA_DTYPE)


@triton.jit
def to_f32(x):
    """x (float32, bfloat16 or float16) as float32, exactly. bfloat16 by moving its bits
    (an integer shift, what the hardware conversion does): the interpreter's bfloat16 ->
    float32 cast gets subnormals wrong (1.0e-39 -> 4.4e-39)."""
    if x.dtype == tl.bfloat16:
        return (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return x.to(tl.float32)


@triton.jit
def to_rtne(x, DTYPE: tl.constexpr):
    """float32 x converted to DTYPE, rounded to nearest (ties to even) in the interpreter
    and compiled alike: `fp_downcast_rounding="rtne"` is ignored by the interpreter,
    which truncates on float32 -> bfloat16 (1.999 -> 1.9921875 where a GPU and torch give
    2.0), so bfloat16 is rounded by round_to's integer arithmetic first and the cast is
    then exact. The bits are moved by integer bitcasts, not a float cast: the interpreter's
    float32 -> bfloat16 cast also flushes subnormals to zero (1e-40 -> 0, a GPU and torch
    keep 9.18e-41). float16 casts round to nearest in both already."""
    if DTYPE == tl.bfloat16:
        u = round_to(x, tl.bfloat16).to(tl.uint32, bitcast=True)
        return (u >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DTYPE)


@triton.jit
def _bcast(flag, BLOCK: tl.constexpr):
    """A per-tensor scalar switch as a [BLOCK] mask. The interpreter rejects a scalar
    bool combined with a block mask; compiled, this folds away."""
    return (tl.zeros([BLOCK], dtype=tl.int32) + flag.to(tl.int32)) != 0


@triton.jit
def _block_of_program(blk_tensor, blk0, BLOCK: tl.constexpr):
    """(t, start): this program's tensor and the 64-bit element offset of its block. In
    int32, (pid − blk0)·BLOCK wraps at 2^31 elements (a stacked MoE weight, a large
    embedding) and the mask would still pass: the offset is formed in int64, once per
    program, and the pointers are advanced by it, so the per-element offsets stay 32-bit."""
    pid = tl.program_id(0)
    t = tl.load(blk_tensor + pid)
    start = (pid - tl.load(blk0 + t)).to(tl.int64) * BLOCK
    return t, start


@triton.jit
def _block_pointers(blk_tensor, blk0, numel, dyn_tab, e_tab, gp_tab, T, DTYPE: tl.constexpr,
                    EMA_DTYPE: tl.constexpr, ALIGNED: tl.constexpr, VEC: tl.constexpr,
                    BLOCK: tl.constexpr):
    """This program's block of its tensor t: (t, offsets, rem, θ, g, has_g, θ*, g_prev
    pointers), the pointers at the block's first element, offsets 0..BLOCK−1 and `rem`
    the elements left in the tensor from there (mask: offs < rem). On the ALIGNED path
    the addresses and sizes carry the alignment and contiguity the host checked, so the
    compiler emits 128-bit accesses."""
    t, start = _block_of_program(blk_tensor, blk0, BLOCK)
    # at most BLOCK matter: the clamp makes the remainder a 32-bit number
    rem = tl.minimum(tl.load(numel + t) - start, BLOCK).to(tl.int32)
    th_ptr = tl.load(dyn_tab + L.DT_PARAM * T + t).to(tl.pointer_type(DTYPE)) + start
    g_ptr = tl.load(dyn_tab + L.DT_GRAD * T + t).to(tl.pointer_type(DTYPE)) + start
    has_g = tl.load(dyn_tab + L.DT_HAS_GRAD * T + t) != 0
    e_ptr = tl.load(e_tab + t).to(tl.pointer_type(EMA_DTYPE)) + start
    gp_ptr = tl.load(gp_tab + t).to(tl.pointer_type(EMA_DTYPE)) + start
    offs = tl.arange(0, BLOCK)
    if ALIGNED:
        # start is a multiple of BLOCK (a multiple of VEC): the advanced addresses keep
        # the 16-byte alignment of the tensors'
        th_ptr = tl.multiple_of(th_ptr, 16)
        g_ptr = tl.multiple_of(g_ptr, 16)
        e_ptr = tl.multiple_of(e_ptr, 16)
        gp_ptr = tl.multiple_of(gp_ptr, 16)
        rem = tl.multiple_of(rem, VEC)
        offs = tl.max_contiguous(tl.multiple_of(offs, BLOCK), BLOCK)
    return t, offs, rem, th_ptr, g_ptr, has_g, e_ptr, gp_ptr


@triton.jit(do_not_specialize=["T", "need_gp"])
def _dema_stats_kernel(
    blk_tensor, blk0, numel, dyn_tab, e_tab, gp_tab, partials, T, need_gp,
    DTYPE: tl.constexpr, EMA_DTYPE: tl.constexpr, ALIGNED: tl.constexpr, VEC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    t, offs, rem, th_ptr, g_ptr, has_g, e_ptr, gp_ptr = _block_pointers(
        blk_tensor, blk0, numel, dyn_tab, e_tab, gp_tab, T, DTYPE, EMA_DTYPE, ALIGNED, VEC, BLOCK)
    mask = offs < rem
    th = to_f32(tl.load(th_ptr + offs, mask=mask, other=0.0))
    g = to_f32(tl.load(g_ptr + offs, mask=mask & _bcast(has_g, BLOCK), other=0.0))
    e = to_f32(tl.load(e_ptr + offs, mask=mask, other=0.0))
    gprev = to_f32(tl.load(gp_ptr + offs, mask=mask & _bcast(need_gp != 0, BLOCK), other=0.0))
    row = partials + pid * L.N_STAT
    # x - x is NaN exactly where x is NaN or inf: a cheap finiteness probe.
    tl.store(row + L.ST_PROBE, tl.sum(th - th, axis=0) + tl.sum(g - g, axis=0))
    # block sums of the (rounded) |differences|, float32 or (16-bit EMA) float64: exact,
    # decide rounds the totals once
    ACC: tl.constexpr = tl.float32 if EMA_DTYPE == tl.float32 else tl.float64
    tl.store(row + L.ST_A, tl.sum(tl.abs(round_to(th - e, EMA_DTYPE)).to(ACC), axis=0))
    tl.store(row + L.ST_B, tl.sum(tl.abs(g).to(ACC), axis=0))
    tl.store(row + L.ST_C, tl.where(need_gp != 0, tl.sum(tl.abs(round_to(g - gprev, EMA_DTYPE)).to(ACC), axis=0), 0.0))


@triton.jit(do_not_specialize=["T", "formula", "need_gp"])
def _dema_decide_kernel(
    blk0, partials, dpart, stats, mode, started, has_prev, d, alpha, skips, dyn_tab, T,
    formula, need_gp, scale, fallback, beta,
    REDUCE: tl.constexpr, DECIDE: tl.constexpr, CHUNK: tl.constexpr, EMA_DTYPE: tl.constexpr,
):
    t = tl.program_id(0)
    if REDUCE:
        b_lo = tl.load(blk0 + t)
        b_hi = tl.load(blk0 + t + 1)
        rows = tl.arange(0, CHUNK)[:, None]
        cols = tl.arange(0, N_STAT)[None, :]
        ACC: tl.constexpr = tl.float32 if EMA_DTYPE == tl.float32 else tl.float64
        acc = tl.zeros([CHUNK, N_STAT], dtype=ACC)
        acc_d = tl.zeros([CHUNK], dtype=ACC)
        for j in range(b_lo, b_hi, CHUNK):
            idx = j + rows
            acc += tl.load(partials + idx * L.N_STAT + cols, mask=(idx < b_hi) & (cols >= 0), other=0.0)
            idx1 = j + tl.arange(0, CHUNK)
            acc_d += tl.load(dpart + idx1, mask=idx1 < b_hi, other=0.0)
        s = tl.sum(acc, axis=0)
        c1 = tl.arange(0, N_STAT)
        probe = tl.sum(tl.where(c1 == L.ST_PROBE, s, 0.0), axis=0).to(tl.float32)
        # d of the previous update lives in its apply's partials, unless that update
        # skipped this tensor (then d keeps its value). Norms are numbers of the EMA
        # dtype (ema_dtype="param": the float32 totals rounded to it).
        d_new = round_sum(tl.sum(acc_d, axis=0), EMA_DTYPE)
        md = tl.load(mode + t)
        # d is read only where it is kept: the flush's fold hands a fresh (uninitialised)
        # d and never skips; compute-sanitizer's initcheck flagged the unmasked read
        d_prev = tl.where(md != L.MODE_SKIP, d_new, tl.load(d + t, mask=md == L.MODE_SKIP, other=0.0))
        tl.store(d + t, d_prev)
        out = stats + t * L.N_DSTAT
        tl.store(out + L.DS_A, round_sum(tl.sum(tl.where(c1 == L.ST_A, s, 0.0), axis=0), EMA_DTYPE))
        tl.store(out + L.DS_B, round_sum(tl.sum(tl.where(c1 == L.ST_B, s, 0.0), axis=0), EMA_DTYPE))
        tl.store(out + L.DS_C, round_sum(tl.sum(tl.where(c1 == L.ST_C, s, 0.0), axis=0), EMA_DTYPE))
        tl.store(out + L.DS_NONFINITE, tl.where(probe != probe, 1.0, 0.0))
        tl.store(out + L.DS_D, d_prev)
    if DECIDE:
        row = stats + t * L.N_DSTAT
        skip = tl.load(row + L.DS_NONFINITE) > 0
        st = tl.load(started + t) != 0
        hp = tl.load(has_prev + t) != 0
        hg = tl.load(dyn_tab + L.DT_HAS_GRAD * T + t) != 0
        al = alpha_rule(tl.load(row + L.DS_A), tl.load(row + L.DS_B), tl.load(row + L.DS_C), tl.load(row + L.DS_D),
                        st & hg & hp, formula, scale, fallback, beta, EMA_DTYPE)
        tl.store(alpha + t, tl.where(skip, 0.0, al))
        tl.store(mode + t, tl.where(skip, L.MODE_SKIP, tl.where(st, L.MODE_EMA, L.MODE_INIT)).to(tl.int8))
        tl.store(skips + t, tl.load(skips + t) + skip.to(tl.int64))
        tl.store(started + t, tl.where(skip, st, True).to(tl.uint8))
        tl.store(has_prev + t, tl.where(need_gp == 0, hp, tl.where(skip, hp, hg)).to(tl.uint8))


@triton.jit(do_not_specialize=["T", "need_gp"])
def _dema_apply_kernel(
    blk_tensor, blk0, numel, dyn_tab, e_tab, gp_tab, mode, alpha, dpart, T, need_gp,
    DTYPE: tl.constexpr, EMA_DTYPE: tl.constexpr, ALIGNED: tl.constexpr, VEC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    t, offs, rem, th_ptr, g_ptr, has_g, e_ptr, gp_ptr = _block_pointers(
        blk_tensor, blk0, numel, dyn_tab, e_tab, gp_tab, T, DTYPE, EMA_DTYPE, ALIGNED, VEC, BLOCK)
    md = tl.load(mode + t)
    upd = (offs < rem) & _bcast(md != L.MODE_SKIP, BLOCK)
    al = tl.load(alpha + t)
    om = 1.0 - al  # float32, as the C kernels
    th = to_f32(tl.load(th_ptr + offs, mask=upd, other=0.0))
    e = to_f32(tl.load(e_ptr + offs, mask=upd, other=0.0))
    is_ema = _bcast(md == L.MODE_EMA, BLOCK)
    if EMA_DTYPE == tl.float32:
        # θ*·(1−α) + θ·α; the first update (MODE_INIT) copies θ
        e_new = tl.where(is_ema, e * om + th * al, th)
    else:
        # in the EMA dtype each product and the sum rounded to it; the first update is the
        # official deepcopy of θ followed by its fallback update (α = the fallback here)
        e = tl.where(is_ema, e, th)
        e_new = round_to(round_to(e * om, EMA_DTYPE) + round_to(th * al, EMA_DTYPE), EMA_DTYPE)
    tl.store(e_ptr + offs, to_rtne(e_new, EMA_DTYPE), mask=upd)  # exact: e_new is a value of EMA_DTYPE
    ACC: tl.constexpr = tl.float32 if EMA_DTYPE == tl.float32 else tl.float64
    tl.store(dpart + pid, tl.sum(tl.where(upd, tl.abs(round_to(th - e_new, EMA_DTYPE)), 0.0).to(ACC), axis=0))
    gm = upd & _bcast(has_g & (need_gp != 0), BLOCK)
    g = tl.load(g_ptr + offs, mask=gm, other=0.0)
    tl.store(gp_ptr + offs, to_rtne(to_f32(g), EMA_DTYPE), mask=gm)


def f32_scalars(*values: float) -> tuple:
    """Python floats rounded to float32: what a compiled kernel's fp32 argument holds. The
    interpreter keeps a Python float argument as a double, so without this its scalar
    arithmetic (1 − β, α · 1.0) would run in double where the GPU's runs in float32."""
    return tuple(struct.unpack("f", struct.pack("f", v))[0] for v in values)


_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
DTYPES = tuple(_TL_DTYPES)  # parameter dtypes the kernels take


# ---------------------------------------------------------------------- launchers
# Each takes the group's tables and state arrays as tensors and the config as scalars;
# the engine's triton backend (cl_core/dema/twopass/triton_backend.py) owns and fills them.
def dema_stats(n_blocks: int, blk_tensor, blk0, numel, dyn_tab, e_tab, gp_tab, partials, T: int, need_gp: int,
               dtype: torch.dtype, ema_dtype: torch.dtype, aligned: bool, vec: int, block: int) -> None:
    """Partial a, b, c and the NaN/inf probe of every block (grid = blocks)."""
    if n_blocks:
        _dema_stats_kernel[(n_blocks,)](
            blk_tensor, blk0, numel, dyn_tab, e_tab, gp_tab, partials, T, need_gp,
            DTYPE=_TL_DTYPES[dtype], EMA_DTYPE=_TL_DTYPES[ema_dtype], ALIGNED=aligned, VEC=vec, BLOCK=block,
            **SWEEP_LAUNCH,
        )


def dema_decide(blk0, partials, dpart, stats, mode, started, has_prev, d, alpha, skips, dyn_tab, T: int,
                need_gp: int, formula: int, scale: float, fallback: float, beta: float, reduce: bool, decide: bool,
                ema_dtype: torch.dtype) -> None:
    """Per tensor (grid = tensors): sum its partials (reduce) and/or decide α and the flags
    (decide); see DECIDE_*."""
    # the reducing half rounds the totals, the deciding half α's arithmetic, to the EMA dtype
    scale, fallback, beta = f32_scalars(scale, fallback, beta)
    _dema_decide_kernel[(T,)](
        blk0, partials, dpart, stats, mode, started, has_prev, d, alpha, skips, dyn_tab, T, formula, need_gp,
        scale, fallback, beta, REDUCE=reduce, DECIDE=decide, CHUNK=CHUNK, EMA_DTYPE=_TL_DTYPES[ema_dtype],
        **DECIDE_LAUNCH,
    )


def dema_apply(n_blocks: int, blk_tensor, blk0, numel, dyn_tab, e_tab, gp_tab, mode, alpha, dpart, T: int,
               need_gp: int, dtype: torch.dtype, ema_dtype: torch.dtype, aligned: bool, vec: int, block: int) -> None:
    """θ* ← (1−α)θ* + αθ, g_prev ← g and the partial d of every block (grid = blocks)."""
    if n_blocks:
        _dema_apply_kernel[(n_blocks,)](
            blk_tensor, blk0, numel, dyn_tab, e_tab, gp_tab, mode, alpha, dpart, T, need_gp,
            DTYPE=_TL_DTYPES[dtype], EMA_DTYPE=_TL_DTYPES[ema_dtype], ALIGNED=aligned, VEC=vec, BLOCK=block,
            **SWEEP_LAUNCH,
        )


def expect_v4(vec: int, param_loads: int, ema_loads: int, param_stores: int, ema_stores: int,
              ema_bytes: int = 4, param_bytes: int = 4) -> dict:
    """Vector accesses per loop iteration of an ALIGNED sweep, VEC elements per thread and
    stream: a stream of VEC·size = 16 bytes is one 128-bit access (ld/st.global.v4.b32), of
    8 bytes one 64-bit access (v2.b32: 16-bit parameters beside a float32 EMA, VEC = 4),
    of 32 bytes two 128-bit ones. Keys ld_v4, st_v4, ld_v2, st_v2."""
    out = {"ld_v4": 0, "st_v4": 0, "ld_v2": 0, "st_v2": 0}
    for size, loads, stores in ((param_bytes, param_loads, param_stores), (ema_bytes, ema_loads, ema_stores)):
        width = vec * size
        key, per = ("v2", 1) if width == 8 else ("v4", width // 16)
        out[f"ld_{key}"] += loads * per
        out[f"st_{key}"] += stores * per
    return out


def compile_specs():
    """Every specialisation the launcher above can produce: (name, kernel, signature,
    constexprs, launch options, expected 128-bit accesses or None). tests/kernels/test_triton_compile.py
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
        size = torch.empty(0, dtype=dtype).element_size()
        name = str(dtype).replace("torch.", "")
        # float32 θ*/g_prev for every dtype; ema_dtype="param" keeps them in a 16-bit dtype
        for ema_tdt, ema_bytes, ema_tag in [(tl.float32, 4, "")] + ([(tdt, size, "ema=param/")] if size == 2 else []):
            vec, block = launch_shape(size, ema_bytes)
            for aligned in (True, False):
                tag = "aligned" if aligned else "general"
                ce = dict(DTYPE=tdt, EMA_DTYPE=ema_tdt, ALIGNED=aligned, VEC=vec, BLOCK=block)
                # a 16-bit EMA's partial sums are float64 (exact norm sums, rounded once)
                st_sig = stats_sig if ema_tdt == tl.float32 else dict(stats_sig, partials="*fp64")
                ap_sig = apply_sig if ema_tdt == tl.float32 else dict(apply_sig, dpart="*fp64")
                # stats reads θ, g, θ*, g_prev; apply reads θ, g, θ* and writes θ*, g_prev
                specs.append((f"dema_stats/{name}/{ema_tag}{tag}", _dema_stats_kernel, st_sig, ce, SWEEP_LAUNCH,
                              expect_v4(vec, 2, 2, 0, 0, ema_bytes, size) if aligned else None))
                specs.append((f"dema_apply/{name}/{ema_tag}{tag}", _dema_apply_kernel, ap_sig, ce, SWEEP_LAUNCH,
                              expect_v4(vec, 2, 1, 0, 2, ema_bytes, size) if aligned else None))
    for red, dec in (DECIDE_ALL, DECIDE_REDUCE_ONLY, DECIDE_ONLY):
        # a 16-bit EMA (ema_dtype="param"): float64 partials (exact norm sums), the totals
        # and α's arithmetic rounded to that dtype
        for ema_tdt, ema_tag in ((tl.float32, ""), (tl.bfloat16, "/ema=bfloat16"), (tl.float16, "/ema=float16")):
            sig = decide_sig if ema_tdt == tl.float32 else dict(decide_sig, partials="*fp64", dpart="*fp64")
            specs.append((f"dema_decide/reduce={int(red)}/decide={int(dec)}{ema_tag}", _dema_decide_kernel,
                          sig, dict(REDUCE=red, DECIDE=dec, CHUNK=CHUNK, EMA_DTYPE=ema_tdt), DECIDE_LAUNCH,
                          None))
    return specs
