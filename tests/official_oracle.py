"""The official LCIA `ema_update` (JingyangQiao/CoIN, CoIN/peft/tuners/lora.py) written out in
torch ops on 16-bit tensors: the oracle every backend and fused step of
DEMAConfig(ema_dtype="param") must match bit for bit (tests/engine/test_official_bits.py), and
the replay of the DeepSpeed official-precision test (tests/dist_scripts/ds_trainer.py).

Written from the description of the official function, independently of cl_core's kernels:

- a = ‖θ − θ*‖₁, b = ‖g‖₁, c = ‖g − g_prev‖₁: each difference a 16-bit tensor op, |.| exact,
  the sum accumulated in float64 (exact for these tensors) and rounded ONCE to the dtype, to
  nearest even (`round_once`, by scaling to an integer grid: not torch's float64 -> 16-bit
  cast, which goes through float32 and can round twice);
- α = float((1 + b) / (a · c) · scale) with a, b, c 0-dim 16-bit tensors (each op torch's
  16-bit arithmetic: float32, rounded), the fallback where α leaves (0, 1);
- θ* ← θ* · (1 − α) + θ · α in 16-bit tensor ops (α a Python float);
- the first update of a tensor: θ* = a copy of θ, then the bare `except` runs
  θ* · (1 − fallback) + θ · fallback; a missing gradient takes that fallback too, and the next
  update then has no g_prev (it was stored as None): the fallback again.

cl_core's generalisations ride on the same arithmetic: formula "paper" multiplies by
d = ‖θ − θ*‖₁ after the previous update (rounded as the norms) instead of the scale, and "fixed"
uses α = 1 − β as the engine forms it in float32 (cl_core.dema.state.fixed_alpha).
"""
from __future__ import annotations

import torch

# (significand bits after the point, smallest normal exponent, largest finite value)
_FORMAT = {torch.bfloat16: (7, -126, (2 - 2.0**-7) * 2.0**127), torch.float16: (10, -14, 65504.0)}


def round_once(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float64 x >= 0 (or NaN) rounded once to `dtype`, to nearest, ties to even: x divided by
    the spacing of `dtype` at x (a power of two: exact), rounded to an integer by torch.round
    (half to even), multiplied back; past the largest finite value (after rounding) inf."""
    mant, emin, top = _FORMAT[dtype]
    x = x.double()
    assert not bool((x < 0).any()), "round_once takes sums of absolute values"
    _, e = torch.frexp(x)  # x = m·2^e, m in [0.5, 1): the exponent of x is e − 1
    spacing = torch.ldexp(torch.ones_like(x), (e - 1).clamp(min=emin) - mant)
    r = torch.round(x / spacing) * spacing
    r = torch.where(torch.isfinite(x) & (r > top), torch.inf, torch.where(x == 0, 0.0, r))
    out = r.to(dtype)
    assert torch.equal(out.double(), r) or not bool(torch.isfinite(r).all()), "round_once: not a value of the dtype"
    return out


def l1(x: torch.Tensor) -> torch.Tensor:
    """torch.norm(x, p=1) of a 16-bit tensor as the spec takes it: the exact sum of |x|,
    rounded once to x's dtype (a 0-dim tensor of that dtype)."""
    return round_once(x.double().abs().sum(), x.dtype)


class OfficialEMA:
    """The official ema_update over a list of 16-bit tensors (one call of `update` = one call
    of the official function), plus cl_core's "paper" and "fixed" formulas on the same
    arithmetic. `alpha` after an update: the α each tensor got (Python floats)."""

    def __init__(self, formula: str = "official", scale: float = 2.0, fallback: float = 0.01,
                 fixed_alpha: float | None = None):
        self.formula, self.scale, self.fallback, self.fixed_alpha = formula, scale, fallback, fixed_alpha
        self.ema: dict = {}
        self.gprev: dict = {}
        self.d: dict = {}
        self.alpha: list = []

    def _move(self, k, p, alpha):
        self.ema[k] = self.ema[k] * (1 - alpha) + p * alpha
        self.d[k] = l1(p - self.ema[k])  # the "paper" formula's d for the next update

    def update(self, params, grads) -> list:
        self.alpha = []
        for k, (p, g) in enumerate(zip(params, grads)):
            p = p.detach()
            first = k not in self.ema
            if first:
                self.ema[k] = p.clone()  # copy.deepcopy(p)
            if self.formula == "fixed":
                alpha = self.fixed_alpha
            elif first or g is None or self.gprev.get(k) is None:
                alpha = self.fallback  # the bare except: (no g_prev, or p.grad None)
            else:
                a = l1(p - self.ema[k])
                b = l1(g)
                c = l1(g - self.gprev[k])
                mult = self.scale if self.formula == "official" else self.d[k]
                alpha = float((1 + b) / (a * c) * mult)
                if not 0 < alpha < 1:
                    alpha = self.fallback
            self._move(k, p, alpha)
            self.gprev[k] = None if g is None else g.detach().clone()
            self.alpha.append(alpha)
        return self.alpha

    def ema_tensors(self) -> list:
        return [self.ema[k] for k in sorted(self.ema)]
