"""`cl-core demo --quick --out DIR`: the bundled comparison end to end, as a user runs it."""
import json
import subprocess
import sys
import time

import pytest

from cl_core import metrics
from cl_core.continual.config import METHODS


@pytest.mark.slow
def test_demo_quick(tmp_path):
    out = tmp_path / "demo"
    started = time.time()
    p = subprocess.run([sys.executable, "-m", "cl_core", "demo", "--quick", "--out", str(out), "--quiet"],
                       capture_output=True, text=True, timeout=1800)  # a hang guard: shared CPUs can be slow
    took = time.time() - started
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert f"Report: {out / 'report.md'}" in p.stdout
    results = json.loads((out / "results.json").read_text())
    # The four custom methods, the official LCIA recipe and DEMA with Continual-NExT's constants.
    assert tuple(results["methods"]) == METHODS == ("lora", "ema", "dema", "dema+group", "lcia", "cl-next")
    t = len(results["tasks"])
    assert t == 4
    for method in METHODS:
        r = results["methods"][method]
        assert len(r["matrix"]) == t and all(len(row) == t for row in r["matrix"])
        assert r["metrics"] == metrics.summarize(r["matrix"])  # one seed: the mean is that seed
        assert set(r["metrics"]) == set(metrics.METRIC_NAMES)
        seed = r["seeds"]["0"]
        assert len(seed["dema"]) == len(seed["init_from"]) == t
    # The quick preset is a pipeline check (a 300-step base, 30 steps per task: little is
    # learned), yet plain sequential LoRA forgets what it learned, and grouping, whose four
    # tasks each train their own LoRA set and get their test questions routed back to it,
    # keeps every earlier task's accuracy exactly.
    assert results["methods"]["lora"]["metrics"]["forgetting"] > 0
    assert results["methods"]["dema+group"]["metrics"]["forgetting"] == 0
    assert results["methods"]["dema+group"]["seeds"]["0"]["groups"] == [0, 1, 2, 3]
    report = (out / "report.md").read_text()
    for method in METHODS:
        assert f"| {method} |" in report
    # The quick task list opens a new LoRA set per task: the grouping methods never turn DEMA
    # on, and the report says so instead of letting their numbers pass for DEMA's.
    assert results["methods"]["dema+group"]["seeds"]["0"]["dema"] == [False] * t
    assert "**dema+group never turned its EMA on in this run:**" in report
    assert "**lcia never turned its EMA on in this run:**" in report
    assert "1 seeds" not in report and "over 1 seed)" in report
    # The CLI prints the run's own measured time, the one the report states.
    wall = results["wall_seconds_this_call"]
    assert f"Finished in {wall:.0f} s." in p.stdout
    assert f"Wall time of the call that finished this run: {wall:.0f} s" in report
    for png in ("heatmap_lora.png", "alpha_trace.png", "alpha_hist.png", "per_task_accuracy.png"):
        assert (out / png).is_file(), png
    print(f"demo --quick took {took:.0f} s")
