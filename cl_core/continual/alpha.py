"""Where the EMA weight α landed: per-task counts of the per-step, per-tensor α a
``DEMACallback(record_alpha=True)`` recorded, merged per method for the report.

    counts = alpha_counts(callback.alpha_history, fallback=0.01, numel=[512, 1024, ...])
    total = merge([counts_task1, counts_task2, ...])
    share_at_fallback(total), share_above(total), share(total, "between")

Why it matters (issue 13): the official α = scale·(1 + ‖g‖₁)/(‖θ − θ*‖₁·‖g − g_prev‖₁) sums
L1 norms over whole tensors, so its size depends on the tensor's size. The counts keep the
share of updates that landed exactly on the fallback (the formula left (0, 1) or could not
be computed), the share above 0.1, a log-scale histogram, and the tensor sizes.
"""
from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence

from cl_core.dema.config import DEMAConfig
from cl_core.dema.state import is_at_fallback

# Histogram bins: quarter decades centred on the powers of ten (so a fallback of 0.01 or 0.001
# sits in the middle of its bar), from 10^-6 to 10^0; values outside go to the end bins.
LOG10_LOW, LOG10_STEP, N_BINS = -6.125, 0.25, 25
ABOVE = 0.1  # the "large α" mark of the report


def bin_edges(counts: Optional[dict] = None) -> list:
    """The histogram's bin edges (of ``counts``' own layout when given: counts saved by
    another version keep theirs)."""
    low = (counts or {}).get("bin_log10_low", LOG10_LOW)
    step = (counts or {}).get("bin_log10_step", LOG10_STEP)
    n = len(counts["bins"]) if counts and "bins" in counts else N_BINS
    return [10 ** (low + k * step) for k in range(n + 1)]


def alpha_counts(history: Iterable[Sequence[float]], fallback: Optional[float],
                 numel: Sequence[int] = ()) -> dict:
    """Counts over every (step, tensor) α of one task. ``fallback`` None (a fixed EMA): no
    value is counted as a fallback."""
    # the engine's one rule (exact float32 equality), through a config that carries this fallback
    rule = DEMAConfig(formula="fixed") if fallback is None else DEMAConfig(fallback=fallback)
    n = at_fallback = above = in_range = between = below = 0
    log_sum = 0.0
    bins = [0] * N_BINS
    for step in history:
        for a in step:
            a = float(a)
            n += 1
            at = is_at_fallback(a, rule)
            if at:
                at_fallback += 1
            elif a > 0:
                in_range += 1
                log_sum += math.log10(a)
            if a > ABOVE:
                above += 1
            elif fallback is not None and not at and a > fallback:
                between += 1       # above the fallback, at most 0.1
            elif fallback is not None and not at and a < fallback:
                below += 1
            if a > 0:
                k = int(math.floor((math.log10(a) - LOG10_LOW) / LOG10_STEP))
                bins[min(max(k, 0), N_BINS - 1)] += 1
    numel = [int(x) for x in numel]
    return {"n": n, "at_fallback": at_fallback, "above": above, "between": between, "below": below,
            "in_range": in_range, "bin_log10_low": LOG10_LOW, "bin_log10_step": LOG10_STEP,
            "log10_sum_in_range": log_sum, "bins": bins, "fallback": fallback,
            "numel_min": min(numel) if numel else None, "numel_max": max(numel) if numel else None}


def merge(counts: Iterable[dict]) -> dict:
    """The sum of several tasks' (or seeds') counts; {} when there are none."""
    counts = [c for c in counts if c and c.get("n")]
    if not counts:
        return {}
    layout = [(c.get("bin_log10_low", LOG10_LOW), c.get("bin_log10_step", LOG10_STEP), len(c["bins"]))
              for c in counts]
    if len(set(layout)) > 1:
        raise ValueError(f"α counts with different histogram layouts cannot be merged: {sorted(set(layout))}")
    out = {"n": 0, "at_fallback": 0, "above": 0, "between": 0, "below": 0, "in_range": 0,
           "log10_sum_in_range": 0.0, "bins": [0] * layout[0][2], "fallback": counts[0]["fallback"],
           "numel_min": None, "numel_max": None}
    out["bin_log10_low"], out["bin_log10_step"] = layout[0][0], layout[0][1]
    for c in counts:
        for k in ("n", "at_fallback", "above", "between", "below", "in_range", "log10_sum_in_range"):
            out[k] += c.get(k, 0)
        out["bins"] = [a + b for a, b in zip(out["bins"], c["bins"])]
        for k, pick in (("numel_min", min), ("numel_max", max)):
            if c.get(k) is not None:
                out[k] = c[k] if out[k] is None else pick(out[k], c[k])
    return out


def share_at_fallback(c: dict) -> float:
    return c["at_fallback"] / c["n"] if c.get("n") else 0.0


def share_above(c: dict) -> float:
    return c["above"] / c["n"] if c.get("n") else 0.0


def share(c: dict, key: str) -> float:
    """Share of the updates counted under ``key`` (at_fallback, above, between, below)."""
    return c[key] / c["n"] if c.get("n") else 0.0


def geometric_mean_in_range(c: dict) -> Optional[float]:
    """Geometric mean of the α values that were not the fallback (None if there are none)."""
    if not c.get("in_range"):
        return None
    return 10 ** (c["log10_sum_in_range"] / c["in_range"])
