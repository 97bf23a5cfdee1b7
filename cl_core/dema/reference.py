"""The reference DEMA backend: the literal per-tensor maths of DESIGN.md §2.

Readable on purpose (one tensor at a time, `torch.norm(x, p=1)` as the official
code does, Python floats for α). The tests use it as the oracle for every fast path
and the benchmarks as the baseline; it is not meant to be fast.
"""
from __future__ import annotations

import torch

from cl_core.dema.config import DEMAConfig
from cl_core.dema.state import GroupState, alpha_rule

# Columns of the per-tensor statistics table handed to a `reduce_stats` hook.
STAT_A, STAT_B, STAT_C, STAT_NONFINITE, STAT_D = range(5)


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
                stats[i, STAT_A] = torch.norm(th - s.ema_views[i], p=1)
                stats[i, STAT_B] = torch.norm(g, p=1)
                stats[i, STAT_C] = torch.norm(g - s.gprev_views[i], p=1)
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
                ema.copy_(ema * (1.0 - alpha) + th * alpha)
            else:
                a, b, c, d = (float(stats[i, k]) for k in (STAT_A, STAT_B, STAT_C, STAT_D))
                alpha = alpha_rule(cfg, a, b, c, d)
                ema.copy_(ema * (1.0 - alpha) + th * alpha)
            s.alpha[i] = alpha
            if s.needs_grad_prev:
                if grad is None:
                    s.has_prev[i] = 0
                else:
                    s.gprev_views[i].copy_(grad.detach().reshape(-1).float())
                    s.has_prev[i] = 1
            s.d[i] = torch.norm(th - ema, p=1)

    def canonicalize(self) -> None:
        """Nothing to fold: this backend writes the shared state directly."""

    def state_loaded(self) -> None:
        """Nothing cached beyond the shared state."""
