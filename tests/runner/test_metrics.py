"""cl_core.metrics against the published numbers of docs/design.md §5 and hand-computed cases."""
import math

import pytest

from cl_core import metrics

# LCIA Table 1, "LoRA Fine-Tune" on LLaVA-7B (CoIN, 8 tasks): final row and diagonal.
FINAL = [21.26, 28.74, 10.25, 36.78, 32.45, 0.83, 42.50, 57.08]
DIAG = [82.45, 49.99, 96.05, 56.40, 55.45, 31.27, 62.20, 57.08]


def _lcia_matrix(fill=50.0):
    """8x8 with the published diagonal and final row; other entries only affect MAA."""
    t = len(DIAG)
    a = [[fill] * t for _ in range(t)]
    for i in range(t):
        a[i][i] = DIAG[i]
    a[t - 1] = list(FINAL)
    return a


def test_lcia_table1_lora_finetune():
    m = metrics.summarize(_lcia_matrix())
    assert round(m["avg_acc"], 2) == 28.74
    assert round(m["forgetting"], 2) == 37.29
    assert round(m["new_acc"], 2) == 61.36


def test_coin_bwt_same_run():
    # CoIN reports BWT -32.62 for the same run (1/T normalisation); exact value -32.625.
    m = metrics.summarize(_lcia_matrix())
    assert m["bwt"] == pytest.approx(-32.625, abs=1e-9)
    assert abs(m["bwt"] - (-32.62)) < 0.006


def test_upper_triangle_is_ignored():
    a, b = _lcia_matrix(0.0), _lcia_matrix(100.0)
    for j in range(8):
        for i in range(j + 1):
            b[j][i] = a[j][i]
    assert metrics.summarize(a) == metrics.summarize(b)


def test_maa_hand_computed():
    a = [[80, 0, 0], [60, 90, 0], [40, 70, 100]]
    m = metrics.summarize(a)
    # MAA = (80 + (60+90)/2 + (40+70+100)/3) / 3
    assert m["maa"] == pytest.approx((80 + 75 + 70) / 3)
    assert m["avg_acc"] == pytest.approx(70)
    assert m["forgetting"] == pytest.approx(((80 - 40) + (90 - 70)) / 2)
    assert m["new_acc"] == pytest.approx(90)
    assert m["bwt"] == pytest.approx(((40 - 80) + (70 - 90) + 0) / 3)


def test_max_forgetting_hand_computed():
    # Task 0 peaks after task 1 (90 > its 60 right after training), task 1 after itself.
    a = [[60, 0, 0, 0],
         [90, 50, 0, 0],
         [70, 80, 40, 0],
         [30, 20, 35, 70]]
    m = metrics.summarize(a)
    # LCIA: from the diagonal.   Continual-NExT: from the best value in rows i .. T-2.
    assert m["forgetting"] == pytest.approx(((60 - 30) + (50 - 20) + (40 - 35)) / 3)
    assert m["forgetting_max"] == pytest.approx(((90 - 30) + (80 - 20) + (40 - 35)) / 3)
    # The last row does not count as a peak: a task better at the end has negative forgetting.
    b = [[50, 0], [70, 60]]
    assert metrics.summarize(b)["forgetting_max"] == pytest.approx(50 - 70)
    assert metrics.summarize(b)["forgetting"] == pytest.approx(50 - 70)
    # Without any later peak the two definitions agree.
    c = [[80, 0, 0], [60, 90, 0], [40, 70, 100]]
    assert metrics.summarize(c)["forgetting_max"] == metrics.summarize(c)["forgetting"]


def test_max_forgetting_partial_and_upper_triangle():
    rows = [[60, 99, 99], [90, 50, 99]]        # entries above the diagonal never count
    m = metrics.summarize_partial(rows)
    assert m["forgetting_max"] == pytest.approx(60 - 90) and m["forgetting"] == pytest.approx(60 - 90)


def test_single_task_metrics_are_its_accuracy_with_no_forgetting():
    m = metrics.summarize([[55.0]])
    assert m == {"avg_acc": 55.0, "forgetting": 0.0, "forgetting_max": 0.0, "new_acc": 55.0, "bwt": 0.0, "maa": 55.0}


def test_partial_equals_leading_block():
    full = _lcia_matrix(33.0)
    for k in range(1, 9):
        part = metrics.summarize_partial(full[:k])
        block = metrics.summarize([row[:k] for row in full[:k]])
        assert part["tasks_done"] == k and part["tasks_total"] == 8
        for name in metrics.METRIC_NAMES:
            assert part[name] == pytest.approx(block[name])


def test_partial_accepts_ragged_lower_triangle():
    m = metrics.summarize_partial([[80], [60, 90]])
    assert m["tasks_done"] == 2 and m["avg_acc"] == pytest.approx(75)


@pytest.mark.parametrize("bad, needle", [
    ([[1, 2, 3], [4, 5, 6]], "square"),
    ([[1, 2], [3]], "square"),
    ([[50, float("nan")], [50, 50]], "NaN"),
    ([[50, 50], [101, 50]], "outside [0, 100]"),
    ([[50, 50], [-0.5, 50]], "outside [0, 100]"),
    ([[50, "x"], [50, 50]], "not a number"),
    ([[50, None], [50, 50]], "not a number"),
    ([], "empty"),
    (5, "list of rows"),
])
def test_bad_matrices_raise_clear_errors(bad, needle):
    with pytest.raises(ValueError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        metrics.summarize(bad)


def test_partial_rejects_bad_rows():
    with pytest.raises(ValueError, match="at least 2"):
        metrics.summarize_partial([[50, 50], [50]])
    with pytest.raises(ValueError, match="NaN"):
        metrics.summarize_partial([[float("nan")]])
    with pytest.raises(ValueError, match="only 1 tasks"):
        metrics.summarize_partial([[50], [50]])


def test_numpy_input_and_mean_std():
    np = pytest.importorskip("numpy")
    m = metrics.summarize(np.array(_lcia_matrix()))
    assert round(m["avg_acc"], 2) == 28.74
    mean, std = metrics.mean_std([1.0, 3.0])
    assert mean == 2.0 and std == pytest.approx(math.sqrt(2))
    assert metrics.mean_std([4.0]) == (4.0, 0.0)
