"""The "torch" DEMA backend: the fast path wherever Triton is not used.

On CPU tensors it calls the native kernels (cl_core/kernels/cpu_dema.py launches
csrc/dema_cpu.c; this backend fills their tables), one pass per tensor
while it is hot in cache, tensors split over torch's intra-op thread count). A tensor
the kernel of its group cannot read directly (a non-contiguous parameter, a gradient
of another dtype or a non-contiguous one) does not send the group elsewhere: that one
tensor is read through float32 contiguous copies by the float32 kernel (exact: the
kernels load every dtype to float32), counted in `slow_tensor_updates` and logged
once. With DEMAConfig(ema_dtype="param") bfloat16/float16 groups use the kernels that
keep θ* and g_prev in that dtype (dema_cpu_param_*, the reference's rounding).

On any other device, for float64 groups, or where no C compiler is available, it runs
a pure-torch path, one tensor (or slice of at most 1/8 of the group) at a time, every op writing
into one reused float32 scratch buffer the size of the largest slice: the engine's
memory stays at the EMA and g_prev (2x fp32 parameters) plus that buffer (<= 3x in
all; bench/bench_dema.py reports it). Its L1 sums are `torch.sum` of float32 slices
(cascade/tree summation, accurate to float32 rounding) added in float64, not
`torch.norm(p=1)`, whose CPU accumulator stops growing at 2^24. No `.item()`:
decisions are device tensors; the op count grows with the tensor count (the fast
paths are the native kernels on CPU and Triton on CUDA).
"""
from __future__ import annotations

import logging

import torch

from cl_core.dema.config import DEMAConfig
from cl_core.dema.state import GroupState, dynamic_alpha, fallback_alpha, fixed_alpha, round_sum
from cl_core.kernels import cpu_dema, native
from cl_core.kernels.cpu_dema import MODE_APPLY, MODE_BOTH, MODE_STATS
from cl_core.kernels.native import int64_table as _i64

log = logging.getLogger(__name__)
# Pure-torch path: elements per slice of a tensor, 1/8 of the group (so the scratch
# stays small beside the parameters) within [64K, 4M] elements.
MIN_PIECE, MAX_PIECE = 1 << 16, 1 << 22


def _flat32(t: torch.Tensor) -> torch.Tensor:
    """t flat; float64 rounded to float32 first (as the reference does). float32,
    bfloat16 and float16 stay as they are: torch promotes them to float32 exactly."""
    t = t.reshape(-1)
    return t.float() if t.dtype == torch.float64 else t


