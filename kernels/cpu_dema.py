"""The "torch" DEMA backend: the fast path wherever Triton is not used.

On CPU tensors it calls the native kernels (csrc/dema_cpu.c, one pass per tensor
while it is hot in cache, tensors split over torch's intra-op thread count). On any
other device, or where no C compiler is available, it runs a pure-torch path over
flat fp32 buffers with `torch._foreach_norm`: a fixed number of ops per step whatever
the tensor count, no `.item()`, and no allocation the size of the parameters after
the first step (scratch buffers are allocated once).
"""
from __future__ import annotations

import torch

from cl_core.kernels import native
from cl_core.dema.config import DEMAConfig
from cl_core.dema.state import GroupState
from cl_core.kernels.native import address
from cl_core.kernels.native import int64_table as _i64

MODE_STATS, MODE_APPLY, MODE_BOTH = 1, 2, 3


class TorchBackend:
    def __init__(self, state: GroupState, config: DEMAConfig, dtype: torch.dtype):
        self.state = state
        self.config = config
        self.dtype = dtype
        self._native = native.function_for(dtype) if state.device.type == "cpu" else None
        self._scratch = None
        self._grad_key = None
        if self._native is not None:
            self._setup_native()

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

    def _native_usable(self, thetas, grads) -> bool:
        return all(t.is_contiguous() for t in thetas) and all(
            g is None or (g.is_contiguous() and g.dtype == self.dtype and g.device.type == "cpu") for g in grads
        )

    def _run_native(self, mode: int) -> None:
        s, cfg = self.state, self.config
        args = [
            self._numel, self._th_ptr, self._g_ptr, self._e_ptr, self._gp_ptr,
            s.started, s.has_prev, s.d, s.alpha, s.skips, self._stats,
        ]
        ptrs = [address(a) for a in args]
        consts = cfg.kernel_scalars()
        self._runner.run(lambda count, idx: self._native(mode, count, idx, *ptrs, *consts))

    def _update_native(self, thetas, grads, reduce_stats) -> None:
        th = [t.data_ptr() for t in thetas]
        # 0 means "no gradient" to the kernel; an empty local shard (FSDP) has a null
        # data pointer but does have a gradient, so it gets a harmless non-null one.
        g = [0 if x is None else (x.data_ptr() or self._nonnull.data_ptr()) for x in grads]
        key = (th, g)
        if key != self._grad_key:  # pointers move when grads are re-created (zero_grad(set_to_none))
            self._th_ptr.copy_(_i64(th))
            self._g_ptr.copy_(_i64(g))
            self._grad_key = key
        if reduce_stats is None:
            self._run_native(MODE_BOTH)
        else:
            self._run_native(MODE_STATS)
            reduce_stats(self._stats)
            self._run_native(MODE_APPLY)

    # ------------------------------------------------------------------ pure torch
    def _alloc_scratch(self):
        s = self.state
        n, dev = s.offsets[-1], s.device
        seg = torch.repeat_interleave(
            torch.arange(len(s), device=dev), torch.tensor(s.numels, device=dev), output_size=n
        )
        self._scratch = {
            "theta": torch.empty(n, dtype=torch.float32, device=dev),
            "grad": torch.zeros(n, dtype=torch.float32, device=dev) if s.needs_grad_prev else None,
            "diff": torch.empty(n, dtype=torch.float32, device=dev),
            "weight": torch.empty(n, dtype=torch.float32, device=dev),
            "mask": torch.empty(n, dtype=torch.bool, device=dev),
            "seg": seg,
        }
        self._scratch_views = {k: s._views(v) for k, v in self._scratch.items() if v is not None and k != "seg"}

    def _norms(self, views) -> torch.Tensor:
        if not views:
            return torch.zeros(0, dtype=torch.float32, device=self.state.device)
        return torch.stack(torch._foreach_norm(views, 1)).float()

    def _update_torch(self, thetas, grads, reduce_stats) -> None:
        s, cfg = self.state, self.config
        if self._scratch is None:
            self._alloc_scratch()
        sc, sv, dev = self._scratch, self._scratch_views, s.device
        present = [i for i, g in enumerate(grads) if g is not None]
        has_grad = torch.zeros(len(s), dtype=torch.bool)
        has_grad[present] = True
        has_grad = has_grad.to(dev, non_blocking=True)
        present_idx = torch.tensor(present, dtype=torch.int64).to(dev, non_blocking=True)

        torch._foreach_copy_(sv["theta"], [t.detach().reshape(-1) for t in thetas])
        grads_flat = [grads[i].detach().reshape(-1) for i in present]
        if s.needs_grad_prev and present:
            # b from the fp32 copies: a norm of bf16/fp16 tensors comes back rounded.
            torch._foreach_copy_([sv["grad"][i] for i in present], grads_flat)
            grads_flat = [sv["grad"][i] for i in present]
        theta_norm = self._norms(sv["theta"])
        b = torch.zeros(len(s), dtype=torch.float32, device=dev)
        b.index_copy_(0, present_idx, self._norms(grads_flat))
        nonfinite = ~(torch.isfinite(theta_norm) & torch.isfinite(b))
        a = torch.zeros_like(b)
        c = torch.zeros_like(b)
        if s.needs_grad_prev:
            torch.sub(sc["theta"], s.ema_flat, out=sc["diff"])
            a = self._norms(sv["diff"])
            torch.sub(sc["grad"], s.gprev_flat, out=sc["diff"])
            c = self._norms(sv["diff"])
        b = torch.where(nonfinite, 0.0, b)
        stats = torch.stack([a, b, c, nonfinite.float(), s.d], 1)
        if reduce_stats is not None:
            reduce_stats(stats)
        a, b, c, nonfinite, d = stats.unbind(1)
        skip = nonfinite > 0
        started = s.started.bool()

        if cfg.formula == "fixed":
            alpha = torch.full_like(a, 1.0 - cfg.beta)
        else:
            q = (1.0 + b) / (a * c)
            dyn = q * (cfg.scale if cfg.formula == "official" else d)
            dyn = torch.where((dyn > 0) & (dyn < 1), dyn, cfg.fallback)
            use_dyn = started & has_grad & s.has_prev.bool()
            alpha = torch.where(use_dyn, dyn, cfg.fallback)
        # Weight actually applied: 1 at the lazy start (θ* = θ exactly); a skipped
        # tensor gets θ replaced by θ* below, so any weight leaves it unchanged.
        weight = torch.where(started, alpha, 1.0)
        torch.index_select(weight, 0, sc["seg"], out=sc["weight"])
        torch.index_select(skip, 0, sc["seg"], out=sc["mask"])
        torch.where(sc["mask"], s.ema_flat, sc["theta"], out=sc["theta"])
        s.ema_flat.lerp_(sc["theta"], sc["weight"])

        torch.sub(sc["theta"], s.ema_flat, out=sc["diff"])
        s.d.copy_(torch.where(skip, s.d, self._norms(sv["diff"])))
        if s.needs_grad_prev:
            keep = skip | ~has_grad
            torch.index_select(keep, 0, sc["seg"], out=sc["mask"])
            torch.where(sc["mask"], s.gprev_flat, sc["grad"], out=s.gprev_flat)
            s.has_prev.copy_(torch.where(skip, s.has_prev.bool(), has_grad).to(torch.uint8))
        s.started.copy_((started | ~skip).to(torch.uint8))
        s.skips.add_(skip.to(torch.int64))
        s.alpha.copy_(torch.where(skip, 0.0, alpha))

    # ------------------------------------------------------------------ entry point
    def update(self, thetas, grads, reduce_stats=None) -> None:
        if self._native is not None and self._native_usable(thetas, grads):
            self._update_native(thetas, grads, reduce_stats)
        else:
            self._update_torch(thetas, grads, reduce_stats)

    def canonicalize(self) -> None:
        """Nothing to fold: this backend writes the shared state directly."""

    def state_loaded(self) -> None:
        """Nothing cached beyond the shared state."""
