"""The continual runner on a tiny configuration: outputs, method rules, resume, validation."""
import json
import shutil

import pytest

from cl_core import metrics
from cl_core.continual.run import METHODS, RunConfig, run

# textvqa and gqa share the "original" template, imagenet has its own: with grouping, task 3
# (gqa) re-uses group 0 and gets DEMA, task 2 (imagenet) opens group 1 without it.
TINY = dict(seeds=(0,), tasks=("textvqa", "imagenet", "gqa"), n_train=48, n_test=12, hidden_size=32,
            num_layers=1, num_heads=2, stage1_steps=20, stage1_batch_size=8, steps=6, batch_size=8,
            warmup_steps=1, max_length=96)


def tiny_config(**kw):
    return RunConfig(**{**TINY, **kw})


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    results = run(tiny_config(), out, quiet=True, threads=1)
    return out, results


def test_outputs(full_run):
    out, results = full_run
    saved = json.loads((out / "results.json").read_text())
    assert saved["methods"].keys() == set(METHODS)
    assert saved["tasks"] == ["textvqa", "imagenet", "gqa"]
    assert saved["task_types"] == ["short", "cls", "short"]
    for method, r in saved["methods"].items():
        m = r["matrix"]
        assert len(m) == 3 and all(len(row) == 3 for row in m)
        assert all(0 <= v <= 100 for row in m for v in row)
        assert r["metrics"] == pytest.approx(metrics.summarize(m))  # one seed: mean == the seed
        assert set(r["metrics"]) == set(metrics.METRIC_NAMES)
        final = out / "chains" / method.replace("+", "_") / "seed0" / "task2"
        assert (final / "group_0" / "adapter_config.json").is_file()
    assert (out / "base" / "seed0" / "config.json").is_file()
    assert json.loads((out / "config.json").read_text()) == tiny_config().to_dict()
    state = json.loads((out / "state.json").read_text())
    assert {k: len(v["tasks"]) for k, v in state["chains"].items()} == {f"{m}/seed0": 3 for m in METHODS}
    report = (out / "report.md").read_text()
    assert "Plain sequential LoRA forgets" in report
    for png in ("heatmap_lora.png", "heatmap_dema_group.png", "per_task_accuracy.png", "alpha_trace.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_method_rules(full_run):
    out, results = full_run
    seeds = {m: results["methods"][m]["seeds"]["0"] for m in METHODS}
    assert seeds["lora"]["ema"] == [False, False, False]
    assert seeds["ema"]["ema"] == [False, True, True]
    assert seeds["dema"]["ema"] == [False, True, True]
    # Grouping: textvqa -> group 0 (new), imagenet -> group 1 (new), gqa -> group 0 again (DEMA).
    g = seeds["dema+group"]
    assert g["groups"] == [0, 1, 0] and g["reused"] == [False, False, True] and g["ema"] == [False, False, True]
    assert (out / "chains" / "dema_group" / "seed0" / "task2" / "group_1" / "adapter_config.json").is_file()
    assert (out / "chains" / "dema_group" / "seed0" / "task2" / "grouper.json").is_file()
    # α traces: one per optimizer step on the tasks with an EMA.
    steps = TINY["steps"]
    assert [len(a) for a in seeds["lora"]["alpha"]] == [0, 0, 0]
    assert [len(a) for a in seeds["ema"]["alpha"]] == [0, steps, steps]
    assert all(a == pytest.approx(0.01) for trace in seeds["ema"]["alpha"] for a in trace)  # 1 - β
    assert [len(a) for a in seeds["dema"]["alpha"]] == [0, steps, steps]
    assert all(0 < a < 1 for trace in seeds["dema"]["alpha"] for a in trace)
    assert [len(a) for a in g["alpha"]] == [0, 0, steps]
    trace = json.loads((out / "chains" / "dema" / "seed0" / "alpha_task1.json").read_text())
    assert len(trace["alpha"]) == steps and len(trace["alpha"][0]) == len(trace["names"])
    assert all("lora_" in n for n in trace["names"])
    # Same data and steps for all methods: identical first task for every single-set method
    # (no EMA on task 1), and the first unit of dema+group too.
    first = {m: results["methods"][m]["seeds"]["0"]["matrix"][0] for m in METHODS}
    assert first["lora"] == first["ema"] == first["dema"] == first["dema+group"]


def test_resume_after_interrupt_equals_uninterrupted(full_run, tmp_path):
    _, reference = full_run
    out = tmp_path / "run"
    stops = {("lora", 1), ("dema+group", 1)}

    def interrupt(method, seed, task):
        if (method, task) in stops:
            stops.discard((method, task))
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(tiny_config(), out, quiet=True, threads=1, on_task_end=interrupt)
    state = json.loads((out / "state.json").read_text())
    assert [t["task"] for t in state["chains"]["lora/seed0"]["tasks"]] == ["textvqa", "imagenet"]
    assert not (out / "results.json").exists()
    # A kill in the middle of saving leaves a temporary folder behind: harmless.
    (out / "chains" / "lora" / "seed0" / ".task2.tmp").mkdir()
    with pytest.raises(KeyboardInterrupt):
        run(tiny_config(), out, quiet=True, threads=1, on_task_end=interrupt)
    state = json.loads((out / "state.json").read_text())
    assert len(state["chains"]["lora/seed0"]["tasks"]) == 3
    assert len(state["chains"]["dema+group/seed0"]["tasks"]) == 2
    done_before = {k: [t["seconds"] for t in v["tasks"]] for k, v in state["chains"].items()}
    results = run(tiny_config(), out, quiet=True, threads=1, on_task_end=interrupt)
    state = json.loads((out / "state.json").read_text())
    for key, secs in done_before.items():  # finished tasks were not redone
        assert [t["seconds"] for t in state["chains"][key]["tasks"]][: len(secs)] == secs
    for method in METHODS:
        a, b = results["methods"][method], reference["methods"][method]
        assert a["matrix"] == b["matrix"], method
        assert a["seeds"]["0"]["loss"] == b["seeds"]["0"]["loss"], method
        assert a["seeds"]["0"]["alpha"] == b["seeds"]["0"]["alpha"], method
    # Running a finished folder again trains nothing and gives the same results.
    again = run(tiny_config(), out, quiet=True, threads=1)
    assert again["methods"] == results["methods"]


def test_base_is_shared_and_cached(full_run, tmp_path):
    out, reference = full_run
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copytree(out / "base", copy / "base")
    shutil.copy(out / "config.json", copy / "config.json")
    (copy / "base" / "seed0" / "stage1.json").write_text('{"marker": true}')
    # A different method list is a different run: refused, with a clear message.
    with pytest.raises(ValueError, match="other settings.*methods"):
        run(tiny_config(methods=("lora",)), copy, quiet=True)
    results = run(tiny_config(), copy, quiet=True, threads=1)
    assert json.loads((copy / "base" / "seed0" / "stage1.json").read_text()) == {"marker": True}  # not retrained
    assert results["methods"]["lora"]["matrix"] == reference["methods"]["lora"]["matrix"]


@pytest.mark.parametrize("kw, needle", [
    (dict(methods=("lora", "sgd")), "unknown method 'sgd'"),
    (dict(methods=()), "no methods"),
    (dict(tasks=("textvqa", "mnist")), "unknown bundled task 'mnist'"),
    (dict(order="random"), "unknown task order"),
    (dict(variant="fancy"), "unknown instruction variant"),
    (dict(steps=0), "steps=0"),
    (dict(lr=-1.0), "lr=-1.0"),
    (dict(ema_beta=1.5), "beta"),
    (dict(dema_formula="magic"), "formula"),
    (dict(seeds=(0, 0)), "seeds"),
    (dict(model="/nonexistent/model"), "not a folder"),
    (dict(task_files=("a.json",), tasks=("gqa",)), "cannot be mixed"),
])
def test_bad_settings_fail_before_training(tmp_path, kw, needle):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=needle):
        run(tiny_config(**kw), out, quiet=True)
    assert not out.exists() or not any(out.iterdir())


def test_foreign_folder_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a cl_core run folder"):
        run(tiny_config(), tmp_path, quiet=True)
