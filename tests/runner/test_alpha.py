"""Where α landed (cl_core.continual.alpha): counts against hand-computed cases."""
import math

import pytest

from cl_core.continual import alpha as A


def test_counts_hand_computed():
    # Two steps x three tensors; fallback 0.01 (recorded in float32: 0.0099999998).
    hist = [[0.009999999776482582, 0.5, 0.05], [0.01, 0.001, 1e-9]]
    c = A.alpha_counts(hist, fallback=0.01, numel=[512, 1024, 768])
    assert c["n"] == 6
    assert c["at_fallback"] == 2
    assert c["above"] == 1             # 0.5
    assert c["between"] == 1           # 0.05
    assert c["below"] == 2             # 0.001, 1e-9
    assert c["in_range"] == 4          # everything off the fallback
    assert A.geometric_mean_in_range(c) == pytest.approx(10 ** ((math.log10(0.5) + math.log10(0.05) - 3 - 9) / 4))
    assert (c["numel_min"], c["numel_max"]) == (512, 1024)
    assert sum(c["bins"]) == 6
    edges = A.bin_edges()
    k = max(i for i, e in enumerate(edges[:-1]) if e <= 0.5)
    assert c["bins"][k] >= 1 and c["bins"][0] == 1  # 1e-9 is below the first edge: first bin
    assert A.share(c, "at_fallback") == pytest.approx(2 / 6) and A.share(c, "above") == pytest.approx(1 / 6)


def test_fixed_ema_has_no_fallback_and_merge_adds_up():
    a = A.alpha_counts([[0.01, 0.01]], fallback=None, numel=[4, 8])
    assert a["at_fallback"] == 0 and a["between"] == 0 and a["n"] == 2
    b = A.alpha_counts([[0.2], [0.01]], fallback=0.01, numel=[16])
    c = A.alpha_counts([[0.03, 0.001]], fallback=0.01, numel=[2])
    m = A.merge([b, {}, c])
    assert m["n"] == 4 and m["at_fallback"] == 1 and m["above"] == 1 and m["between"] == 1 and m["below"] == 1
    assert m["bins"] == [x + y for x, y in zip(b["bins"], c["bins"])]
    assert (m["numel_min"], m["numel_max"]) == (2, 16)
    assert A.merge([]) == {} and A.share({}, "above") == 0.0


def test_histogram_layout_travels_with_the_counts():
    c = A.alpha_counts([[0.01, 0.001]], fallback=0.01)
    assert A.bin_edges(c) == A.bin_edges() and len(c["bins"]) == len(A.bin_edges()) - 1
    # The powers of ten sit mid-bin: a fallback of 0.01 is not split across two bars.
    edges = A.bin_edges()
    k = next(i for i in range(len(edges) - 1) if edges[i] <= 0.01 < edges[i + 1])
    assert edges[k] < 0.01 * 0.9 and edges[k + 1] > 0.01 * 1.1
    other = dict(c, bins=c["bins"][:-1], bin_log10_low=-6.0)   # counts saved with another layout
    assert len(A.bin_edges(other)) == len(other["bins"]) + 1 and A.bin_edges(other)[0] == 1e-6
    with pytest.raises(ValueError, match="different histogram layouts"):
        A.merge([c, other])
