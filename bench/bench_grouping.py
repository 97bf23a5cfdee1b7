"""Instruction grouping speed (docs/design.md §4), in one run:

1. 100 x 100 templates: the official pair-by-pair procedure (one TfidfVectorizer fit per pair)
   against cl_core's sparse-product path; the speed-up is printed (target >= 50x) and the two
   similarities must agree to 1e-9.
2. Routing 100,000 test instructions (all different) against 8 groups of 10 templates
   (target under 2 s).

    .venv/bin/python -m pytest bench/bench_grouping.py --benchmark-only
"""
import random
import statistics
import time

import pytest

from cl_core.continual.templates import TASKS, TEMPLATE_SETS
from cl_core.grouping import InstructionGrouper, literal_pair_similarity

_VOCAB = (
    "answer question using single word phrase object image option letter choices directly provide "
    "bounding box coordinate region sentence describes read text picture brief short respond reply "
    "scene photo cover book title author color count left right near small large blue red number"
).split()
_STOP = "the a of in is what with this to and".split()


def _templates(n, seed):
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        words = [rng.choice(_VOCAB if rng.random() < 0.7 else _STOP) for _ in range(rng.randint(6, 14))]
        text = " ".join(words).capitalize() + "."
        if text not in out:
            out.append(text)
    return out


def _median_seconds(benchmark, fn, rounds):
    """Time fn with pytest-benchmark; fall back to our own clock when benchmarks are disabled."""
    result = benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=1)
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        return result, stats.stats.median
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return result, statistics.median(times)


def test_similarity_100x100_speedup_over_pair_by_pair(benchmark, capsys):
    cur, hist = _templates(100, 1), _templates(100, 2)
    grouper = InstructionGrouper()
    grouper.assign(hist)

    t = time.perf_counter()
    literal = literal_pair_similarity(cur, hist)
    t_literal = time.perf_counter() - t

    (fast,), t_fast = _median_seconds(benchmark, lambda: grouper.similarities(cur), rounds=7)
    ratio = t_literal / t_fast
    benchmark.extra_info.update(
        {"pairs": 100 * 100, "literal_s": t_literal, "fast_s": t_fast, "speedup": ratio, "similarity": fast}
    )
    with capsys.disabled():
        print(
            f"\n[grouping] 100x100 templates: pair-by-pair {t_literal:.2f} s, cl_core {t_fast * 1e3:.2f} ms "
            f"(median of 7) -> speed-up {ratio:.0f}x (target >= 50x); |diff| = {abs(fast - literal):.1e}"
        )
    assert abs(fast - literal) <= 1e-9
    assert ratio >= 50


def test_route_100k_instructions_8_groups(benchmark, capsys):
    grouper = InstructionGrouper(threshold=1.0)  # 1.0: every task opens its own group
    templates = TEMPLATE_SETS["10type"]
    for task in TASKS:
        grouper.assign(templates[task], name=task)
    assert grouper.num_groups == 8
    grouper.threshold = 0.3
    rng = random.Random(0)
    words = [f"w{i}" for i in range(5000)]
    pool = [t for task in TASKS for t in templates[task]]
    instructions = [f"{rng.choice(pool)} {' '.join(rng.choices(words, k=3))}" for _ in range(100_000)]
    assert len(set(instructions)) > 99_000

    routes, t_route = _median_seconds(benchmark, lambda: grouper.route(instructions), rounds=3)
    assert len(routes) == 100_000 and set(routes) <= set(range(8))
    benchmark.extra_info.update({"instructions": 100_000, "groups": 8, "route_s": t_route})
    with capsys.disabled():
        print(
            f"\n[grouping] route 100,000 instructions (all different) against 8 groups x 10 templates: "
            f"{t_route:.2f} s (median of 3; target < 2 s)"
        )
    assert t_route < 2.0


if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__, "--benchmark-only", "-q"])
