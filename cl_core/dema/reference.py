"""The reference DEMA backend: the literal per-tensor maths of DESIGN.md §2.

Readable on purpose (one tensor at a time, the L1 norms of the official code, Python
floats for α). The tests use it as the oracle for every fast path and the benchmarks
as the baseline; it is not meant to be fast.

The norms are the official `torch.norm(x, p=1)` with accurate numbers (`l1`): float32
differences, float32 sums over rows of 4096 elements, float64 across rows. torch.norm accumulates float32 in one running
sum on CPU, which stops growing at 2^24: on a 50M-element tensor α came out 4 % off
(35 % with one thread), while the native kernels sum in double.
"""
from __future__ import annotations

import torch

from cl_core.dema.config import DEMAConfig
from cl_core.dema.state import GroupState, alpha_rule

# Columns of the per-tensor statistics table handed to a `reduce_stats` hook.
STAT_A, STAT_B, STAT_C, STAT_NONFINITE, STAT_D = range(5)
_ROW = 4096  # float32 partial sums over rows this long, float64 across rows


def l1(x: torch.Tensor, scratch: bool = False) -> torch.Tensor:
    """‖x‖₁ of a float32 tensor, accumulated in float64 (a 0-dim float64 tensor).
    scratch=True: x is a temporary and may be overwritten (saves a copy)."""
    a = x.reshape(-1).abs_() if scratch else x.reshape(-1).abs()
    head = a.numel() - a.numel() % _ROW
    # float32 row sums (exact to float32 rounding), then float64 across rows: the float64
    # copy is small.
    rows = a[:head].view(-1, _ROW).sum(1).double().sum() if head else a.new_zeros((), dtype=torch.float64)
    return rows + a[head:].sum(dtype=torch.float64)


class ReferenceBackend:
    def __init__(self, state: GroupState, config: DEMAConfig):
        self.state = state
        self.config = config

    def update(self, thetas, grads, reduce_stats=None) -> None:
        s, cfg = self.state, self.config
        stats = torch.zeros(len(s), 5, dtype=torch.float32)
        for i, (theta, grad) in enumerate(zip(thetas, grads)):
            th = theta.detach().reshape(-1).float()
            g = None if grad is None else grad.detach().reshape(-1).float()
            nonfinite = not bool(torch.isfinite(th).all()) or (g is not None and not bool(torch.isfinite(g).all()))
            stats[i, STAT_NONFINITE] = float(nonfinite)
            if not nonfinite and g is not None and s.needs_grad_prev:
                stats[i, STAT_A] = l1(th - s.ema_views[i], scratch=True)
                stats[i, STAT_B] = l1(g)
                stats[i, STAT_C] = l1(g - s.gprev_views[i], scratch=True)
            stats[i, STAT_D] = s.d[i]
        if reduce_stats is not None:
            # Sharded parameters: sum the local statistics over ranks (one call).
            dev_stats = stats.to(s.device)
            reduce_stats(dev_stats)
            stats = dev_stats.cpu()

        for i, (theta, grad) in enumerate(zip(thetas, grads)):
            if stats[i, STAT_NONFINITE] > 0:
                # Non-finite θ or g: leave the EMA and g_prev as they are.
                s.skips[i] += 1
                s.alpha[i] = 0.0
                continue
            th = theta.detach().reshape(-1).float()
            ema = s.ema_views[i]
            if not s.started[i]:
                # Lazy start: the EMA is a copy of the parameters (the official
                # deepcopy followed by the fallback update, which leaves it at θ).
                alpha = cfg.fallback if cfg.formula != "fixed" else 1.0 - cfg.beta
                ema.copy_(th)
                s.started[i] = 1
            elif cfg.formula != "fixed" and (grad is None or not s.has_prev[i]):
                alpha = cfg.fallback
                ema.mul_(1.0 - alpha).add_(th * alpha)  # = ema * (1 - α) + θ * α
            else:
                a, b, c, d = (float(stats[i, k]) for k in (STAT_A, STAT_B, STAT_C, STAT_D))
                alpha = alpha_rule(cfg, a, b, c, d)
                ema.mul_(1.0 - alpha).add_(th * alpha)  # = ema * (1 - α) + θ * α
            s.alpha[i] = alpha
            if s.needs_grad_prev:
                if grad is None:
                    s.has_prev[i] = 0
                else:
                    s.gprev_views[i].copy_(grad.detach().reshape(-1).float())
                    s.has_prev[i] = 1
            s.d[i] = l1(th - ema, scratch=True)

    def canonicalize(self) -> None:
        """Nothing to fold: this backend writes the shared state directly."""

    def state_loaded(self) -> None:
        """Nothing cached beyond the shared state."""
