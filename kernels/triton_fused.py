"""Triton kernel of the one-pass optimizer step + DEMA (one launch per step).

Each program sweeps one tile (TILE elements) of one tensor. Per element it finishes the
previous step's EMA update, applies Adam/AdamW/SGD exactly as torch orders the maths,
and accumulates this step's statistics (a, b, c, NaN probe) and d for the tile.

Per-tensor decisions need the whole tensor's statistics, which the previous launch
left as per-tile partials: every program of a tensor sums them itself (a few dozen
loads), so no second launch is needed. Per-tensor flags are double-buffered by step
parity (read [1−p], written [p] by the tensor's first tile), so no program reads what
another program of the same launch writes. The engine's canonical state (started,
has_prev, d, alpha, skips) is written by `flush` (two launches, only when the EMA is
read); `alpha` and `skips` are kept current by every step.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from cl_core.kernels.triton_dema import alpha_rule

BLOCK = 1024
ITERS = 16  # a tile is BLOCK * ITERS elements: few partials per tensor
TILE = BLOCK * ITERS
CHUNK = 64

_TL = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
# Double-buffered per-tensor flags: rows of `flags` (int32 [2, 6, T]); the kernels
# index them by these numbers written out.
F_STARTED, F_HAS_PREV, F_PEND, F_PEND_G, F_PEND_P, F_APPLIED = range(6)
PEND_NONE, PEND_INIT, PEND_EMA = 0, 1, 2


@triton.jit
def _sum_tiles(part, t0, t1, col, CHUNK: tl.constexpr):
    acc = tl.zeros([CHUNK], dtype=tl.float32)
    for j in range(t0, t1, CHUNK):
        idx = j + tl.arange(0, CHUNK)
        acc += tl.load(part + idx * 5 + col, mask=idx < t1, other=0.0)
    return tl.sum(acc, axis=0)


@triton.jit
def _pending_alpha(part_r, flags_r, dcarry_r, tile_tensor, tile_start, tile0, numel, T, scale, fallback, beta,
                   FORMULA: tl.constexpr, CHUNK: tl.constexpr):
    """This program's tile (t, start, n, t0, t1) and the decision on the update the
    previous launch left pending: (apply, alpha, skip, d_in, pend)."""
    pid = tl.program_id(0)
    t = tl.load(tile_tensor + pid)
    start = tl.load(tile_start + pid)
    n = tl.load(numel + t)
    t0 = tl.load(tile0 + t)
    t1 = tl.load(tile0 + t + 1)
    pend = tl.load(flags_r + 2 * T + t)
    applied = tl.load(flags_r + 5 * T + t)
    d_in = tl.where(applied != 0, _sum_tiles(part_r, t0, t1, 4, CHUNK), tl.load(dcarry_r + t))
    a = _sum_tiles(part_r, t0, t1, 0, CHUNK)
    b = _sum_tiles(part_r, t0, t1, 1, CHUNK)
    c = _sum_tiles(part_r, t0, t1, 2, CHUNK)
    probe = _sum_tiles(part_r, t0, t1, 3, CHUNK)
    skip = (pend != 0) & (probe != probe)
    use = (tl.load(flags_r + 3 * T + t) != 0) & (tl.load(flags_r + 4 * T + t) != 0)
    al = alpha_rule(a, b, c, d_in, use, scale, fallback, beta, FORMULA)
    apply = (pend == 2) & (probe == probe)
    return pid, t, start, n, t0, t1, apply, al, skip, d_in, pend


@triton.jit
def _record_decision(alpha, skips, t, apply, al, skip, pend, fallback, beta, FORMULA: tl.constexpr):
    """Canonical α (0 when skipped; the start value after an init) and skip count of tensor t."""
    if FORMULA == 2:
        init_alpha = 1.0 - beta
    else:
        init_alpha = fallback
    new_alpha = tl.where(skip, 0.0, tl.where(apply, al, tl.where(pend == 1, init_alpha, tl.load(alpha + t))))
    tl.store(alpha + t, new_alpha)
    tl.store(skips + t, tl.load(skips + t) + skip.to(tl.int64))


@triton.jit
def _fused_step_kernel(
    tile_tensor, tile_start, tile0, numel, dyn, e_tab, gp_tab, hyper,
    part_r, part_w, flags_r, flags_w, dcarry_r, dcarry_w, alpha, skips, T,
    scale, fallback, beta,
    DTYPE: tl.constexpr, KIND: tl.constexpr, FORMULA: tl.constexpr, NEED_GP: tl.constexpr,
    BLOCK: tl.constexpr, ITERS: tl.constexpr, CHUNK: tl.constexpr,
):
    pid, t, start, n, t0, t1, apply, al, skip, d_in, pend = _pending_alpha(
        part_r, flags_r, dcarry_r, tile_tensor, tile_start, tile0, numel, T, scale, fallback, beta, FORMULA, CHUNK
    )
    # An init left pending becomes "started" once its probe shows it was finite.
    started = (tl.load(flags_r + 0 * T + t) != 0) | ((pend == 1) & (skip == 0))
    init_now = started == 0
    hp = tl.load(flags_r + 1 * T + t) != 0
    th_ptr = tl.load(dyn + t).to(tl.pointer_type(DTYPE))
    g_ptr = tl.load(dyn + T + t).to(tl.pointer_type(DTYPE))
    m_ptr = tl.load(dyn + 2 * T + t).to(tl.pointer_type(DTYPE))
    v_ptr = tl.load(dyn + 3 * T + t).to(tl.pointer_type(DTYPE))
    has_g_s = tl.load(dyn + 4 * T + t)
    e_ptr = tl.load(e_tab + t).to(tl.pointer_type(tl.float32))
    gp_ptr = tl.load(gp_tab + t).to(tl.pointer_type(tl.float32))
    # Hyper-parameters arrive in fp64; derived scalars are rounded to fp32 the way
    # torch rounds a Python scalar for an fp32 tensor op.
    h0 = tl.load(hyper + t * 8 + 0)
    h1 = tl.load(hyper + t * 8 + 1)
    h2 = tl.load(hyper + t * 8 + 2)
    h3 = tl.load(hyper + t * 8 + 3)
    lr = h0.to(tl.float32)
    wd = h1.to(tl.float32)
    decay = (1.0 - h0 * h1).to(tl.float32)
    c2 = h2.to(tl.float32)  # SGD momentum / Adam beta1
    w1 = (1.0 - h2).to(tl.float32)
    c3 = h3.to(tl.float32)  # SGD dampening / Adam beta2
    w3 = (1.0 - h3).to(tl.float32)
    h4 = tl.load(hyper + t * 8 + 4).to(tl.float32)  # SGD nesterov / Adam eps
    h5 = tl.load(hyper + t * 8 + 5).to(tl.float32)  # SGD first step / Adam step size
    h6 = tl.load(hyper + t * 8 + 6).to(tl.float32)  # Adam sqrt(bias correction 2)
    need = ((init_now == 0) & (has_g_s != 0) & hp).to(tl.int32)
    if not NEED_GP:
        need = need * 0
    if FORMULA == 2:
        need = need * 0
    zb = tl.zeros([BLOCK], dtype=tl.int32)
    apply_b = (zb + apply.to(tl.int32)) != 0
    init_b = (zb + init_now.to(tl.int32)) != 0
    has_g = (zb + has_g_s.to(tl.int32)) != 0
    need_b = (zb + need) != 0
    # SGD switches, as blocks (the interpreter mishandles scalar comparisons in masks)
    zf = tl.zeros([BLOCK], dtype=tl.float32)
    mom_b = (zf + c2) != 0.0
    first_b = (zf + h5) != 0.0
    nest_b = (zf + h4) != 0.0
    sa = tl.zeros([BLOCK], dtype=tl.float32)
    sb = tl.zeros([BLOCK], dtype=tl.float32)
    sc = tl.zeros([BLOCK], dtype=tl.float32)
    sd = tl.zeros([BLOCK], dtype=tl.float32)
    probe = tl.zeros([BLOCK], dtype=tl.float32)
    for it in range(ITERS):
        offs = start + it * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        th = tl.load(th_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        e = tl.load(e_ptr + offs, mask=mask, other=0.0)
        e = tl.where(apply_b, e * (1.0 - al) + th * al, e)
        sd += tl.where(apply_b & mask, tl.abs(th - e), 0.0)
        gm = mask & has_g
        g = tl.load(g_ptr + offs, mask=gm, other=0.0).to(tl.float32)
        if KIND == 2:  # SGD (momentum buffer in m)
            gw = g + wd * th
            buf = tl.load(m_ptr + offs, mask=gm & mom_b, other=0.0).to(tl.float32)
            buf = tl.where(first_b, gw, buf * c2 + w3 * gw)
            tl.store(m_ptr + offs, buf.to(DTYPE, fp_downcast_rounding="rtne"), mask=gm & mom_b)
            buf = buf.to(DTYPE, fp_downcast_rounding="rtne").to(tl.float32)
            gw = tl.where(mom_b, tl.where(nest_b, gw + c2 * buf, buf), gw)
            th2 = th - lr * gw
        else:  # Adam (KIND 0) / AdamW (KIND 1)
            if KIND == 1:
                gw = g
                th2 = th * decay
            else:
                gw = g + wd * th
                th2 = th
            mm = tl.load(m_ptr + offs, mask=gm, other=0.0).to(tl.float32)
            vv = tl.load(v_ptr + offs, mask=gm, other=0.0).to(tl.float32)
            mm = mm + w1 * (gw - mm)
            vv = vv * c3 + w3 * gw * gw
            tl.store(m_ptr + offs, mm.to(DTYPE, fp_downcast_rounding="rtne"), mask=gm)
            tl.store(v_ptr + offs, vv.to(DTYPE, fp_downcast_rounding="rtne"), mask=gm)
            mm = mm.to(DTYPE, fp_downcast_rounding="rtne").to(tl.float32)
            vv = vv.to(DTYPE, fp_downcast_rounding="rtne").to(tl.float32)
            denom = tl.sqrt(vv) / h6 + h4
            th2 = th2 - h5 * mm / denom
        th2 = tl.where(has_g, th2, th)
        tl.store(th_ptr + offs, th2.to(DTYPE, fp_downcast_rounding="rtne"), mask=gm)
        th2 = th2.to(DTYPE, fp_downcast_rounding="rtne").to(tl.float32)
        e = tl.where(init_b, th2, e)
        tl.store(e_ptr + offs, e, mask=mask & (apply_b | init_b))
        sa += tl.where(need_b & mask, tl.abs(th2 - e), 0.0)
        sb += tl.where(need_b & mask, tl.abs(g), 0.0)
        if NEED_GP:
            gprev = tl.load(gp_ptr + offs, mask=mask & need_b, other=0.0)
            sc += tl.where(need_b & mask, tl.abs(g - gprev), 0.0)
            tl.store(gp_ptr + offs, g, mask=gm)
        probe += (th2 - th2) + (g - g)
    tl.store(part_w + pid * 5 + 0, tl.sum(sa, axis=0))
    tl.store(part_w + pid * 5 + 1, tl.sum(sb, axis=0))
    tl.store(part_w + pid * 5 + 2, tl.sum(sc, axis=0))
    tl.store(part_w + pid * 5 + 3, tl.sum(probe, axis=0))
    tl.store(part_w + pid * 5 + 4, tl.sum(sd, axis=0))
    if pid == t0:  # the tensor's first tile records its per-tensor state
        tl.store(flags_w + 0 * T + t, started.to(tl.int32))
        if NEED_GP:
            tl.store(flags_w + 1 * T + t, (has_g_s != 0).to(tl.int32))
        else:
            tl.store(flags_w + 1 * T + t, hp.to(tl.int32))
        tl.store(flags_w + 2 * T + t, tl.where(init_now, 1, 2).to(tl.int32))
        tl.store(flags_w + 3 * T + t, (has_g_s != 0).to(tl.int32))
        tl.store(flags_w + 4 * T + t, hp.to(tl.int32))
        tl.store(flags_w + 5 * T + t, apply.to(tl.int32))
        # d of this step if nothing is applied now: kept on a skip, 0 after an init.
        tl.store(dcarry_w + t, tl.where(init_now | (pend == 1), 0.0, d_in))
        _record_decision(alpha, skips, t, apply, al, skip, pend, fallback, beta, FORMULA)


@triton.jit
def _fused_flush_kernel(
    tile_tensor, tile_start, tile0, numel, dyn, e_tab, part_r, part_w, flags_r, dcarry_r, alpha, skips,
    T, scale, fallback, beta,
    DTYPE: tl.constexpr, FORMULA: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr, CHUNK: tl.constexpr,
):
    pid, t, start, n, t0, t1, apply, al, skip, d_in, pend = _pending_alpha(
        part_r, flags_r, dcarry_r, tile_tensor, tile_start, tile0, numel, T, scale, fallback, beta, FORMULA, CHUNK
    )
    th_ptr = tl.load(dyn + t).to(tl.pointer_type(DTYPE))
    e_ptr = tl.load(e_tab + t).to(tl.pointer_type(tl.float32))
    apply_b = (tl.zeros([BLOCK], dtype=tl.int32) + apply.to(tl.int32)) != 0
    sd = tl.zeros([BLOCK], dtype=tl.float32)
    for it in range(ITERS):
        offs = start + it * BLOCK + tl.arange(0, BLOCK)
        m = (offs < n) & apply_b
        th = tl.load(th_ptr + offs, mask=m, other=0.0).to(tl.float32)
        e = tl.load(e_ptr + offs, mask=m, other=0.0)
        e = e * (1.0 - al) + th * al
        tl.store(e_ptr + offs, e, mask=m)
        sd += tl.where(m, tl.abs(th - e), 0.0)
    tl.store(part_w + pid * 5 + 4, tl.sum(sd, axis=0))
    if pid == t0:
        _record_decision(alpha, skips, t, apply, al, skip, pend, fallback, beta, FORMULA)


class TritonFusedGroup:
    """Launches the fused kernels for one (device, dtype) group of a DEMA engine."""

    def __init__(self, state, dtype, params):
        self.state, self.dtype, self.params = state, dtype, params
        dev, n = state.device, len(state)
        tiles = [(t, s) for t, k in enumerate(state.numels) for s in range(0, k, TILE)]
        tile0 = [0]
        for k in state.numels:
            tile0.append(tile0[-1] + (k + TILE - 1) // TILE)
        self.n_tiles = len(tiles)
        i64 = dict(dtype=torch.int64, device=dev)
        self.tile_tensor = torch.tensor([x[0] for x in tiles], dtype=torch.int32, device=dev)
        self.tile_start = torch.tensor([x[1] for x in tiles], **i64)
        self.tile0 = torch.tensor(tile0, dtype=torch.int32, device=dev)
        self.numel = torch.tensor(state.numels, **i64)
        self.e_tab = torch.tensor([v.data_ptr() for v in state.ema_views], **i64)
        gp = state.gprev_views if state.gprev_views is not None else state.ema_views
        self.gp_tab = torch.tensor([v.data_ptr() for v in gp], **i64)
        self.dyn = torch.zeros(5 * n, **i64)
        self.part = torch.zeros(2, max(1, self.n_tiles) * 5, dtype=torch.float32, device=dev)
        self.flags = torch.zeros(2, 6, n, dtype=torch.int32, device=dev)
        self.dcarry = torch.zeros(2, n, dtype=torch.float32, device=dev)
        self.hyper_dev = torch.zeros(n, 8, dtype=torch.float64, device=dev)
        self.hyper = torch.zeros(n, 8, dtype=torch.float64)  # this step's rows, filled on the host
        self.parity = 0
        self._dirty = True  # the canonical state is newer than the flags

    def _from_canonical(self) -> None:
        s, r = self.state, 1 - self.parity
        self.flags[r].zero_()
        self.flags[r, F_STARTED].copy_(s.started)
        self.flags[r, F_HAS_PREV].copy_(s.has_prev)
        self.dcarry[r].copy_(s.d)
        self._dirty = False

    def step(self, kind, th, g, m, v, consts) -> None:
        s = self.state
        if len(s) == 0:
            return
        if self._dirty:
            self._from_canonical()
        has = [0 if x == 0 else 1 for x in g]
        g = [th[i] if x == 0 else x for i, x in enumerate(g)]  # a valid address, never read
        m = [th[i] if x == 0 else x for i, x in enumerate(m)]
        v = [th[i] if x == 0 else x for i, x in enumerate(v)]
        self.dyn.copy_(torch.tensor(th + g + m + v + has, dtype=torch.int64), non_blocking=True)
        self.hyper_dev.copy_(self.hyper, non_blocking=True)
        formula, scale, fallback, beta = consts
        w, r = self.parity, 1 - self.parity
        if self.n_tiles:
            _fused_step_kernel[(self.n_tiles,)](
                self.tile_tensor, self.tile_start, self.tile0, self.numel, self.dyn, self.e_tab, self.gp_tab,
                self.hyper_dev, self.part[r], self.part[w], self.flags[r], self.flags[w], self.dcarry[r],
                self.dcarry[w], s.alpha, s.skips, len(s), scale, fallback, beta,
                DTYPE=_TL[self.dtype], KIND=kind, FORMULA=formula,
                NEED_GP=s.needs_grad_prev, BLOCK=BLOCK, ITERS=ITERS, CHUNK=CHUNK,
            )
        self.parity = r

    def flush(self, consts) -> None:
        """Finish the pending EMA update and write the engine's canonical state."""
        s = self.state
        if len(s) == 0 or self._dirty or self.n_tiles == 0:
            return
        w, r = self.parity, 1 - self.parity
        formula, scale, fallback, beta = consts
        self.dyn[: len(s)].copy_(torch.tensor([p.data_ptr() for p in self.params], dtype=torch.int64))
        self.part[w].zero_()
        _fused_flush_kernel[(self.n_tiles,)](
            self.tile_tensor, self.tile_start, self.tile0, self.numel, self.dyn, self.e_tab, self.part[r],
            self.part[w], self.flags[r], self.dcarry[r], s.alpha, s.skips, len(s), scale, fallback,
            beta, DTYPE=_TL[self.dtype], FORMULA=formula, BLOCK=BLOCK, ITERS=ITERS,
            CHUNK=CHUNK,
        )
        # Canonical per-tensor state, from the flags the last step wrote (torch ops, no sync).
        fr = self.flags[r]
        pend = fr[F_PEND]
        probe = torch.zeros(len(s), dtype=torch.float32, device=s.device)
        probe.index_add_(0, self.tile_tensor.long(), self.part[r].view(-1, 5)[: self.n_tiles, 3])
        finite = probe == probe
        started = (fr[F_STARTED] != 0) | ((pend == PEND_INIT) & finite)
        d_flush = torch.zeros(len(s), dtype=torch.float32, device=s.device)
        d_flush.index_add_(0, self.tile_tensor.long(), self.part[w].view(-1, 5)[: self.n_tiles, 4])
        d_prev = torch.zeros_like(d_flush)
        d_prev.index_add_(0, self.tile_tensor.long(), self.part[r].view(-1, 5)[: self.n_tiles, 4])
        d_in = torch.where(fr[F_APPLIED] != 0, d_prev, self.dcarry[r])
        applied_now = (pend == PEND_EMA) & finite
        d = torch.where(applied_now, d_flush, torch.where(pend == PEND_INIT, 0.0, d_in))
        s.started.copy_(started.to(torch.uint8))
        s.has_prev.copy_(fr[F_HAS_PREV].to(torch.uint8))
        s.d.copy_(d)
        self._dirty = True
