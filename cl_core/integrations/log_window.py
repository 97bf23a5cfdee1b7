"""The DEMA numbers of the training logs, shared by both trainer callbacks: the α of every
update since the last log line summed on the device (no host sync per step), turned into
`dema/alpha_mean`, `dema/fallback_share` and the engine's counters at each log line, and the
warning (once) when the dynamic EMA is in effect a fixed one.
"""
from __future__ import annotations

import logging

import torch

from cl_core.dema.state import is_at_fallback

logger = logging.getLogger(__name__)


class LogWindow:
    """The α of every update since the last log line, summed on the device (no host sync per
    step); :meth:`metrics` turns the window and the engine's counters into the logged numbers.

    A tensor counts as "at the fallback" when its α equals the configured fallback exactly
    (as float32, the dtype the engine keeps α in): the engine writes that very value whenever
    the formula leaves (0, 1) or cannot be computed, so equality counts exactly those updates,
    where a tolerance would also count dynamic α that merely lie close to the fallback.
    """

    # A window counts as "in effect a fixed EMA" when at least this share of at least
    # FALLBACK_MIN_UPDATES tensor-updates used the fallback α.
    FALLBACK_SHARE = 0.95
    FALLBACK_MIN_UPDATES = 16

    def __init__(self):
        self.fallback_windows = 0  # logged windows in effect a fixed EMA (dema/fallback_windows)
        self._warned_fallback = False
        self.reset()

    def reset(self) -> None:
        self._sums = None          # device tensor [2]: Σα, number at the fallback
        self.count = 0             # tensor-updates in the window

    def add(self, engine) -> None:
        """One update's α (after the engine's update of this optimizer step)."""
        alpha = engine.stats.alpha.float()
        row = torch.stack([alpha.sum(), is_at_fallback(alpha, engine.config).sum().float()])
        self._sums = row if self._sums is None else self._sums + row
        self.count += alpha.numel()

    def __bool__(self) -> bool:
        return self._sums is not None

    def metrics(self, engine) -> dict:
        """The logged numbers, then a fresh window: ``dema/alpha_mean`` and ``dema/fallback_share``
        over the tensor-updates of the window, and the running counts ``dema/nonfinite_skips``,
        ``dema/missing_grads``, ``dema/skipped_steps``, ``dema/updates``, and ``dema/fallback_windows``
        (windows in which nearly every α sat at the fallback: warned once). One host sync."""
        stats = engine.stats
        skips = stats.nonfinite_skips.sum().float().to(self._sums.device if self._sums is not None else "cpu")
        parts = torch.cat([self._sums, skips.view(1)]) if self._sums is not None else skips.view(1)
        values = parts.tolist()
        n = max(self.count, 1)
        out = {}
        if self._sums is not None:
            out["dema/alpha_mean"] = values[0] / n
            out["dema/fallback_share"] = values[1] / n
        if self._sums is not None:
            self._check_fallback(engine, int(values[1]), self.count)
        out.update({"dema/nonfinite_skips": int(values[-1]), "dema/missing_grads": int(stats.missing_grads.sum()),
                    "dema/skipped_steps": int(stats.skipped_steps), "dema/updates": int(stats.updates),
                    "dema/fallback_windows": self.fallback_windows})
        self.reset()
        return out

    def _check_fallback(self, engine, at_fallback: int, updates: int) -> None:
        """Never degrade silently: a dynamic EMA whose α nearly always sits at the fallback is a
        fixed EMA of β = 1 − fallback. Counted per logged window, said once per run."""
        config = engine.config
        if config.formula == "fixed" or updates < self.FALLBACK_MIN_UPDATES:
            return
        if at_fallback < self.FALLBACK_SHARE * updates:
            return
        self.fallback_windows += 1
        if not self._warned_fallback:
            self._warned_fallback = True
            logger.warning(
                "DEMA is in effect a fixed EMA (beta %.4g): %d of the %d tensor updates since the last log "
                "line used the fallback alpha %.4g, because the formula's alpha fell outside (0, 1) or had "
                "no previous gradient. On small tensors scale*(1+|g|)/(|theta-ema|*|g-g_prev|) is usually "
                ">= 1; try a smaller DEMAConfig(scale=...) (Continual-NExT uses scale=0.01, fallback=0.001), "
                "or use formula='fixed' knowingly. Counted in dema/fallback_windows; said once.",
                1.0 - config.fallback, at_fallback, updates, config.fallback)
