"""The regime DEMA runs in: where α sits and why, counted on the device, read when logging.

DEMA was designed for α set by its formula, mostly small (an average over many steps). Run
on other tensor sizes or learning rates than the official constants were fit to, α sits at
the fallback most of the time (the formula leaves (0, 1)) or jumps (α > 0.1: the EMA nearly
copies the weights). This module says which, per engine, from the numbers every update
already computes (docs/engine.md, "The regime"):

- every tensor-update is put in one CATEGORY: skipped (θ or g held NaN/inf), the fallback
  by cause (no previous gradient or first update; the formula's raw α ≥ 1, ≤ 0, or NaN), or
  α set by the formula (≤ 0.1, or a jump > 0.1). The raw α is `state.dynamic_alpha` of the
  update's own statistics [a, b, c, nonfinite, d] (the table a `reduce_stats` hook sees),
  with the arithmetic every backend uses, so the category agrees with the α applied;
- α set by the formula goes into a histogram of log-spaced bins (quantiles to ±1.8 %);
- counts are kept on the device; an update only copies its statistics into a small ring
  (two tensor copies per group, no host sync); the ring is classified in one vectorised
  pass when it fills or when someone reads. `read(window)` is the one host sync.

`RegimeTracker` is owned by the engine (`DEMA.regime`) and fed by it; `RegimeReport` is
what a read returns (shares, quantiles, a verdict), `regime_advice` the one text that says
what is out of regime and what to try, and `ema_lag` the EMA's lag at the end of a task.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Optional

import torch

from cl_core.dema.config import DEMAConfig
from cl_core.dema.state import dynamic_alpha, fixed_alpha

log = logging.getLogger(__name__)

# ---- categories of one tensor-update (the order of the counters)
CAT_SKIP = 0  # θ or g held NaN/inf: the tensor was left untouched (not an update of the EMA)
CAT_START = 1  # no previous gradient, no gradient, or the tensor's first update: the fallback α
CAT_GE1 = 2  # the formula's α ≥ 1 (or +inf): it asks for more than a full step; the fallback α
CAT_LE0 = 3  # the formula's α ≤ 0 (paper formula with d = 0, a 16-bit product overflowing); fallback
CAT_NAN = 4  # the formula's α is NaN (0·∞ in its statistics); the fallback α
CAT_DYN = 5  # α set by the formula, ≤ JUMP
CAT_JUMP = 6  # α set by the formula, > JUMP: the EMA moves most of the way to θ in one step
N_CAT = 7
CATEGORY_NAMES = ("skipped", "start", "raw_ge1", "raw_le0", "raw_nan", "dynamic", "jump")
FALLBACK_CAUSES = (CAT_START, CAT_GE1, CAT_LE0, CAT_NAN)

JUMP = 0.1  # α above this is a jump (the definition)
# α histogram: BINS_PER_DECADE log-spaced bins from 10**-DECADES to 1 (α below lands in bin 0)
BINS_PER_DECADE = 64
DECADES = 8
N_BINS = BINS_PER_DECADE * DECADES
_TRASH = N_CAT + N_BINS  # the bin index of updates whose α the formula did not set
N_COUNTERS = N_CAT + N_BINS + 1
QUANTILES = (0.1, 0.5, 0.9)

# The warning's rule (regime_advice): judged over the whole run so far, once at least this many
# tensor-updates (and update calls) were seen, whatever the logging interval.
MIN_TENSOR_UPDATES = 64
MIN_UPDATES = 8
OUT_OF_REGIME_SHARE = 0.5  # more than half of the updates at the fallback, or of the formula's α jumps

# The ring of statistics an update copies into: RING_ELEMENTS values per group at most,
# between MIN_RING and MAX_RING updates (classified in one pass when full).
RING_ELEMENTS = 1 << 16
MIN_RING, MAX_RING = 4, 256


def classify(stats: torch.Tensor, use: torch.Tensor, config: DEMAConfig,
             ema_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(category int64 [N], α the formula set float32 [N]) of N tensor-updates.

    stats: float32 [N, 5] — a, b, c, nonfinite, d of each update, as the backends compute them
    (columns of `reference.STAT_*` / `kernels.layouts.DS_*`); use: bool [N] — the formula's α
    applies (the tensor had started, has a gradient and, for the dynamic formulas, a previous
    gradient). `ema_dtype`: the group's EMA dtype (16-bit: α in that dtype's arithmetic, as
    the kernels form it). The α column is meaningful where the category is DYN or JUMP."""
    a, b, c, nonfinite, d = stats.unbind(-1)
    if config.formula == "fixed":
        raw = torch.full_like(a, fixed_alpha(config))
    else:
        raw = dynamic_alpha(a, b, c, d, config, ema_dtype)
    cat = torch.where(raw > JUMP, CAT_JUMP, CAT_DYN)
    cat = torch.where(raw != raw, CAT_NAN, cat)
    cat = torch.where(raw <= 0, CAT_LE0, cat)
    cat = torch.where(raw >= 1, CAT_GE1, cat)
    cat = torch.where(use, cat, CAT_START)
    cat = torch.where(nonfinite > 0, CAT_SKIP, cat)
    return cat, raw


