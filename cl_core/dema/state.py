"""Per-group DEMA state shared by every backend, and the per-tensor α rule.

The engine splits its tensors into groups of one (device, dtype). Each group keeps
its EMA and previous gradients as one flat buffer each (views per tensor), so a
backend can address all tensors of a step at once. Their dtype is `ema_dtype`: float32,
or the parameter dtype with DEMAConfig(ema_dtype="param") (float64 parameters keep a
float32 EMA either way). Small per-tensor vectors:

    started   uint8 [T]  the EMA of this tensor exists (lazy start, docs/design.md §2)
    has_prev  uint8 [T]  g_prev holds the previous step's gradient
    d         fp32  [T]  ‖θ − θ*‖₁ after the last update (the "paper" formula's d)
    alpha     fp32  [T]  α applied at the last update (0 when the tensor was skipped)
    skips     int64 [T]  updates skipped because θ or g held NaN/inf
"""
from __future__ import annotations

import torch

# f32: a Python float rounded to float32 (what the kernels take as a scalar argument), by
# host arithmetic: no torch scalar, so no device sync
from cl_core.dema.config import DEMAConfig
from cl_core.dema.config import _f32 as f32


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (FSDP2), the tensor itself otherwise."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def alpha_rule(config: DEMAConfig, a: float, b: float, c: float, d: float,
               dtype: torch.dtype = torch.float32) -> float:
    """α of one tensor from its statistics, exactly as docs/design.md §2: float32 arithmetic,
    or, for a 16-bit `dtype` (ema_dtype="param"), the official code's arithmetic in that dtype
    (`dynamic_alpha`). Used by the reference backend; the vectorised backends implement the
    same expression (same operation order, same rounding) on device.
    """
    if config.formula == "fixed":
        return fixed_alpha(config)
    stats = torch.tensor([a, b, c, d], dtype=torch.float32)
    dyn = dynamic_alpha(stats[0], stats[1], stats[2], stats[3], config, dtype)
    alpha = float(dyn)
    if not (0.0 < alpha < 1.0):  # NaN and inf land here too
        alpha = fallback_alpha(config)
    return alpha


def fallback_alpha(config: DEMAConfig) -> float:
    """The fallback α as every backend applies it: the float32 value of DEMAConfig.fallback
    (for the official 0.01 the official code's double 0.01 gives the same float32 weights,
    ema*(1-α) and p*α; tests/engine/test_official_bits.py checks it)."""
    return f32(config.fallback)


def is_at_fallback(alpha, config: DEMAConfig):
    """Whether an applied α (a float, or a float32 tensor of per-tensor α) is the fallback:
    the one rule for "α sat at the fallback" (the training log, the report, the regime
    figures). Every backend writes exactly `fallback_alpha(config)` (float32) when the formula
    leaves (0, 1), so the test is exact float32 equality; a tolerance would also count dynamic
    α that merely lie close to the fallback. A fixed EMA has no fallback: always False."""
    if isinstance(alpha, torch.Tensor):
        if config.formula == "fixed":
            return torch.zeros_like(alpha, dtype=torch.bool)
        return alpha.float() == fallback_alpha(config)
    return config.formula != "fixed" and f32(float(alpha)) == fallback_alpha(config)


def fixed_alpha(config: DEMAConfig) -> float:
    """α of the "fixed" formula as the kernels compute it: 1 − β in float32 from float32 β."""
    return f32(1.0 - f32(config.beta))


def dynamic_alpha(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, d: torch.Tensor,
                  config: DEMAConfig, dtype: torch.dtype) -> torch.Tensor:
    """The formula's α from float32 statistics (tensors of one shape), before the fallback
    test. float32: (1 + b) / (a·c) · (scale or d) in float32. A 16-bit `dtype` (ema_dtype=
    "param"; the statistics are then values of that dtype): the official `ema_update` op
    for op on 16-bit tensors, each result rounded to the dtype as torch computes a 16-bit
    op (in float32, rounded once): t1 = 1 + b, t2 = a·c, q = t1 / t2, q · f32(scale) (or
    q · d). Returned as float32 (exact: a 16-bit value)."""
    mult = config.scale if config.formula == "official" else d
    if dtype == torch.float32:
        return (1.0 + b) / (a * c) * mult
    a, b, c = (x.to(dtype) for x in (a, b, c))
    if isinstance(mult, torch.Tensor):
        mult = mult.to(dtype)
    return ((1 + b) / (a * c) * mult).float()