class TorchBackend:
    def __init__(self, state: GroupState, config: DEMAConfig, dtype: torch.dtype):
        self.state = state
        self.config = config
        self.dtype = dtype
        self._native = cpu_dema.kernel_for(dtype) if state.device.type == "cpu" else None
        self._grad_key = None
        self._tmp = None
        self.slow_tensor_updates = 0  # tensor-updates that went through float32 copies
        self._warned_slow = False
        # ema_dtype="param" (bfloat16/float16 EMA): the kernels that store θ* in that dtype.
        self._low = state.ema_dtype != torch.float32
        if self._low and self._native is not None:
            self._native = cpu_dema.kernel_for(dtype, ema_in_param_dtype=True)
        if self._native is None:
            self._warn_pure()
        if self._native is not None:
            self._setup_native()

    def _warn_pure(self) -> None:
        dev = self.state.device
        if dev.type == "cpu" and self.dtype in (torch.float32, torch.bfloat16, torch.float16):
            # native.load() already said why (no compiler, build failure, CL_CORE_NO_NATIVE).
            log.info("DEMA %s group on CPU runs the pure-torch path (no native kernels)", self.dtype)

    # ------------------------------------------------------------------ native CPU
    def _setup_native(self):
        s = self.state
        self._numel = _i64(s.numels)
        self._e_ptr = _i64([v.data_ptr() for v in s.ema_views])
        # The kernel reads a null g_prev pointer as "formula without g_prev"; empty views
        # have null data pointers, so they get a harmless non-null one.
        self._nonnull = torch.zeros(1, dtype=torch.float64)
        nonnull = self._nonnull.data_ptr()
        self._gp_ptr = _i64([v.data_ptr() or nonnull for v in s.gprev_views] if s.gprev_views else [0] * len(s))
        self._th_ptr = torch.zeros(len(s), dtype=torch.int64)
        self._g_ptr = torch.zeros(len(s), dtype=torch.int64)
        self._stats = torch.zeros(len(s), 5, dtype=torch.float32)
        self._runner = native.ShardedRunner(s.numels)
        # Odd tensors (see the module docstring) go through contiguous copies: float32 ones
        # for the float32 kernel, or, with an EMA in the parameter dtype, copies in that
        # dtype for this group's own kernel (its EMA buffers are of that dtype).
        self._odd_fn, self._odd_dtype = (
            (self._native, self.dtype) if self._low else (cpu_dema.kernel_for(torch.float32), torch.float32))
        self._odd_runs = {}  # tuple(odd positions) -> (runner over the others, odd index table)

    def _odd_reason(self, t, g) -> str | None:
        if t.dtype != self.dtype:      # p.data replaced by another dtype after the engine was built
            return f"{t.dtype} parameter in a {self.dtype} group"
        if not t.is_contiguous():
            return "non-contiguous parameter"
        if g is not None:
            if g.dtype != self.dtype:
                return f"{g.dtype} gradient for a {self.dtype} parameter"
            if not g.is_contiguous():
                return "non-contiguous gradient"
        return None

    def _run_native(self, mode: int, runner, odd_idx) -> None:
        s = self.state
        cpu_dema.launch(self._native, mode, runner, self._numel, self._th_ptr, self._g_ptr, self._e_ptr, self._gp_ptr,
                        s.started, s.has_prev, s.d, s.alpha, s.skips, self._stats, *self.config.kernel_scalars(),
                        odd_fn=self._odd_fn, odd_idx=odd_idx)

    def _update_native(self, thetas, grads, reduce_stats) -> None:
        nonnull = self._nonnull.data_ptr()
        odd, reasons, keep_alive = [], [], []
        th, g = [], []
        for j, (t, x) in enumerate(zip(thetas, grads)):
            reason = self._odd_reason(t, x)
            if reason is not None:
                # Read by the float32 kernel from float32 contiguous copies (exact).
                odd.append(j)
                reasons.append(reason)
                t = t.to(self._odd_dtype).contiguous()
                x = None if x is None else x.to(self._odd_dtype).contiguous()
                keep_alive += [t, x]
            th.append(t.data_ptr())
            # 0 means "no gradient" to the kernel; an empty local shard (FSDP) has a null
            # data pointer but does have a gradient, so it gets a harmless non-null one.
            g.append(0 if x is None else (x.data_ptr() or nonnull))
        key = (th, g)
        if key != self._grad_key:  # pointers move when grads are re-created (zero_grad(set_to_none))
            self._th_ptr.copy_(_i64(th))
            self._g_ptr.copy_(_i64(g))
            self._grad_key = None if odd else key  # copies are new every step
        runner, odd_idx = self._runner, None
        if odd:
            runner, odd_idx = self._odd_run(odd, reasons)
        if reduce_stats is None:
            self._run_native(MODE_BOTH, runner, odd_idx)
        else:
            self._run_native(MODE_STATS, runner, odd_idx)
            reduce_stats(self._stats)
            self._run_native(MODE_APPLY, runner, odd_idx)
        del keep_alive

    def _odd_run(self, odd, reasons):
        self.slow_tensor_updates += len(odd)
        if not self._warned_slow:
            self._warned_slow = True
            log.warning(
                "DEMA: %d tensor(s) of the %s group take a slower path (float32 copies each update), the "
                "others keep the native kernel; first: position %d in the group, %s (warned once; "
                "backend.slow_tensor_updates counts them)", len(odd), self.dtype, odd[0], reasons[0],
            )
        key = tuple(odd)
        run = self._odd_runs.get(key)
        if run is None:
            odd_set = set(odd)
            rest = [j for j in range(len(self.state)) if j not in odd_set]
            run = (native.ShardedRunner(self.state.numels, indices=rest), _i64(odd))
            if len(self._odd_runs) > 8:  # the odd set changes: keep the cache small
                self._odd_runs.clear()
            self._odd_runs[key] = run
        return run

    # ------------------------------------------------------------------ pure torch
    def _pieces(self, j):
        """(start, stop) slices of tensor j, at most self._piece elements each."""
        n, step = self.state.numels[j], self._piece
        return [(lo, min(n, lo + step)) for lo in range(0, n, step)] or [(0, 0)]

    def _scratch(self) -> torch.Tensor:
        # One float32 buffer of the largest piece, reused by every op (out=): no
        # allocation the size of a tensor per step, and no heap fragmentation.
        if self._tmp is None:
            s = self.state
            self._piece = max(MIN_PIECE, min(MAX_PIECE, s.offsets[-1] // 8))
            size = max([min(n, self._piece) for n in s.numels] or [0])
            self._tmp = torch.empty(size, dtype=s.ema_dtype, device=s.device)
            self._sums = torch.zeros(4, len(s), dtype=torch.float64, device=s.device)
        return self._tmp

    def _flat(self, t: torch.Tensor) -> torch.Tensor:
        if self._low:  # ema_dtype="param": the parameter dtype's arithmetic
            return t.reshape(-1).to(self.state.ema_dtype)
        return _flat32(t)

    def _number(self, sums: torch.Tensor) -> torch.Tensor:
        """float64 sums as the statistics: float32, or rounded once to the EMA dtype."""
        return round_sum(sums, self.state.ema_dtype) if self._low else sums.float()

    def _update_torch(self, thetas, grads, reduce_stats) -> None:
        s, cfg = self.state, self.config
        dev, n = s.device, len(s)
        scratch = self._scratch()
        sums = self._sums
        sums.zero_()
        sa, sb, sc, sd = sums.unbind(0)  # float64 [T] each: a, b, c and the new d
        gp_views = s.gprev_views
        flat = self._flat
        # float32 piece sums (accurate to float32 rounding); with a 16-bit EMA float64 ones,
        # exact sums of the 16-bit |differences| that are then rounded once (round_sum)
        f32 = torch.float64 if self._low else torch.float32
        for j, (theta, grad) in enumerate(zip(thetas, grads)):
            th, e = flat(theta), s.ema_views[j]
            g = None if grad is None else flat(grad)
            for lo, hi in self._pieces(j):
                tmp = scratch[: hi - lo]
                torch.sub(th[lo:hi], e[lo:hi], out=tmp)
                sa[j] += tmp.abs_().sum(dtype=f32)  # finite iff θ is (the EMA always is)
                if g is None:
                    continue
                sb[j] += tmp.copy_(g[lo:hi]).abs_().sum(dtype=f32)
                if gp_views is not None:
                    torch.sub(g[lo:hi], gp_views[j][lo:hi], out=tmp)
                    sc[j] += tmp.abs_().sum(dtype=f32)
        a, b, c = (self._number(x) for x in (sa, sb, sc))
        # from the float64 sums: a 16-bit norm may overflow to inf from finite θ and g
        nonfinite = ~(torch.isfinite(sa) & torch.isfinite(sb))
        has_grad = torch.tensor([g is not None for g in grads], dtype=torch.bool).to(dev, non_blocking=True)
        # Only the statistics the rule uses (as the native kernel's need_stats): zeros elsewhere.
        if cfg.formula == "fixed":
            a = b = c = torch.zeros_like(a)
        else:
            stats_ok = has_grad & s.has_prev.bool() & s.started.bool() & ~nonfinite
            a, b, c = (torch.where(stats_ok, x, 0.0) for x in (a, b, c))
        stats = torch.stack([a, b, c, nonfinite.float(), s.d], 1)
        if reduce_stats is not None:
            reduce_stats(stats)
        self._stats = stats  # what α was decided from (last_stats)
        a, b, c, nonfinite, d = stats.unbind(1)
        skip = nonfinite > 0
        started = s.started.bool()

        if cfg.formula == "fixed":
            alpha = torch.full_like(a, fixed_alpha(cfg))
        else:
            fb = fallback_alpha(cfg)
            dyn = dynamic_alpha(a, b, c, d, cfg, s.ema_dtype)
            dyn = torch.where((dyn > 0) & (dyn < 1), dyn, fb)
            use_dyn = started & has_grad & s.has_prev.bool()
            alpha = torch.where(use_dyn, dyn, fb)
        # Weight applied: 1 at the lazy start (θ* = θ exactly); 0 for a skipped tensor,
        # whose θ is replaced by θ* below so that NaN/inf never reach the EMA. A 16-bit
        # EMA starts as θ and then takes the fallback update, as the official code.
        start_w = alpha if self._low else 1.0
        weight = torch.where(skip, 0.0, torch.where(started, alpha, start_w))
        starting = ~started & ~skip  # device flags: no host sync
        keep_gprev = skip | ~has_grad
        for j, (theta, grad) in enumerate(zip(thetas, grads)):
            th, e = flat(theta), s.ema_views[j]
            skip_j, weight_j = skip[j], weight[j]
            for lo, hi in self._pieces(j):
                tmp, ej, tj = scratch[: hi - lo], e[lo:hi], th[lo:hi]
                if self._low:  # the official deepcopy before the first (fallback) update
                    torch.where(starting[j], tj, ej, out=ej)
                torch.where(skip_j, ej, tj, out=tmp)
                if self._low:
                    # the reference's op order in the EMA dtype: θ* · (1 − w) + θ · w
                    ej.mul_(1.0 - weight_j).add_(tmp.mul_(weight_j))
                    torch.where(skip_j, ej, tj, out=tmp)
                else:
                    ej.lerp_(tmp, weight_j)
                sd[j] += tmp.sub_(ej).abs_().sum(dtype=f32)
            if gp_views is not None and grad is not None:
                gp = gp_views[j]
                torch.where(keep_gprev[j], gp, flat(grad), out=gp)
        s.d.copy_(torch.where(skip, s.d, self._number(sd)))
        if gp_views is not None:
            s.has_prev.copy_(torch.where(skip, s.has_prev.bool(), has_grad).to(torch.uint8))
        s.started.copy_((started | ~skip).to(torch.uint8))
        s.skips.add_(skip.to(torch.int64))
        s.alpha.copy_(torch.where(skip, 0.0, alpha))

    # ------------------------------------------------------------------ entry point
    def update(self, thetas, grads, reduce_stats=None) -> None:
        if self._native is not None:
            self._update_native(thetas, grads, reduce_stats)
        else:
            self._update_torch(thetas, grads, reduce_stats)

    def last_stats(self) -> torch.Tensor:
        """The native kernels' statistics table (written by every update), or the pure-torch
        path's last one."""
        stats = getattr(self, "_stats", None)
        return stats if stats is not None else torch.zeros(len(self.state), 5, device=self.state.device)

    def canonicalize(self) -> None:
        """Nothing to fold: this backend writes the shared state directly."""

    def state_loaded(self) -> None:
        """Nothing cached beyond the shared state."""
