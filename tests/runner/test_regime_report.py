"""The DEMA regime in the runner's records (issue 33): each task with an EMA keeps its regime
and lag in results.json; the counts agree with the α the callback recorded at every step
(the same updates seen from the other side); the report has the per-task table and, before
the comparison, the methods that ran out of regime; the runner warns once per such method."""
import json
import logging

import pytest

from cl_core.continual import report
from cl_core.continual.alpha import alpha_counts
from cl_core.continual.run import RunConfig, run

TINY = dict(methods=("dema", "ema"), seeds=(0,), tasks=("textvqa", "imagenet", "gqa"), n_train=48, n_test=12,
            hidden_size=32, num_layers=1, num_heads=2, stage1_steps=20, stage1_batch_size=8, steps=10,
            batch_size=8, warmup_steps=1, max_length=96)


@pytest.mark.slow
def test_runner_records_and_reports_each_tasks_regime(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="cl_core"):
        results = run(RunConfig(**TINY), tmp_path, quiet=True, threads=1)
    saved = json.loads((tmp_path / "results.json").read_text())
    dema = saved["methods"]["dema"]
    per_task = dema["seeds"]["0"]["regime"]
    assert per_task[0] == {}  # dema: DEMA from task 2
    for j in (1, 2):
        rec = per_task[j]
        steps = TINY["steps"]
        trace = json.loads((tmp_path / "chains" / "dema" / "seed0" / f"alpha_task{j}.json").read_text())
        n_tensors = len(trace["names"])
        assert rec["updates"] == steps and sum(rec["counts"].values()) == steps * n_tensors
        # the α the callback recorded at every step, counted by the report's own rule
        c = alpha_counts(trace["alpha"], 0.01, trace["numel"])
        fallback = sum(rec["counts"][k] for k in ("start", "raw_ge1", "raw_le0", "raw_nan"))
        assert fallback == c["at_fallback"]
        assert rec["counts"]["jump"] == c["above"] and rec["counts"]["start"] == n_tensors  # the first step
        assert 0 < rec["lag"] < 1
    assert dema["regime"]["per_task"][0] is None and dema["regime"]["summary"]["tensor_updates"] == 2 * steps * n_tensors
    ema = saved["methods"]["ema"]["regime"]
    assert ema["summary"]["fallback_share"] == 0.0 and ema["per_task"][1]["record"]["lag"] > 0
    text = (tmp_path / "report.md").read_text()
    assert "## DEMA's regime per task" in text and "### dema" in text and "| 2. imagenet |" in text
    out = report.out_of_regime(results)
    lines = report.regime_lines(results)
    assert [line.split(" ")[0].rstrip(":") for line in lines] == ["dema", "ema"]
    # the official constants on these tiny tensors: α mostly ≥ 1 (the finding on the demo)
    assert out == ["dema"] and lines[0].startswith("dema ran out of DEMA's regime")
    assert text.index("Before comparing") < text.index("## Methods compared")
    warned = [r.getMessage() for r in caplog.records if "out of its regime" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith("dema: ")  # once per method, not once per task