def round_sum(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float64 sums `x` rounded ONCE to `dtype` (to nearest, ties to even), as float32.

    torch's float64 -> bfloat16/float16 cast goes through float32 and can round twice (a
    sum just above a bfloat16 midpoint lands on it in float32, then rounds to even). Here
    float64 -> float32 rounds to odd (truncate, then set the last bit when inexact), which
    keeps the information a second rounding needs (float32 has >= 2 more bits than either
    16-bit dtype), so the float32 -> dtype rounding is the correct single rounding. The
    native kernels use the same rule (dema_common.h `round_sum_*`)."""
    f = x.float()
    inexact = f.double() != x
    toward_zero = inexact & (f.double().abs() > x.abs())
    bits = (f.view(torch.int32) - toward_zero.to(torch.int32)) | inexact.to(torch.int32)
    return bits.view(torch.float32).to(dtype).float()


def ema_dtype_for(config: DEMAConfig, param_dtype: torch.dtype) -> torch.dtype:
    """The dtype of θ* and g_prev for parameters of `param_dtype`."""
    if config.ema_dtype == "param" and param_dtype in (torch.bfloat16, torch.float16):
        return param_dtype
    return torch.float32


class GroupState:
    """EMA buffers and per-tensor flags of one (device, dtype) group."""

    def __init__(self, locals_: list[torch.Tensor], config: DEMAConfig):
        self.numels = [t.numel() for t in locals_]
        self.shapes = [tuple(t.shape) for t in locals_]
        self.offsets = [0]
        for n in self.numels:
            self.offsets.append(self.offsets[-1] + n)
        device = locals_[0].device
        total = self.offsets[-1]
        self.device = device
        self.ema_dtype = ema_dtype_for(config, locals_[0].dtype)
        self.ema_flat = torch.empty(total, dtype=self.ema_dtype, device=device)
        # g_prev is only needed by the dynamic formulas; "fixed" moves 12 B/element.
        self.needs_grad_prev = config.formula != "fixed"
        self.gprev_flat = (
            torch.zeros(total, dtype=self.ema_dtype, device=device) if self.needs_grad_prev else None
        )
        n = len(locals_)
        self.started = torch.zeros(n, dtype=torch.uint8, device=device)
        self.has_prev = torch.zeros(n, dtype=torch.uint8, device=device)
        self.d = torch.zeros(n, dtype=torch.float32, device=device)
        self.alpha = torch.zeros(n, dtype=torch.float32, device=device)
        self.skips = torch.zeros(n, dtype=torch.int64, device=device)
        self.ema_views = self._views(self.ema_flat)
        self.gprev_views = self._views(self.gprev_flat) if self.gprev_flat is not None else None
        # The EMA starts as the parameters (overwritten per tensor at its first
        # finite update); this keeps the buffer finite from the start.
        with torch.no_grad():
            for view, t in zip(self.ema_views, locals_):
                view.copy_(t.detach().reshape(-1))
            self.ema_flat.nan_to_num_(0.0, 0.0, 0.0)

    # Pickle and deepcopy keep the flat buffers only; the per-tensor views are rebuilt on
    # the copy (pickled views would not share storage with the copied buffer).
    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["ema_views"] = state["gprev_views"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.ema_views = self._views(self.ema_flat)
        self.gprev_views = self._views(self.gprev_flat) if self.gprev_flat is not None else None

    def _views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return [flat[o : o + n] for o, n in zip(self.offsets[:-1], self.numels)]

    def __len__(self) -> int:
        return len(self.numels)
