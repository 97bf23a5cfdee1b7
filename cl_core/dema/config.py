"""DEMAConfig: the settings of the dynamic EMA (docs/design.md §2) and their validation."""
from __future__ import annotations

import math
import numbers
import struct
from dataclasses import asdict, dataclass

FORMULAS = ("official", "paper", "fixed")
BACKENDS = ("auto", "triton", "torch", "reference")
EMA_DTYPES = ("float32", "param")

# Integer codes shared by every backend (C, Triton, torch) for the formula.
FORMULA_CODE = {"official": 0, "paper": 1, "fixed": 2}


@dataclass(frozen=True)
class DEMAConfig:
    """Settings of the dynamic EMA.

    formula:  "official" (α = scale·(1+b)/(a·c), the ICML code), "paper"
              (α = d·(1+b)/(a·c)) or "fixed" (α = 1 − beta).
    scale:    multiplier of the official formula (2.0 in the ICML code, 0.01 in
              Continual-NExT).
    fallback: α used when the formula leaves (0, 1) or cannot be computed.
    beta:     EMA weight of the "fixed" formula.
    backend:  "auto" (triton on CUDA, torch elsewhere), "triton", "torch" or
              "reference" (the literal per-tensor maths).
    ema_dtype: "float32" (θ*, g_prev and their arithmetic in float32) or "param" (in the
              parameter dtype, with the official code's 16-bit arithmetic op for op:
              docs/fidelity.md; in bfloat16 the EMA stops moving once α·|θ − θ*| falls
              under half a bfloat16 step of θ*).
    """

    formula: str = "official"
    scale: float = 2.0
    fallback: float = 0.01
    beta: float = 0.99
    backend: str = "auto"
    ema_dtype: str = "float32"

    def __post_init__(self):
        if self.formula not in FORMULAS:
            raise ValueError(f"DEMAConfig.formula={self.formula!r} is not known; allowed: {', '.join(FORMULAS)}")
        if self.backend not in BACKENDS:
            raise ValueError(f"DEMAConfig.backend={self.backend!r} is not known; allowed: {', '.join(BACKENDS)}")
        if self.ema_dtype not in EMA_DTYPES:
            raise ValueError(f"DEMAConfig.ema_dtype={self.ema_dtype!r} is not known; allowed: {', '.join(EMA_DTYPES)}")
        # NumPy (and other numbers.Real) values are stored as Python floats.
        for field, allowed, ok in (("scale", "scale > 0 (finite)", lambda v: v > 0),
                                   ("fallback", "0 < fallback < 1", lambda v: 0 < v < 1),
                                   ("beta", "0 < beta < 1", lambda v: 0 < v < 1)):
            given = getattr(self, field)
            value = _as_float(field, given, allowed)
            if not math.isfinite(value) or not ok(value):
                raise ValueError(f"DEMAConfig.{field}={given!r} is out of range; allowed range: {allowed}")
            object.__setattr__(self, field, value)
        # The kernels compute in float32: a value that rounds to 0, 1 or inf there, or an α
        # so small that 1 - α rounds to 1 (the EMA would never move), cannot work.
        if not 0.0 < _f32(self.scale) < math.inf:
            raise ValueError(f"DEMAConfig.scale={self.scale!r} is not representable in float32 (the kernels' "
                             f"precision): it rounds to {_f32(self.scale)}; use a scale between 1e-38 and 3e38")
        _check_alpha("fallback", self.fallback, _f32(self.fallback))
        if self.formula == "fixed":
            _check_alpha("beta", self.beta, _f32(1.0 - _f32(self.beta)), via="1 - beta")

    def kernel_scalars(self) -> tuple:
        """(formula code, scale, fallback, beta): the scalars every kernel takes, in this order."""
        return FORMULA_CODE[self.formula], float(self.scale), float(self.fallback), float(self.beta)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DEMAConfig":
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"DEMAConfig got unknown fields {sorted(unknown)}; known: {sorted(cls.__dataclass_fields__)}")
        return cls(**d)


_F32_MAX = 3.4028234663852886e38
# Smallest α for which float32 1 - α is below 1 (else the EMA update is a no-op).
_MIN_ALPHA = 2.0**-24


def _f32(v: float) -> float:
    """v rounded to float32 (inf when it overflows)."""
    if abs(v) > _F32_MAX * (1 + 2.0**-25):
        return math.copysign(math.inf, v)
    return struct.unpack("f", struct.pack("f", v))[0]


def _as_float(field: str, value, allowed: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or type(value).__name__ == "bool_":
        raise ValueError(f"DEMAConfig.{field}={value!r} must be a number; allowed range: {allowed}")
    try:
        return float(value)
    except OverflowError:
        shown = repr(value) if len(repr(value)) < 40 else repr(value)[:20] + "..."
        raise ValueError(f"DEMAConfig.{field}={shown} is too large for a float; allowed range: {allowed}") from None


def _check_alpha(field: str, value: float, alpha32: float, via: str = "") -> None:
    """The α a setting gives, in float32, must move the EMA and not replace it."""
    if not _MIN_ALPHA <= alpha32 < 1.0 or _f32(1.0 - alpha32) >= 1.0:
        what = f"alpha = {via} = {alpha32!r}" if via else f"rounds to {alpha32!r}"
        raise ValueError(
            f"DEMAConfig.{field}={value!r} gives an alpha the float32 kernels cannot use ({what}): "
            f"alpha must lie in [{_MIN_ALPHA:.3g}, 1) after rounding to float32, or the EMA never moves"
        )
