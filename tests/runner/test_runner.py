"""The continual runner on a tiny configuration: outputs, method and recipe rules, resume
(also of a folder written before the recipes existed), validation."""
import json
import shutil

import pytest

from cl_core import metrics
from cl_core.continual.run import METHODS, RunConfig, run

# textvqa and gqa share the "original" template, imagenet has its own: with grouping, task 3
# (gqa) re-uses group 0 and gets DEMA, task 2 (imagenet) opens group 1 without it.
TINY = dict(methods=METHODS, seeds=(0,), tasks=("textvqa", "imagenet", "gqa"), n_train=48, n_test=12, hidden_size=32,
            num_layers=1, num_heads=2, stage1_steps=20, stage1_batch_size=8, steps=6, batch_size=8,
            warmup_steps=1, max_length=96)


def tiny_config(**kw):
    return RunConfig(**{**TINY, **kw})


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    results = run(tiny_config(), out, quiet=True, threads=1)
    return out, results


@pytest.mark.slow
def test_full_run_results_hold_every_methods_matrix_and_metrics(full_run):
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
        if method == "moelora":  # its own format: config + safetensors (cl_core.moelora)
            assert (final / "moelora_config.json").is_file() and (final / "moelora.safetensors").is_file()
        else:
            assert (final / "group_0" / "adapter_config.json").is_file()
    assert (out / "base" / "seed0" / "config.json").is_file()
    assert json.loads((out / "config.json").read_text()) == tiny_config().to_dict()
    state = json.loads((out / "state.json").read_text())
    assert {k: len(v["tasks"]) for k, v in state["chains"].items()} == {f"{m}/seed0": 3 for m in METHODS}
    report = (out / "report.md").read_text()
    assert "Plain sequential LoRA forgets" in report
    for png in ("heatmap_lora.png", "heatmap_dema_group.png", "heatmap_lcia.png", "per_task_accuracy.png",
                "alpha_trace.png", "alpha_hist.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Each method's settings are stated; the α histogram is summarised in words from the run.
    assert "### Settings of each method" in report
    assert "| lcia | grouping (one per instruction group) | the last trained set |" in report
    assert "every trainable tensor | none | one decision per test file |" in report
    assert "scale 0.01, fallback 0.001" in report
    assert "## Where DEMA's α landed" in report and "Why the official scale behaves like this here" in report
    assert "(one seed, 0: no spread to show)" in report and "1 seeds" not in report and "± 0.0" not in report
    assert "Model: the bundled tiny Llama (" in report and saved["model"]["source"] == "tiny"


@pytest.mark.slow
def test_each_method_switches_ema_dema_and_initialisation_as_defined(full_run):
    out, results = full_run
    seeds = {m: results["methods"][m]["seeds"]["0"] for m in METHODS}
    assert seeds["lora"]["ema"] == [False, False, False]
    assert seeds["ema"]["ema"] == [False, True, True]
    assert seeds["dema"]["ema"] == [False, True, True]
    # `dema`: the dynamic EMA was on (a fixed EMA is not DEMA); `init_from`: the task whose
    # weights the trained set started from (None: fresh).
    assert seeds["lora"]["dema"] == seeds["ema"]["dema"] == [False, False, False]
    assert seeds["dema"]["dema"] == seeds["cl-next"]["dema"] == [False, True, True]
    for m in ("lora", "ema", "dema", "cl-next"):
        assert seeds[m]["init_from"] == [None, 0, 1], m
        assert seeds[m]["groups"] == [0, 0, 0], m
    # Grouping: textvqa -> group 0 (new), imagenet -> group 1 (new), gqa -> group 0 again (DEMA).
    g = seeds["dema+group"]
    assert g["groups"] == [0, 1, 0] and g["reused"] == [False, False, True] and g["ema"] == [False, False, True]
    assert g["dema"] == [False, False, True] and g["init_from"] == [None, None, 0]
    # The official recipe: the new set of task 2 starts from task 1's weights, DEMA only on the re-train.
    lc = seeds["lcia"]
    assert lc["groups"] == [0, 1, 0] and lc["dema"] == [False, False, True] and lc["init_from"] == [None, 0, 0]
    # α histogram counts: one value per (step, tensor) of the DEMA tasks.
    n_tensors = len(json.loads((out / "chains" / "lcia" / "seed0" / "alpha_task2.json").read_text())["names"])
    assert lc["alpha_counts"]["n"] == TINY["steps"] * n_tensors
    assert results["methods"]["cl-next"]["alpha_counts"]["fallback"] == 0.001
    assert results["methods"]["ema"]["alpha_counts"]["fallback"] is None  # fixed EMA: no fallback
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


@pytest.mark.slow
def test_methods_are_paired_each_new_set_starts_from_the_same_init(full_run):
    """A new LoRA set's initialisation is drawn from the seed and the set, not the method, so
    every method of a seed starts set g from the same weights and the differences are the
    methods'. Same init, data and steps without an EMA give the same training loss, exactly."""
    _, results = full_run
    loss = {m: results["methods"][m]["seeds"]["0"]["loss"] for m in METHODS}
    # Task 1 opens set 0 for every LoRA method, with no EMA: one loss for all of them that clip
    # gradients alike (lcia does not clip, so its first task trains differently; moelora's
    # experts and routers are another adapter with their own initialisation).
    plans = {m: tiny_config().plan(m) for m in METHODS}
    clipped = [m for m in METHODS if plans[m].max_grad_norm == 1.0 and plans[m].adapter == "lora"]
    assert len(clipped) == len(METHODS) - 2
    assert len({loss[m][0] for m in clipped}) == 1, {m: loss[m][0] for m in METHODS}
    # Task 2 (imagenet) opens set 1 fresh under group and dema+group (DEMA off on a new set):
    # the same draw of set 1's initialisation, so the same loss.
    assert loss["group"][1] == loss["dema+group"][1]
    # ... while lcia starts set 1 from set 0's trained weights (warm start): another loss.
    assert loss["lcia"][1] != loss["group"][1]


@pytest.mark.slow
def test_older_run_folder_resumes(full_run, tmp_path):
    """A folder written before recipes, `dema`, `init_from` and α counts existed: resumed
    (nothing retrained), with the missing record fields filled in as those versions ran."""
    out, reference = full_run
    old = tmp_path / "old"
    shutil.copytree(out, old)
    cfg = json.loads((old / "config.json").read_text())
    custom = ["lora", "ema", "dema", "dema+group"]
    for k in ("recipe", "route", "new_set_init", "max_grad_norm", "dema_params"):
        del cfg[k]
    cfg["methods"] = custom
    (old / "config.json").write_text(json.dumps(cfg))
    state = json.loads((old / "state.json").read_text())
    state["chains"] = {k: v for k, v in state["chains"].items() if v["method"] in custom}
    for chain in state["chains"].values():
        for t in chain["tasks"]:
            for k in ("dema", "init_from", "alpha_counts"):
                del t[k]
    (old / "state.json").write_text(json.dumps(state))
    results = run(tiny_config(methods=tuple(custom)), old, quiet=True, threads=1)
    for m in custom:
        a, b = results["methods"][m]["seeds"]["0"], reference["methods"][m]["seeds"]["0"]
        assert a["matrix"] == b["matrix"] and a["loss"] == b["loss"], m
        assert a["dema"] == b["dema"] and a["init_from"] == b["init_from"], m


def test_file_routing_one_decision_per_test_set():
    from cl_core.continual.run import route_groups
    from cl_core.grouping import InstructionGrouper

    g = InstructionGrouper(threshold=0.3)
    g.assign(["Answer the question using a single word or phrase."])
    g.assign(["Please provide the bounding box coordinate of the region this sentence describes."])
    ins = ["Answer the question using a single word or phrase.",
           "Please provide the bounding box coordinate of the region this sentence describes.",
           "Answer the question using a single word or phrase.",
           "Answer the question using a single word or phrase."]
    spans = [(0, 2), (2, 4)]
    assert route_groups(g, ins, spans, "instance") == [0, 1, 0, 0]
    # The first test set as a whole: the mean over its two instructions decides, for both.
    whole = g.route_set(ins[0:2]).group
    assert route_groups(g, ins, spans, "file") == [whole, whole, 0, 0]
    with pytest.raises(ValueError, match="route='task'"):
        route_groups(g, ins, spans, "task")


def test_warm_start_copies_the_last_trained_set():
    import torch
    from peft import LoraConfig

    from cl_core.continual import tiny_model
    from cl_core.continual.run import _copy_adapter
    from cl_core.grouping import Decision
    from cl_core.lora_sets import LoRASets

    model = tiny_model.build_model(50, hidden_size=16, num_layers=1, num_heads=2)
    sets = LoRASets(model, LoraConfig(r=2, lora_alpha=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    sets.prepare_task(Decision(group=0, reused=False, similarities=[]))
    with torch.no_grad():
        for n, p in sets.model.named_parameters():
            if ".group_0." in n:
                p.normal_()
    sets.prepare_task(Decision(group=1, reused=False, similarities=[]))
    params = dict(sets.model.named_parameters())
    new = [n for n in params if ".group_1." in n]
    assert new and not all(torch.equal(params[n], params[n.replace(".group_1.", ".group_0.")]) for n in new)
    _copy_adapter(sets.model, "group_0", "group_1")
    for n in new:
        assert torch.equal(params[n], params[n.replace(".group_1.", ".group_0.")]), n
        assert params[n].requires_grad  # the new set is the one being trained
    with pytest.raises(RuntimeError, match="no tensors"):
        _copy_adapter(sets.model, "group_0", "group_7")


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_one_stage1_base_for_every_seed(full_run, tmp_path):
    # stage1_seed=0: one stage 1 (as LLaVA is one pre-trained model); seed 1's chains start
    # from seed 0's base, and both seeds record that base's scores.
    _, reference = full_run
    out = tmp_path / "shared"
    results = run(tiny_config(methods=("lora",), seeds=(0, 1), stage1_seed=0), out, quiet=True, threads=1)
    assert sorted(p.name for p in (out / "base").iterdir()) == ["seed0"]
    assert results["base"]["0"] == results["base"]["1"] == reference["base"]["0"]
    # seed 0 trains exactly as in a run with a base per seed
    assert results["methods"]["lora"]["seeds"]["0"]["matrix"] == reference["methods"]["lora"]["matrix"]
    assert "once, with seed 0, for every seed" in (out / "report.md").read_text()


def test_recipes_fix_their_settings_and_ignore_custom_flags():
    assert RunConfig().methods == ("lora", "ema", "dema", "dema-paper", "group", "dema+group")
    # group: dema+group's grouping, routing and new-set start, without any EMA (the ablation)
    g, dg = RunConfig().plan("group"), RunConfig().plan("dema+group")
    assert g.grouping and g.ema is None and dg.ema is not None
    assert (g.new_set_init, g.route, g.max_grad_norm) == (dg.new_set_init, dg.route, dg.max_grad_norm)
    assert RunConfig(recipe="lcia").methods == ("lcia",)
    assert RunConfig(recipe="cl-next").methods == ("cl-next",)
    lcia, nx = RunConfig().plan("lcia"), RunConfig().plan("cl-next")
    assert lcia.grouping and lcia.new_set_init == "latest" and lcia.params == "trainable"
    assert lcia.max_grad_norm == 0 and lcia.route == "file"
    assert (lcia.ema.formula, lcia.ema.scale, lcia.ema.fallback) == ("official", 2.0, 0.01)
    assert not nx.grouping and (nx.ema.scale, nx.ema.fallback) == (0.01, 0.001)
    # The custom methods take the flags; the recipes ignore them (and validation refuses
    # a flag that only recipes would see).
    cfg = RunConfig(route="file", new_set_init="latest", max_grad_norm=0.0, dema_params="trainable",
                    dema_scale=0.5)
    p = cfg.plan("dema+group")
    assert (p.route, p.new_set_init, p.max_grad_norm, p.params, p.ema.scale) == ("file", "latest", 0.0,
                                                                                "trainable", 0.5)
    assert cfg.plan("lcia") == lcia
    assert cfg.ema_config("ema").formula == "fixed" and cfg.ema_config("lora") is None


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
    (dict(recipe="official"), "unknown recipe 'official'"),
    (dict(route="task"), "route='task' is not known"),
    (dict(new_set_init="best"), "new_set_init='best'"),
    (dict(dema_params="all"), "dema_params='all'"),
    (dict(max_grad_norm=-1.0), "max_grad_norm=-1.0"),
    (dict(stage1_seed=-1), "stage1_seed=-1"),
    (dict(methods=("lcia",), route="file"), "only recipe methods run"),
    (dict(methods=("cl-next",), dema_scale=0.5), "only recipe methods run"),
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


@pytest.mark.parametrize("threads", [0, -1, 1.5, True])
def test_bad_thread_counts_are_refused_before_anything_is_written(tmp_path, threads):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="threads="):
        run(RunConfig(), out, threads=threads)
    assert not out.exists()
