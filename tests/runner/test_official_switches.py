"""The official CoIN scripts' per-task DEMA switches (`--dema-tasks`), the report's comparison of
grouping's DEMA decisions with theirs, and a recipe run beside a custom method."""
import logging

import pytest

from cl_core.cli import main
from cl_core.continual.config import OFFICIAL_DEMA_TASKS, RunConfig
from cl_core.continual.report.analysis import _official_switches
from cl_core.continual.report.markdown import _grouping_lines
from cl_core.continual.run import run
from cl_core.continual.synthetic import TASK_NAMES, instruction_templates
from cl_core.grouping import InstructionGrouper


def test_official_switches_only_for_coins_order_with_the_original_templates():
    assert OFFICIAL_DEMA_TASKS == (4, 5, 7, 8)
    on = RunConfig(recipe="lcia").official_switches()
    assert on == (False, False, False, True, True, False, True, True)
    assert RunConfig(recipe="lcia", tasks=tuple(TASK_NAMES)).official_switches() == on
    for kw in (dict(order="reverse"), dict(variant="diverse"), dict(tasks=("sqa", "gqa"))):
        assert RunConfig(recipe="lcia", **kw).official_switches() is None, kw


def _lcia_seed(reused):
    n = len(reused)
    return {"seeds": {"0": {"groups": [0] * n, "reused": reused, "dema": reused, "init_from": [None] * n,
                            "similarities": [[] for _ in range(n)]}}}


def test_report_says_per_task_what_grouping_and_the_scripts_did():
    # grouping on the bundled tasks in CoIN's order with the original templates, as lcia runs it
    grouper = InstructionGrouper(threshold=RunConfig(recipe="lcia").threshold())
    reused = [grouper.assign(instruction_templates(t, "original"), name=t).reused for t in TASK_NAMES]
    results = {"config": RunConfig(recipe="lcia").to_dict()}
    official = _official_switches(results, "lcia")
    text = "\n".join(_grouping_lines(_lcia_seed(reused), list(TASK_NAMES), official))
    assert "| DEMA by grouping | DEMA in the official scripts | DEMA on |" in text
    if [bool(r) for r in reused] == list(official):
        assert "DEMA by grouping agrees with the official CoIN scripts on every task." in text
    # where they differ, the report says which did what
    swapped = list(reused)
    swapped[1], swapped[3] = True, False
    text = "\n".join(_grouping_lines(_lcia_seed(swapped), list(TASK_NAMES), official))
    assert ("task 2 (textvqa): grouping on, the official scripts off; task 4 (gqa): grouping off, the official "
            "scripts on") in text
    assert "`--dema-tasks 4,5,7,8` follows the scripts exactly" in text
    # a method without an EMA, or another order: no comparison
    assert _official_switches(results, "lora") is None
    assert _official_switches({"config": RunConfig(recipe="lcia", order="reverse").to_dict()}, "lcia") is None


def test_dema_tasks_switch_dema_per_task_whatever_grouping_decided(tmp_path):
    # textvqa, imagenet, gqa: grouping re-trains the textvqa set at task 3 (DEMA on there);
    # --dema-tasks 2 turns it on for task 2 (a new set) and off for task 3
    cfg = RunConfig(methods=("lcia",), seeds=(0,), tasks=("textvqa", "imagenet", "gqa"), n_train=24, n_test=6,
                    hidden_size=32, num_layers=1, num_heads=2, stage1_steps=4, stage1_batch_size=8, steps=3,
                    batch_size=8, warmup_steps=1, max_length=96, dema_tasks=(2,))
    seed = run(cfg, tmp_path / "r", quiet=True, threads=1)["methods"]["lcia"]["seeds"]["0"]
    assert seed["reused"] == [False, False, True]
    assert seed["ema"] == seed["dema"] == [False, True, False]
    assert [bool(a) for a in seed["alpha"]] == [False, True, False]
    assert "tasks 2 (`--dema-tasks`)" in (tmp_path / "r" / "report.md").read_text()


@pytest.mark.parametrize("value, needle", [
    ("4,9", "--dema-tasks 4,9: task number 9 is not between 1 and 8 (the run has 8 tasks"),
    ("0", "--dema-tasks 0: task number 0 is not between 1 and 8"),
    ("4,4", "--dema-tasks 4,4: a task number is listed twice"),
    ("4;5", "--dema-tasks takes 1-based task numbers separated by commas (e.g. 4,5,7,8), got '4;5'"),
])
def test_bad_dema_tasks_exit_2_naming_the_flag(tmp_path, caplog, value, needle):
    out = tmp_path / "o"
    with caplog.at_level(logging.ERROR):
        code = main(["run", "--recipe", "lcia", "--dema-tasks", value, "--out", str(out), "--quiet"])
    assert code == 2 and needle in caplog.text
    assert not out.exists()


def test_dema_tasks_reach_the_config_and_need_an_ema(tmp_path, captured, caplog):
    assert main(["run", "--recipe", "lcia", "--dema-tasks", "4,5,7,8", "--out", str(tmp_path / "a"), "--quiet"]) == 0
    assert captured[-1].dema_tasks == (4, 5, 7, 8)
    assert [captured[-1].dema_on("lcia", j, reused=False) for j in range(8)] == \
        [False, False, False, True, True, False, True, True]
    with caplog.at_level(logging.ERROR):
        assert main(["run", "--bundled-tasks", "all", "--methods", "lora", "--dema-tasks", "2", "--out", str(tmp_path / "b"), "--quiet"]) == 2
    assert "--dema-tasks set, but no method of the run has an EMA (lora)" in caplog.text


def test_a_recipe_with_a_custom_method_runs_it_with_the_recipes_settings(tmp_path, captured, caplog):
    assert main(["run", "--recipe", "lcia", "--methods", "dema+group", "--out", str(tmp_path / "a"), "--quiet"]) == 0
    cfg = captured[-1]
    lcia, plan = cfg.plan("lcia"), cfg.plan("dema+group")
    assert (plan.route, plan.new_set_init, plan.params, plan.max_grad_norm, plan.ema) == \
        (lcia.route, lcia.new_set_init, lcia.params, lcia.max_grad_norm, lcia.ema)
    assert plan != RunConfig().plan("dema+group")        # not the custom settings
    assert cfg.describe("dema+group")["EMA"] == cfg.describe("lcia")["EMA"]
    # a custom flag beside the recipe would be ignored: refused in one line saying what to write
    out = tmp_path / "b"
    with caplog.at_level(logging.ERROR):
        code = main(["run", "--recipe", "lcia", "--methods", "dema+group", "--route", "file",
                     "--out", str(out), "--quiet"])
    assert code == 2 and not out.exists()
    assert ("--route set with --recipe lcia, which runs dema+group with the lcia settings: drop --route, or drop "
            "--recipe to run dema+group with the custom settings") in caplog.text
