"""bench/regime_study.py (the regime study of docs/regime.md): its recomputed α agrees with the
engine's on every update, its fallback counts with the runner's own, and its smallest
configuration runs end to end."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from cl_core import DEMAConfig

_PATH = Path(__file__).resolve().parents[2] / "bench" / "regime_study.py"


def _study():
    """bench/ is no package: the script loaded by path (registered, as its dataclasses need)."""
    if "regime_study" not in sys.modules:
        spec = importlib.util.spec_from_file_location("regime_study", _PATH)
        module = importlib.util.module_from_spec(spec)
        sys.modules["regime_study"] = module
        spec.loader.exec_module(module)
    return sys.modules["regime_study"]


@pytest.mark.parametrize("config", [DEMAConfig(), DEMAConfig(formula="paper"), DEMAConfig(scale=0.01, fallback=0.001)])
@pytest.mark.parametrize("numel", [64, 3000])
def test_tracker_matches_engine(config, numel):
    """The study's float64 recomputation of a, b, c, d and the raw α predicts the engine's
    applied α on every update (a dynamic α within float32 rounding, else exactly the
    fallback), on trajectories that cross every regime (jumps, α ≥ 1, the first update)."""
    study = _study()
    r = study.simulate(numel, lr=5e-3, steps=40, D=0.3, s=1.0, G=1e-3, config=config, seed=3)
    assert r["n"] == 40
    assert r["mismatch"] == 0
    assert r["causes"]["first"] == 1                       # the lazy start's update
    assert sum(r["causes"].values()) == r["at_fallback"]
    assert r["causes"]["other"] == 0
    assert r["at_fallback"] + r["between"] + r["jumps"] == r["n"]
    assert 0.0 <= r["lag"] <= 1.5


def test_tracker_sees_a_dynamic_alpha():
    """Not everything lands on the fallback: at a size and lr where the official α is in
    (0, 1) the tracker counts dynamic values, and they agree with the engine's."""
    study = _study()
    r = study.simulate(4096, lr=5e-3, steps=40, D=0.3, s=0.3, G=1e-3, config=DEMAConfig(), seed=0)
    assert r["mismatch"] == 0
    assert r["n"] - r["at_fallback"] > 5


@pytest.mark.slow
def test_smallest_study_runs(tmp_path):
    """The smallest preset end to end (part 1 on the runner, part 2 fitted on it): every
    recomputed α agrees with the engine's, and the fallback count equals the runner's own
    α counts (results.json), task by task."""
    study = _study()
    assert study.main(["--preset", "smallest", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "study.json").read_text())
    assert [c["name"] for c in result["bench"]] == ["core", "paper"]
    runner = json.loads((tmp_path / "runs" / "core" / "results.json").read_text())
    for config in result["bench"]:
        tasks = config["methods"]["dema"]["seeds"]["0"]["tasks"]
        assert list(tasks) == ["1"]                         # DEMA from task 2
        for t in tasks.values():
            assert t["mismatch"] == 0
            assert sum(t["causes"].values()) == t["at_fallback"]
    core = result["bench"][0]["methods"]["dema"]["seeds"]["0"]["tasks"]["1"]
    assert core["at_fallback"] == runner["methods"]["dema"]["alpha_counts"]["at_fallback"]
    assert core["n"] == runner["methods"]["dema"]["alpha_counts"]["n"]
    # the engine's own regime statistics (issue 33 item 1) against the tracker's recomputation
    engine = runner["methods"]["dema"]["seeds"]["0"]["regime"][1]
    counts = engine["counts"]
    assert (counts["start"], counts["raw_ge1"], counts["raw_le0"], counts["raw_nan"], counts["jump"]) == (
        core["causes"]["first"], core["causes"]["ge1"], core["causes"]["le0"], core["causes"]["nonfinite"],
        core["jumps"])
    assert engine["lag"] == pytest.approx(core["lag"], rel=1e-5)
    syn = result["synthetic"]
    assert syn["official"] and all(0.0 <= r["fallback"] <= 1.0 and r["mismatch"] == 0 for r in syn["official"])
    assert "| core (pipeline check) | dema |" in (tmp_path / "study.md").read_text()
