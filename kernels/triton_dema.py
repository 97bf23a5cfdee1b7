"""Triton kernels of the DEMA update and their torch wrapper (the "triton" backend).

All tensors of one (device, dtype) group are handled by each launch: the kernels read
a table of `data_ptr()`s (int64, cast in-kernel with `.to(tl.pointer_type(...))`) and
a block table mapping each program to (tensor, offset). So one update is three
launches whatever the number of LoRA tensors:

    stats   grid = blocks   partial a, b, c and a NaN/inf probe per block
    decide  grid = tensors  sums the partials of its tensor (and the previous step's
                            d partials), computes α on the device, updates flags
    apply   grid = blocks   θ* ← (1−α)θ* + αθ, g_prev ← g, partial d = |θ − θ*|

With a `reduce_stats` hook (sharded parameters) `decide` is split in two around it.
Nothing here reads a device value on the host. Under TRITON_INTERPRET=1 the same
kernels run on CPU tensors, which is how the tests check them.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from cl_core.dema.config import FORMULA_CODE, DEMAConfig
from cl_core.dema.state import GroupState

BLOCK = 1024
CHUNK = 128  # partials summed per loop iteration in `decide`
_MODE_SKIP, _MODE_INIT, _MODE_EMA = 0, 1, 2

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def alpha_rule(a, b, c, d, use_dynamic, scale, fallback, beta, FORMULA: tl.constexpr):
    """α of DESIGN.md §2 from a tensor's sums (same operation order as the reference);
    `use_dynamic` is false where the formula cannot apply (no gradient or no previous one)."""
    if FORMULA == 2:
        al = 1.0 - beta
    else:
        q = (1.0 + b) / (a * c)
        if FORMULA == 0:
            dyn = q * scale
        else:
            dyn = q * d
        dyn = tl.where((dyn > 0.0) & (dyn < 1.0), dyn, fallback)
        al = tl.where(use_dynamic, dyn, fallback)
    return al


@triton.jit
def _dema_stats_kernel(
    blk_tensor, blk_start, numel, dyn_tab, e_tab, gp_tab, partials, T,
    DTYPE: tl.constexpr, NEED_GP: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    t = tl.load(blk_tensor + pid)
    offs = tl.load(blk_start + pid) + tl.arange(0, BLOCK)
    mask = offs < tl.load(numel + t)
    th_ptr = tl.load(dyn_tab + t).to(tl.pointer_type(DTYPE))
    g_ptr = tl.load(dyn_tab + T + t).to(tl.pointer_type(DTYPE))
    # Scalars are broadcast to the block before they enter a mask (the interpreter
    # rejects a scalar-bool & block-bool mask).
    has_g = (tl.load(dyn_tab + 2 * T + t) + tl.zeros([BLOCK], dtype=tl.int64)) != 0
    e_ptr = tl.load(e_tab + t).to(tl.pointer_type(tl.float32))
    th = tl.load(th_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask & has_g, other=0.0).to(tl.float32)
    e = tl.load(e_ptr + offs, mask=mask, other=0.0)
    # x - x is NaN exactly where x is NaN or inf: a cheap finiteness probe.
    probe = tl.sum(th - th, axis=0) + tl.sum(g - g, axis=0)
    a = tl.sum(tl.abs(th - e), axis=0)
    b = tl.sum(tl.abs(g), axis=0)
    c = a * 0.0
    if NEED_GP:
        gp_ptr = tl.load(gp_tab + t).to(tl.pointer_type(tl.float32))
        gprev = tl.load(gp_ptr + offs, mask=mask, other=0.0)
        c = tl.sum(tl.abs(g - gprev), axis=0)
    tl.store(partials + pid * 4 + 0, a)
    tl.store(partials + pid * 4 + 1, b)
    tl.store(partials + pid * 4 + 2, c)
    tl.store(partials + pid * 4 + 3, probe)


@triton.jit
def _dema_decide_kernel(
    blk0, partials, dpart, stats, mode, started, has_prev, d, alpha, skips, dyn_tab, T,
    scale, fallback, beta,
    FORMULA: tl.constexpr, NEED_GP: tl.constexpr, REDUCE: tl.constexpr, DECIDE: tl.constexpr,
    CHUNK: tl.constexpr,
):
    t = tl.program_id(0)
    if REDUCE:
        b_lo = tl.load(blk0 + t)
        b_hi = tl.load(blk0 + t + 1)
        acc_a = tl.zeros([CHUNK], dtype=tl.float32)
        acc_b = tl.zeros([CHUNK], dtype=tl.float32)
        acc_c = tl.zeros([CHUNK], dtype=tl.float32)
        acc_p = tl.zeros([CHUNK], dtype=tl.float32)
        acc_d = tl.zeros([CHUNK], dtype=tl.float32)
        for j in range(b_lo, b_hi, CHUNK):
            idx = j + tl.arange(0, CHUNK)
            m = idx < b_hi
            acc_a += tl.load(partials + idx * 4 + 0, mask=m, other=0.0)
            acc_b += tl.load(partials + idx * 4 + 1, mask=m, other=0.0)
            acc_c += tl.load(partials + idx * 4 + 2, mask=m, other=0.0)
            acc_p += tl.load(partials + idx * 4 + 3, mask=m, other=0.0)
            acc_d += tl.load(dpart + idx, mask=m, other=0.0)
        probe = tl.sum(acc_p, axis=0)
        # d of the previous update lives in its apply's partials, unless that update
        # skipped this tensor (then d keeps its value).
        d_prev = tl.where(tl.load(mode + t) != 0, tl.sum(acc_d, axis=0), tl.load(d + t))
        tl.store(d + t, d_prev)
        tl.store(stats + t * 5 + 0, tl.sum(acc_a, axis=0))
        tl.store(stats + t * 5 + 1, tl.sum(acc_b, axis=0))
        tl.store(stats + t * 5 + 2, tl.sum(acc_c, axis=0))
        tl.store(stats + t * 5 + 3, tl.where(probe != probe, 1.0, 0.0))
        tl.store(stats + t * 5 + 4, d_prev)
    if DECIDE:
        a = tl.load(stats + t * 5 + 0)
        b = tl.load(stats + t * 5 + 1)
        c = tl.load(stats + t * 5 + 2)
        skip = tl.load(stats + t * 5 + 3) > 0
        dv = tl.load(stats + t * 5 + 4)
        st = tl.load(started + t) != 0
        hp = tl.load(has_prev + t) != 0
        hg = tl.load(dyn_tab + 2 * T + t) != 0
        al = alpha_rule(a, b, c, dv, st & hg & hp, scale, fallback, beta, FORMULA)
        tl.store(alpha + t, tl.where(skip, 0.0, al))
        tl.store(mode + t, tl.where(skip, 0, tl.where(st, 2, 1)).to(tl.int8))
        tl.store(skips + t, tl.load(skips + t) + skip.to(tl.int64))
        tl.store(started + t, tl.where(skip, st, True).to(tl.uint8))
        if NEED_GP:
            tl.store(has_prev + t, tl.where(skip, hp, hg).to(tl.uint8))


@triton.jit
def _dema_apply_kernel(
    blk_tensor, blk_start, numel, dyn_tab, e_tab, gp_tab, mode, alpha, dpart, T,
    DTYPE: tl.constexpr, NEED_GP: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    t = tl.load(blk_tensor + pid)
    offs = tl.load(blk_start + pid) + tl.arange(0, BLOCK)
    md = tl.load(mode + t)
    upd = (offs < tl.load(numel + t)) & ((md + tl.zeros([BLOCK], dtype=tl.int8)) != 0)
    th_ptr = tl.load(dyn_tab + t).to(tl.pointer_type(DTYPE))
    e_ptr = tl.load(e_tab + t).to(tl.pointer_type(tl.float32))
    al = tl.load(alpha + t)
    th = tl.load(th_ptr + offs, mask=upd, other=0.0).to(tl.float32)
    e = tl.load(e_ptr + offs, mask=upd, other=0.0)
    e_new = tl.where(md == 2, e * (1.0 - al) + th * al, th)
    tl.store(e_ptr + offs, e_new, mask=upd)
    tl.store(dpart + pid, tl.sum(tl.where(upd, tl.abs(th - e_new), 0.0), axis=0))
    if NEED_GP:
        has_g = (tl.load(dyn_tab + 2 * T + t) + tl.zeros([BLOCK], dtype=tl.int64)) != 0
        g_ptr = tl.load(dyn_tab + T + t).to(tl.pointer_type(DTYPE))
        gp_ptr = tl.load(gp_tab + t).to(tl.pointer_type(tl.float32))
        g = tl.load(g_ptr + offs, mask=upd & has_g, other=0.0).to(tl.float32)
        tl.store(gp_ptr + offs, g, mask=upd & has_g)


class TritonBackend:
    """Runs one (device, dtype) group of the engine through the kernels above."""

    def __init__(self, state: GroupState, config: DEMAConfig, dtype: torch.dtype):
        if dtype not in _TL_DTYPES:
            raise ValueError(f"the triton DEMA backend supports float32/bfloat16/float16 parameters, got {dtype}")
        self.state, self.config, self.dtype = state, config, dtype
        s, dev = state, state.device
        blocks = [(t, start) for t, n in enumerate(s.numels) for start in range(0, n, BLOCK)]
        blk0 = [0]
        for n in s.numels:
            blk0.append(blk0[-1] + (n + BLOCK - 1) // BLOCK)
        self.n_blocks = len(blocks)
        self.blk_tensor = torch.tensor([b[0] for b in blocks], dtype=torch.int32, device=dev)
        self.blk_start = torch.tensor([b[1] for b in blocks], dtype=torch.int64, device=dev)
        self.blk0 = torch.tensor(blk0, dtype=torch.int32, device=dev)
        self.numel = torch.tensor(s.numels, dtype=torch.int64, device=dev)
        self.e_tab = torch.tensor([v.data_ptr() for v in s.ema_views], dtype=torch.int64, device=dev)
        gp_views = s.gprev_views if s.gprev_views is not None else s.ema_views
        self.gp_tab = torch.tensor([v.data_ptr() for v in gp_views], dtype=torch.int64, device=dev)
        self.dyn_tab = torch.zeros(3 * len(s), dtype=torch.int64, device=dev)
        self.partials = torch.zeros(max(1, self.n_blocks) * 4, dtype=torch.float32, device=dev)
        self.dpart = torch.zeros(max(1, self.n_blocks), dtype=torch.float32, device=dev)
        self.stats = torch.zeros(len(s), 5, dtype=torch.float32, device=dev)
        self.mode = torch.zeros(len(s), dtype=torch.int8, device=dev)
        self._dyn_key = None

    def _set_pointers(self, thetas, grads) -> None:
        th = [t.data_ptr() for t in thetas]
        g = [th[i] if x is None else x.data_ptr() for i, x in enumerate(grads)]
        has = [0 if x is None else 1 for x in grads]
        key = (th, g, has)
        if key != self._dyn_key:  # grads are re-created by zero_grad(set_to_none=True)
            self.dyn_tab.copy_(torch.tensor(th + g + has, dtype=torch.int64), non_blocking=True)
            self._dyn_key = key

    def update(self, thetas, grads, reduce_stats=None) -> None:
        s, cfg = self.state, self.config
        for x in list(thetas) + [g for g in grads if g is not None]:
            if not x.is_contiguous() or x.dtype != self.dtype:
                raise ValueError("the triton DEMA backend needs contiguous parameters and gradients of the parameter dtype")
        if len(s) == 0:
            return
        self._set_pointers(thetas, grads)
        dt, need_gp = _TL_DTYPES[self.dtype], s.needs_grad_prev
        gp_tab = self.gp_tab
        if self.n_blocks:
            _dema_stats_kernel[(self.n_blocks,)](
                self.blk_tensor, self.blk_start, self.numel, self.dyn_tab, self.e_tab, gp_tab, self.partials,
                len(s), DTYPE=dt, NEED_GP=need_gp, BLOCK=BLOCK,
            )
        decide_args = (
            self.blk0, self.partials, self.dpart, self.stats, self.mode, s.started, s.has_prev, s.d,
            s.alpha, s.skips, self.dyn_tab, len(s), cfg.scale, cfg.fallback, cfg.beta,
        )
        formula = FORMULA_CODE[cfg.formula]
        if reduce_stats is None:
            _dema_decide_kernel[(len(s),)](
                *decide_args, FORMULA=formula, NEED_GP=need_gp, REDUCE=True, DECIDE=True, CHUNK=CHUNK
            )
        else:
            _dema_decide_kernel[(len(s),)](
                *decide_args, FORMULA=formula, NEED_GP=need_gp, REDUCE=True, DECIDE=False, CHUNK=CHUNK
            )
            reduce_stats(self.stats)
            _dema_decide_kernel[(len(s),)](
                *decide_args, FORMULA=formula, NEED_GP=need_gp, REDUCE=False, DECIDE=True, CHUNK=CHUNK
            )
        if self.n_blocks:
            _dema_apply_kernel[(self.n_blocks,)](
                self.blk_tensor, self.blk_start, self.numel, self.dyn_tab, self.e_tab, gp_tab, self.mode,
                s.alpha, self.dpart, len(s), DTYPE=dt, NEED_GP=need_gp, BLOCK=BLOCK,
            )

    def canonicalize(self) -> None:
        """Fold the pending d partials into state.d (for checkpoints and reads)."""
        s = self.state
        if len(s) == 0 or self.n_blocks == 0:
            return
        sums = torch.zeros(len(s), dtype=torch.float32, device=s.device)
        sums.index_add_(0, self.blk_tensor.long(), self.dpart)
        s.d.copy_(torch.where(self.mode != 0, sums, s.d))
        self.mode.zero_()

    def state_loaded(self) -> None:
        """A checkpoint was written into the shared state: drop pending partials."""
        self.mode.zero_()
        self.dpart.zero_()
