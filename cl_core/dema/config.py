"""DEMAConfig: the settings of the dynamic EMA (DESIGN.md §2) and their validation."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

FORMULAS = ("official", "paper", "fixed")
BACKENDS = ("auto", "triton", "torch", "reference")

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
    """

    formula: str = "official"
    scale: float = 2.0
    fallback: float = 0.01
    beta: float = 0.99
    backend: str = "auto"

    def __post_init__(self):
        if self.formula not in FORMULAS:
            raise ValueError(f"DEMAConfig.formula={self.formula!r} is not known; allowed: {', '.join(FORMULAS)}")
        if self.backend not in BACKENDS:
            raise ValueError(f"DEMAConfig.backend={self.backend!r} is not known; allowed: {', '.join(BACKENDS)}")
        _check_number("scale", self.scale, "scale > 0 (finite)", lambda v: v > 0)
        _check_number("fallback", self.fallback, "0 < fallback < 1", lambda v: 0 < v < 1)
        _check_number("beta", self.beta, "0 < beta < 1", lambda v: 0 < v < 1)

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


def _check_number(field: str, value, allowed: str, ok) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"DEMAConfig.{field}={value!r} must be a number; allowed range: {allowed}")
    if not math.isfinite(value) or not ok(value):
        raise ValueError(f"DEMAConfig.{field}={value!r} is out of range; allowed range: {allowed}")
