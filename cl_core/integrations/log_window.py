"""The DEMA numbers of the training logs, shared by both trainer callbacks: the mean α of the
updates since the last log line (summed on the device, no host sync per step) and the window's
regime from the engine's counters (cl_core/dema/regime.py: the fallback share by cause, jumps,
α quantiles), with the engine's running counts, at each log line; the judgement of the whole
run (one warning when it is out of regime); the regime of a whole training run at its end.
"""
from __future__ import annotations

import torch


class LogWindow:
    """The DEMA numbers of each training log line: the mean α of the updates since the last
    line (summed on the device, no host sync per step), the window's regime from the engine's
    counters (cl_core/dema/regime.py: the fallback share by cause, jumps, α quantiles) and the
    engine's running counts. :meth:`metrics` reads them all with one host sync and judges the
    whole run so far, so a run out of regime is warned once whatever the logging interval."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self._sum = None           # device scalar: Σα over the window
        self.count = 0             # tensor-updates in the window

    def add(self, engine) -> None:
        """One update's α (after the engine's update of this optimizer step)."""
        total = engine.stats.alpha.float().sum()
        self._sum = total if self._sum is None else self._sum + total
        self.count += len(engine.params)

    def __bool__(self) -> bool:
        return self._sum is not None

    def metrics(self, engine, check: bool = True) -> dict:
        """The logged numbers, then a fresh window: ``dema/alpha_mean`` and the window's regime
        (``dema/fallback_share`` and its causes ``dema/fallback_start``, ``_raw_ge1``,
        ``_raw_le0``, ``_raw_nan``; ``dema/jump_share``; ``dema/alpha_q10/q50/q90`` of the α the
        formula set, when it set any), ``dema/out_of_regime`` (1 once the run was judged out of
        regime and warned), and the running counts ``dema/nonfinite_skips``,
        ``dema/missing_grads``, ``dema/skipped_steps``, ``dema/updates``. One host sync."""
        stats = engine.stats
        skips = stats.nonfinite_skips.sum().float().to(self._sum.device if self._sum is not None else "cpu")
        parts = torch.cat([self._sum.view(1), skips.view(1)]) if self._sum is not None else skips.view(1)
        values = parts.tolist()
        window = engine.regime.read("log", check=check)
        out = {}
        if self._sum is not None:
            out["dema/alpha_mean"] = values[0] / max(self.count, 1)
            out.update(regime_metrics(window))
        out.update({"dema/out_of_regime": float(engine.regime.warned),
                    "dema/nonfinite_skips": int(values[-1]), "dema/missing_grads": int(stats.missing_grads.sum()),
                    "dema/skipped_steps": int(stats.skipped_steps), "dema/updates": int(stats.updates)})
        self.reset()
        return out


def train_regime(engine, lag: bool, check: bool):
    """The RegimeReport of a whole training run, read at its end before the EMA replaces the
    weights (the lag needs both): judged (warned once) unless check=False; with `lag`, the
    EMA's lag since the engine's mark_start()."""
    report = engine.regime.read("train", check=check)
    if lag:
        report.lag = engine.lag()
    return report


def regime_metrics(report) -> dict:
    """A RegimeReport's shares and quantiles as ``dema/...`` log numbers (quantiles only
    where the formula set some α; counts and the verdict left to the report)."""
    skip = ("updates", "tensor_updates", "in_regime", "lag")
    return {f"dema/{k}": float(v) for k, v in report.to_dict().items() if k not in skip and v is not None}
