"""The reference DEMA backend: the literal per-tensor maths of docs/design.md §2.

Readable on purpose (one tensor at a time, the L1 norms of the official code, Python
floats for α). The tests use it as the oracle for every fast path and the benchmarks
as the baseline; it is not meant to be fast. With DEMAConfig(ema_dtype="param") it is the
official code's 16-bit arithmetic op for op (docs/fidelity.md): every difference, product
and sum of the update in the parameter dtype (bfloat16 / float16), each norm the exact
float64 sum rounded once to it (state.round_sum), α's four operations rounded to it
(state.dynamic_alpha), the first update the official copy followed by the fallback update.

The float32 norms are the official `torch.norm(x, p=1)` with accurate numbers (`l1`): float32
differences, float32 sums over rows of 4096 elements, float64 across rows. torch.norm accumulates float32 in one running
sum on CPU, which stops growing at 2^24: on a 50M-element tensor α came out 4 % off
(35 % with one thread), while the native kernels sum in double.
"""
from __future__ import annotations

import torch

from cl_core.dema.config import DEMAConfig
from cl_core.dema.state import GroupState, alpha_rule, fallback_alpha, fixed_alpha, round_sum

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
    rows = (a[:head].view(-1, _ROW).sum(1, dtype=torch.float32).double().sum() if head
            else a.new_zeros((), dtype=torch.float64))
    return rows + a[head:].sum(dtype=torch.float64)


class ReferenceBackend:
    def __init__(self, state: GroupState, config: DEMAConfig):
        self.state = state
        self.config = config
        self._stats = torch.zeros(len(state), 5, dtype=torch.float32)

    def _flat(self, t: torch.Tensor) -> torch.Tensor:
        # float32 arithmetic, or (ema_dtype="param") the parameter dtype's own arithmetic
        return t.detach().reshape(-1).to(self.state.ema_dtype)

    def _norm(self, x: torch.Tensor, scratch: bool = False) -> torch.Tensor:
        # With ema_dtype="param" a norm is a number of the parameter dtype (torch.norm of a
        # bfloat16 tensor returns a bfloat16): the float64 sum of the 16-bit |x| (exact for
        # any realistic tensor), rounded once to that dtype.
        if self.state.ema_dtype != torch.float32:
            return round_sum(x.double().abs_().sum(), self.state.ema_dtype)
        return l1(x, scratch).float()

    def update(self, thetas, grads, reduce_stats=None) -> None:
        s, cfg = self.state, self.config
        stats = torch.zeros(len(s), 5, dtype=torch.float32)
        for i, (theta, grad) in enumerate(zip(thetas, grads)):
            th = self._flat(theta)
            g = None if grad is None else self._flat(grad)
            nonfinite = not bool(torch.isfinite(th).all()) or (g is not None and not bool(torch.isfinite(g).all()))
            stats[i, STAT_NONFINITE] = float(nonfinite)
            if not nonfinite and g is not None and s.needs_grad_prev:
                stats[i, STAT_A] = self._norm(th - s.ema_views[i], scratch=True)
                stats[i, STAT_B] = self._norm(g)
                stats[i, STAT_C] = self._norm(g - s.gprev_views[i], scratch=True)
            stats[i, STAT_D] = s.d[i]
        if reduce_stats is not None:
            # Sharded parameters: sum the local statistics over ranks (one call).
            dev_stats = stats.to(s.device)
            reduce_stats(dev_stats)
            stats = dev_stats.cpu()
        self._stats = stats

        for i, (theta, grad) in enumerate(zip(thetas, grads)):
            if stats[i, STAT_NONFINITE] > 0:
                # Non-finite θ or g: leave the EMA and g_prev as they are.
                s.skips[i] += 1
                s.alpha[i] = 0.0
                continue
            th = self._flat(theta)
            ema = s.ema_views[i]
            low = s.ema_dtype != torch.float32
            if not s.started[i]:
                # Lazy start: the EMA is a copy of the parameters (the official deepcopy).
                # The official code then runs its fallback update on it (the bare except:
                # no previous gradient yet): exact in float32, so float32 keeps the copy; in
                # a 16-bit dtype the two rounded products can move an element by one unit.
                alpha = fallback_alpha(cfg) if cfg.formula != "fixed" else fixed_alpha(cfg)
                ema.copy_(th)
                if low:
                    ema.mul_(1.0 - alpha).add_(th * alpha)
                s.started[i] = 1
            elif cfg.formula != "fixed" and (grad is None or not s.has_prev[i]):
                alpha = fallback_alpha(cfg)
                ema.mul_(1.0 - alpha).add_(th * alpha)  # = ema * (1 - α) + θ * α
            else:
                a, b, c, d = (float(stats[i, k]) for k in (STAT_A, STAT_B, STAT_C, STAT_D))
                alpha = alpha_rule(cfg, a, b, c, d, s.ema_dtype)
                # In a 16-bit dtype each product and the sum round to it: torch computes
                # a 16-bit tensor times a Python float in float32 (1 − α is a double,
                # rounded to float32 then), as the official code did.
                ema.mul_(1.0 - alpha).add_(th * alpha)  # = ema * (1 - α) + θ * α
            s.alpha[i] = alpha
            if s.needs_grad_prev:
                if grad is None:
                    s.has_prev[i] = 0
                else:
                    s.gprev_views[i].copy_(self._flat(grad))
                    s.has_prev[i] = 1
            s.d[i] = self._norm(th - ema, scratch=True)

    def last_stats(self) -> torch.Tensor:
        return self._stats

    def canonicalize(self) -> None:
        """Nothing to fold: this backend writes the shared state directly."""

    def state_loaded(self) -> None:
        """Nothing cached beyond the shared state."""