def _bins(cat: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Counter index of each update's α in the histogram (_TRASH where the formula did not set it)."""
    formula_set = cat >= CAT_DYN
    safe = torch.where(formula_set, alpha, 1.0).clamp_min(1e-30)
    k = ((torch.log10(safe) + DECADES) * BINS_PER_DECADE).floor().clamp(0, N_BINS - 1).to(torch.int64)
    return torch.where(formula_set, k + N_CAT, _TRASH)


def count(cat: torch.Tensor, alpha: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """int64 [N_COUNTERS]: the categories' counts, then the histogram of the formula's α (added
    to `out` when given). index_add_, not bincount: bincount reads its input's maximum on the
    host (a sync on CUDA); integer index_add_ is exact and deterministic."""
    idx = torch.cat([cat.reshape(-1), _bins(cat.reshape(-1), alpha.reshape(-1))])
    if out is None:
        out = torch.zeros(N_COUNTERS, dtype=torch.int64, device=idx.device)
    return out.index_add_(0, idx, torch.ones_like(idx))


def bin_alpha(k: int) -> float:
    """The α a histogram bin stands for: its geometric middle."""
    return 10.0 ** ((k + 0.5) / BINS_PER_DECADE - DECADES)


def _two_pass_inputs(use: torch.Tensor, stats: torch.Tensor):
    """The two-pass ring's fields are the inputs themselves."""
    return stats, use


class _Ring:
    """The last few updates of one engine group (one way of feeding it: two-pass updates, or
    one driver's pending state), kept raw on the group's device: `fields` are the per-update
    tensors copied in at each update, `convert(*batched fields)` turns a batch of them into
    classify's (stats [..., 5], use [...]) at the fold. Copying the raw state keeps an update
    at a few tensor copies; the conversion runs once per fold."""

    def __init__(self, templates, convert, ema_dtype: torch.dtype):
        per_update = sum(t.numel() for t in templates)
        self.size = max(MIN_RING, min(MAX_RING, RING_ELEMENTS // max(1, per_update)))
        self.bufs = [torch.zeros((self.size, *t.shape), dtype=t.dtype, device=t.device) for t in templates]
        self.convert = convert
        self.counts = torch.zeros(N_COUNTERS, dtype=torch.int64, device=templates[0].device)
        self.ema_dtype = ema_dtype
        self.fill = 0


@dataclass
class RegimeReport:
    """What one read of the regime counters says (host numbers; `window` names the span)."""

    formula: str
    counts: list  # N_CAT category counts (CATEGORY_NAMES order)
    histogram: list  # N_BINS counts of the formula's α
    updates: int  # update() / fused steps in the span (each updates every tensor once)
    window: str = "total"
    lag: Optional[float] = None  # ‖θ* − θ‖₁ / ‖θ_start − θ‖₁ when read with one (end of a task)

    @property
    def tensor_updates(self) -> int:
        return sum(self.counts)

    def share(self, cat: int) -> float:
        n = self.tensor_updates
        return self.counts[cat] / n if n else 0.0

    @property
    def fallback(self) -> int:
        """Tensor-updates at the fallback α (none for the fixed formula: it has no fallback)."""
        return 0 if self.formula == "fixed" else sum(self.counts[c] for c in FALLBACK_CAUSES)

    @property
    def fallback_share(self) -> float:
        n = self.tensor_updates
        return self.fallback / n if n else 0.0

    @property
    def formula_set(self) -> int:
        return self.counts[CAT_DYN] + self.counts[CAT_JUMP]

    @property
    def jump_share(self) -> float:
        """Jumps (α > 0.1) among all tensor-updates."""
        return self.share(CAT_JUMP)

    def quantiles(self, qs=QUANTILES) -> list:
        """Quantiles of the α the formula set (None when it set none), from the histogram:
        each within a bin's half-width (±1.8 %) of the exact quantile."""
        total = sum(self.histogram)
        if not total:
            return [None] * len(qs)
        out = []
        for q in qs:
            target, acc = q * total, 0
            for k, v in enumerate(self.histogram):
                acc += v
                if acc >= target and v:
                    out.append(bin_alpha(k))
                    break
        return out

    def dominant_cause(self) -> Optional[int]:
        """The category among the fallback causes with the most updates (None without fallbacks)."""
        if not self.fallback:
            return None
        return max(FALLBACK_CAUSES, key=lambda c: self.counts[c])

    @property
    def in_regime(self) -> bool:
        """False when most updates sat at the fallback or most of the formula's α were jumps."""
        return self.verdict() is None

    def verdict(self) -> Optional[str]:
        """None in regime; else "fallback" or "jumps" (what dominates)."""
        n = self.tensor_updates
        if not n:
            return None
        if self.fallback > OUT_OF_REGIME_SHARE * n:
            return "fallback"
        if self.formula != "fixed" and self.formula_set and self.counts[CAT_JUMP] > OUT_OF_REGIME_SHARE * self.formula_set:
            return "jumps"
        return None

    def to_dict(self) -> dict:
        """Plain numbers for logs, results.json and reports (shares of all tensor-updates)."""
        n = self.tensor_updates
        q = self.quantiles()
        out = {
            "updates": self.updates,
            "tensor_updates": n,
            "fallback_share": self.fallback_share,
            **{f"fallback_{CATEGORY_NAMES[c]}": (self.counts[c] / n if n else 0.0) for c in FALLBACK_CAUSES},
            "skipped_share": self.share(CAT_SKIP),
            "jump_share": self.jump_share,
            **{f"alpha_q{int(round(p * 100))}": v for p, v in zip(QUANTILES, q)},
            "in_regime": self.in_regime,
        }
        if self.formula == "fixed":  # "start" is the lazy start, not a fallback
            for c in FALLBACK_CAUSES:
                out.pop(f"fallback_{CATEGORY_NAMES[c]}")
        if self.lag is not None:
            out["lag"] = self.lag
        return out

    def to_record(self) -> dict:
        """The counts themselves (JSON: categories by name, the histogram's non-empty bins), so
        that records of several tasks or seeds can be merged (`from_records`)."""
        rec = {"formula": self.formula, "updates": self.updates,
               "counts": dict(zip(CATEGORY_NAMES, self.counts)),
               "histogram": {str(k): v for k, v in enumerate(self.histogram) if v}}
        if self.lag is not None:
            rec["lag"] = self.lag
        return rec

    @classmethod
    def from_records(cls, records, window: str = "merged") -> "RegimeReport":
        """One report over the updates of several `to_record` records (of one formula); its lag
        is the mean of theirs (None when none has one)."""
        records = list(records)
        if not records:
            raise ValueError("RegimeReport.from_records: no records")
        formulas = {r["formula"] for r in records}
        if len(formulas) != 1:
            raise ValueError(f"RegimeReport.from_records: records of several formulas {sorted(formulas)}")
        counts, hist = [0] * N_CAT, [0] * N_BINS
        for r in records:
            for k, name in enumerate(CATEGORY_NAMES):
                counts[k] += int(r["counts"].get(name, 0))
            for b, v in r["histogram"].items():
                hist[int(b)] += int(v)
        lags = [r["lag"] for r in records if r.get("lag") is not None]
        return cls(formula=formulas.pop(), counts=counts, histogram=hist, updates=sum(r["updates"] for r in records),
                   window=window, lag=sum(lags) / len(lags) if lags else None)

    def summary(self) -> str:
        """One line: the shares and quantiles, for a log line or a report cell."""
        n = self.tensor_updates
        if not n:
            return "no updates"
        q = ", ".join("-" if v is None else f"{v:.3g}" for v in self.quantiles())
        parts = [f"{n} tensor-updates"]
        if self.formula != "fixed":
            causes = ", ".join(f"{_CAUSE_SHORT[c]} {self.counts[c] / n:.0%}" for c in FALLBACK_CAUSES if self.counts[c])
            parts.append(f"fallback {self.fallback_share:.0%}" + (f" ({causes})" if causes else ""))
        parts.append(f"jumps {self.jump_share:.0%}")
        parts.append(f"α q10/50/90 {q}")
        if self.counts[CAT_SKIP]:
            parts.append(f"skipped {self.share(CAT_SKIP):.0%}")
        if self.lag is not None:
            parts.append(f"lag {self.lag:.1%}")
        return "; ".join(parts)


_CAUSE_SHORT = {CAT_START: "no previous gradient", CAT_GE1: "raw α ≥ 1", CAT_LE0: "raw α ≤ 0", CAT_NAN: "raw α NaN"}

DOCS = "docs/regime.md"


def regime_advice(report: RegimeReport, config: DEMAConfig) -> Optional[str]:
    """The warning for a run out of regime: what dominates, its cause, and what to try (only
    what was measured on the bundled demo; docs/regime.md has the study). None in regime."""
    verdict = report.verdict()
    if verdict is None:
        return None
    head = f"DEMA ({config.formula} formula) is out of its regime over {report.tensor_updates} tensor-updates: "
    if verdict == "jumps":
        return head + (
            f"{report.counts[CAT_JUMP] / report.formula_set:.0%} of the α its formula set were jumps (α > {JUMP}), so the EMA "
            "mostly copies the weights instead of averaging them (measured on the bundled demo: the jumps come while the "
            "learning rate is high, and the EMA ends a task 2-8 % of the way back to its start, the fixed EMA 26-32 %). "
            f"A smaller scale makes α smaller and the jumps rarer; formula='fixed' averages at a known rate; see {DOCS}.")
    cause = report.dominant_cause()
    share = f"{report.fallback_share:.0%} of the updates sat at the fallback α {config.fallback:g}"
    why = f"{report.counts[cause] / report.tensor_updates:.0%} because "
    if cause == CAT_GE1:
        what = (
            "the formula's α was ≥ 1 (it asks for more than a full step)")
        if config.formula == "official":
            fix = (
                f"The official constant scale={config.scale:g} was set for LLaVA-7B LoRA at lr 2e-4: right after the EMA "
                "catches up, α is about scale / (tensor size x per-element step), so small tensors, a low learning rate "
                "and the tail of a decaying schedule push it past 1. Measured on the bundled demo (docs/regime.md): a "
                "smaller scale lowers the fallback share (scale 0.2: 84 % -> 39 %; Continual-NExT's scale=0.01, "
                "fallback=0.001: 23 %), a larger LoRA rank a little (r=64: 74 %); formula='paper' still sat at the "
                "fallback 70 % of the time and elsewhere gave α near 0.5 (no averaging); none of these beat plain LoRA's "
                "Avg.ACC beyond the seeds' spread. At this fallback share the EMA is a fixed EMA: formula='fixed' says so.")
        else:
            fix = "The formula asks for more than a full step at these tensor sizes and learning rates."
    elif cause == CAT_LE0:
        what = "the formula's α was ≤ 0"
        fix = ("With formula='paper' this happens while d = ‖θ − θ*‖₁ is 0 (right after each start); with "
               "ema_dtype='param' in float16 a product of the norms can overflow: keep ema_dtype='float32'.")
    elif cause == CAT_NAN:
        what = "the formula's α was NaN (0·∞ in its statistics: θ equal to θ* and g equal to g_prev)"
        fix = "The gradients repeat exactly between steps; check that the model is training."
    else:
        what = "a tensor had no previous gradient (its first update, or no gradient at this or the last step)"
        fix = ("Call update() after backward() and optimizer.step(), before zero_grad(); a trainer that frees "
               "gradients early, or an EMA restarted every few steps, leaves DEMA without a previous gradient.")
    return (head + share + " (a fixed EMA of beta = 1 - fallback), " + why + what + ". " + fix + f" See {DOCS}.")


def ema_lag(ema: list, params: list, start: list) -> Optional[float]:
    """‖θ* − θ‖₁ / ‖θ_start − θ‖₁ summed over tensors: how far back towards the task's start
    the EMA sits at its end (0: θ* = θ; 1: as far back as the start). None when θ never moved.
    One host sync."""
    num = torch.zeros((), dtype=torch.float64)
    den = torch.zeros((), dtype=torch.float64)
    for e, p, s in zip(ema, params, start):
        p32 = p.detach().float()
        num += (e.float() - p32).abs().sum(dtype=torch.float64).cpu()
        den += (s.float() - p32).abs().sum(dtype=torch.float64).cpu()
    den = float(den)
    return float(num) / den if den > 0 and math.isfinite(den) else None


class RegimeTracker:
    """The regime counters of one engine (one ring and one counter vector per engine group).

    Fed by the engine: two-pass updates through `before_update` / `after_update` around each
    group's backend call, one-pass steps through `record` with the pending decision's inputs.
    Read by anyone through `read(window)`: counts since the previous read of that window
    name (the log window, a task, ...), or since the start with `read_total()`."""

    def __init__(self, config: DEMAConfig):
        self.config = config
        self._rings: dict = {}  # (group position, how it is fed) -> _Ring
        self._updates = 0
        self._marks: dict = {}  # window name -> (counters, updates) at its last read
        self._start = None  # θ_start for ema_lag (mark_start)
        self.warned = False  # check() said the run is out of regime (once)

    # ------------------------------------------------------------------ feeding
    def _ring(self, key, state, templates, convert) -> _Ring:
        ring = self._rings.get(key)
        if ring is None:
            ring = self._rings[key] = _Ring(templates, convert, state.ema_dtype)
        return ring

    def before_update(self, k: int, state) -> None:
        """Before group k's two-pass update: whether the formula's α can apply, per tensor
        (the backends' rule: started, and for the dynamic formulas a previous gradient)."""
        n, dev = len(state), state.device
        ring = self._ring((k, "two-pass"), state, (torch.empty(n, dtype=torch.bool, device=dev),
                                                  torch.empty(n, 5, dtype=torch.float32, device=dev)), _two_pass_inputs)
        out = ring.bufs[0][ring.fill]
        if self.config.formula == "fixed":
            out.copy_(state.started)
        else:
            torch.logical_and(state.started, state.has_prev, out=out)

    def after_update(self, k: int, state, stats: torch.Tensor, no_grad: list) -> None:
        """After group k's two-pass update: its statistics table (a, b, c, nonfinite, d before
        the update; device or CPU) and the group positions that had no gradient."""
        ring = self._rings[(k, "two-pass")]
        ring.bufs[1][ring.fill].copy_(stats)
        if no_grad and self.config.formula != "fixed":  # the fixed α applies without a gradient too
            keep = torch.ones(len(state), dtype=torch.bool)
            keep[no_grad] = False  # a host mask, copied without a sync (as the torch backend's has_grad)
            ring.bufs[0][ring.fill].logical_and_(keep.to(ring.bufs[0].device, non_blocking=True))
        self._advance(ring)

    def record(self, k: int, state, tag: str, fields, convert) -> None:
        """One update of group k from a one-pass driver's pending state: `fields` (tensors
        copied as they are), `convert` (a picklable function of the batched fields giving
        classify's stats and use), `tag` naming the driver (one ring per group and tag)."""
        ring = self._ring((k, tag), state, fields, convert)
        for buf, f in zip(ring.bufs, fields):
            buf[ring.fill].copy_(f)
        self._advance(ring)

    def count_update(self) -> None:
        """One update call (every tensor of every group) was recorded."""
        self._updates += 1

    def _advance(self, ring: _Ring) -> None:
        ring.fill += 1
        if ring.fill == ring.size:
            self._fold(ring)

    def _fold(self, ring: _Ring) -> None:
        if not ring.fill:
            return
        stats, use = ring.convert(*(b[: ring.fill] for b in ring.bufs))
        cat, alpha = classify(stats.reshape(-1, 5), use.reshape(-1), self.config, ring.ema_dtype)
        count(cat, alpha, out=ring.counts)
        ring.fill = 0

    # ------------------------------------------------------------------ reading
    def _totals(self) -> list:
        total = [0] * N_COUNTERS
        for ring in self._rings.values():
            self._fold(ring)
            for i, v in enumerate(ring.counts.tolist()):  # the host sync of a read
                total[i] += v
        return total

    def _report(self, counters: list, updates: int, window: str) -> RegimeReport:
        return RegimeReport(formula=self.config.formula, counts=counters[:N_CAT],
                            histogram=counters[N_CAT:N_CAT + N_BINS], updates=updates, window=window)

    def read_total(self) -> RegimeReport:
        """Everything since the engine was built (one host sync)."""
        return self._report(self._totals(), self._updates, "total")

    def read(self, window: str = "log", check: bool = False) -> RegimeReport:
        """The updates since the previous read of `window` (or since the start), then a new
        window of that name begins. Windows of different names are independent (the log's,
        a task's). check=True also judges the whole run (`check`) from the same read. One
        host sync."""
        total = self._totals()
        prev, prev_updates = self._marks.get(window, ([0] * N_COUNTERS, 0))
        self._marks[window] = (total, self._updates)
        if check:
            self._judge(self._report(total, self._updates, "total"))
        return self._report([t - p for t, p in zip(total, prev)], self._updates - prev_updates, window)

    def check(self) -> RegimeReport:
        """Judge the whole run so far (`read_total`) and warn once, through this module's
        logger, when it is out of regime (`regime_advice`), once at least MIN_TENSOR_UPDATES
        tensor-updates and MIN_UPDATES update calls were seen, whatever the logging interval.
        Called by the integrations at every log line (`read(window, check=True)`), by
        `DEMAStats.to_dict()` and by the runner; returns the total. One host sync."""
        return self._judge(self.read_total())

    def _judge(self, total: RegimeReport) -> RegimeReport:
        if not self.warned and total.tensor_updates >= MIN_TENSOR_UPDATES and total.updates >= MIN_UPDATES:
            text = regime_advice(total, self.config)
            if text is not None:
                self.warned = True
                log.warning("%s (said once)", text)
        return total

    # ------------------------------------------------------------------ the lag
    def mark_start(self, params) -> None:
        """Remember θ now (a copy of each tensor) as the start of a task, for `lag`."""
        with torch.no_grad():
            self._start = [p.detach().clone() for p in params]

    def lag(self, ema: list, params: list) -> Optional[float]:
        """`ema_lag` against the θ of the last `mark_start` (None before one)."""
        if self._start is None:
            return None
        return ema_lag(ema, params, self._start)
