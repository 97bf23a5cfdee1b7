"""Continual-learning metrics from an accuracy matrix (docs/design.md §5).

``A[j][i]`` is the accuracy (percent, 0-100) on task ``i`` after training task ``j``
(0-based). Only the lower triangle (``i <= j``) enters the metrics; entries above the
diagonal (accuracy on tasks not trained yet) may be present and are checked but unused.

    Avg.ACC    = mean_i A[T-1][i]                                   (LCIA)
    Forgetting = mean_{i<T-1} (A[i][i] - A[T-1][i])                 (LCIA; 0 when T = 1)
    Forgetting (max) = mean_{i<T-1} (max_{i<=j<T-1} A[j][i] - A[T-1][i])
                                                                    (Continual-NExT; 0 when T = 1)
    New.ACC    = mean_i A[i][i]                                     (LCIA)
    BWT        = (1/T) sum_i (A[T-1][i] - A[i][i])                  (CoIN; note 1/T)
    MAA        = mean_j mean_{i<=j} A[j][i]                         (CoIN)

:func:`summarize` takes a finished run's T x T matrix. :func:`summarize_partial` takes the
rows of a run in progress (k rows of T columns, k <= T): it reports the metrics of the
first k tasks, as if the run had stopped there.
"""
from __future__ import annotations

import math

METRIC_NAMES = ("avg_acc", "forgetting", "forgetting_max", "new_acc", "bwt", "maa")
METRIC_LABELS = {
    "avg_acc": "Avg.ACC", "forgetting": "Forgetting", "forgetting_max": "Forgetting(max)", "new_acc": "New.ACC",
    "bwt": "BWT", "maa": "MAA",
}


def _as_rows(matrix) -> list[list[float]]:
    """The matrix as a list of lists of floats, validated: finite, within [0, 100]."""
    try:
        rows = [list(row) for row in matrix]
    except TypeError:
        raise ValueError("the accuracy matrix must be a list of rows (a 2-D array)") from None
    if not rows:
        raise ValueError("the accuracy matrix is empty")
    out = []
    for j, row in enumerate(rows):
        values = []
        for i, value in enumerate(row):
            if isinstance(value, bool):
                raise ValueError(f"accuracy matrix entry [{j}][{i}] is a bool, not a number")
            try:
                v = float(value)
            except (TypeError, ValueError):
                raise ValueError(f"accuracy matrix entry [{j}][{i}] = {value!r} is not a number") from None
            if math.isnan(v):
                raise ValueError(f"accuracy matrix entry [{j}][{i}] is NaN")
            if not 0.0 <= v <= 100.0:
                raise ValueError(f"accuracy matrix entry [{j}][{i}] = {v} is outside [0, 100] "
                                 "(accuracies are percentages)")
            values.append(v)
        out.append(values)
    return out


def _metrics(rows: list[list[float]], t: int) -> dict:
    """Metrics of the leading t x t block of validated ``rows``."""
    last = rows[t - 1]
    diag = [rows[i][i] for i in range(t)]
    avg_acc = sum(last[:t]) / t
    forgetting = (sum(diag[i] - last[i] for i in range(t - 1)) / (t - 1)) if t > 1 else 0.0
    # The best accuracy task i had after it was trained (rows i .. T-2), not only right after it.
    forgetting_max = (sum(max(rows[j][i] for j in range(i, t - 1)) - last[i] for i in range(t - 1)) / (t - 1)
                      if t > 1 else 0.0)
    new_acc = sum(diag) / t
    bwt = sum(last[i] - diag[i] for i in range(t)) / t
    maa = sum(sum(rows[j][: j + 1]) / (j + 1) for j in range(t)) / t
    return {"avg_acc": avg_acc, "forgetting": forgetting, "forgetting_max": forgetting_max, "new_acc": new_acc,
            "bwt": bwt, "maa": maa}


def summarize(matrix) -> dict:
    """Avg.ACC, Forgetting (LCIA's and the max-based one), New.ACC, BWT and MAA of a
    finished run's square matrix.

    Raises ValueError for a matrix that is not square, holds NaN or a non-number, or has a
    value outside [0, 100].
    """
    rows = _as_rows(matrix)
    t = len(rows)
    for j, row in enumerate(rows):
        if len(row) != t:
            raise ValueError(f"the accuracy matrix must be square (T x T): it has {t} rows "
                             f"but row {j} has {len(row)} entries")
    return _metrics(rows, t)


def summarize_partial(rows) -> dict:
    """Metrics of a run in progress: ``rows`` are the k finished rows of a T-task run
    (each with T entries, or at least ``j + 1`` for row j). Returns the metrics of the
    first k tasks plus ``tasks_done`` (k) and ``tasks_total`` (T)."""
    rows = _as_rows(rows)
    k = len(rows)
    total = max(len(row) for row in rows)
    if k > total:
        raise ValueError(f"{k} finished rows but only {total} tasks (columns)")
    for j, row in enumerate(rows):
        if len(row) < j + 1:
            raise ValueError(f"row {j} of the accuracy matrix has {len(row)} entries; "
                             f"it needs at least {j + 1} (tasks 0..{j} seen)")
    out = _metrics(rows, k)
    out.update(tasks_done=k, tasks_total=total)
    return out


def mean_std(values) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("no values")
    mean = sum(values) / len(values)
    if len(values) == 1:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(var)
