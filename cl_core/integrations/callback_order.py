"""Where the Hugging Face DEMACallback sits in the Trainer's callback list: before the
``report_to`` callbacks, so every logging backend sees the DEMA numbers.

transformers lists its logging integrations (TensorBoard, W&B, MLflow, ...) before the user's
callbacks and hands them each log line first, with no earlier event in which a callback can
add to it; so the DEMA numbers would reach ``log_history`` but no backend. The Trainer's
callback list is only reachable from the list itself (callbacks are not given the Trainer),
hence the garbage collector's referrers.
"""
from __future__ import annotations

import gc
import logging
import weakref

logger = logging.getLogger(__name__)

_warned = weakref.WeakSet()   # callbacks whose list was not found (said once per callback)


def _is_report_callback(callback) -> bool:
    """One of transformers' ``report_to`` integrations (TensorBoard, W&B, MLflow, ...)."""
    return type(callback).__module__.startswith("transformers.integrations")


def report_before_loggers(callback) -> None:
    """Move ``callback`` before the ``report_to`` callbacks of every Trainer it was given to."""
    lists = [r for r in gc.get_referrers(callback)
             if isinstance(r, list) and any(type(c).__name__ == "DefaultFlowCallback" for c in r)]
    if not lists:
        if callback not in _warned:
            _warned.add(callback)
            logger.warning("DEMACallback: could not find the Trainer's callback list, so report_to backends "
                           "listed before this callback miss the DEMA numbers (they are in log_history)")
        return
    for callbacks in lists:          # (one per Trainer this callback was given to)
        loggers = [i for i, c in enumerate(callbacks) if _is_report_callback(c)]
        mine = next(i for i, c in enumerate(callbacks) if c is callback)
        if loggers and loggers[0] < mine:
            callbacks.pop(mine)
            callbacks.insert(loggers[0], callback)
            logger.info("DEMACallback: runs before the report_to callbacks (%s) so they log the DEMA numbers",
                        ", ".join(type(callbacks[i + 1]).__name__ for i in loggers))
