"""`cl-core demo`'s methods and flags: the paper's formula and the official recipe among the
compared methods, the model size and every DEMA setting on the command line (issue 33)."""
import pytest

from cl_core.cli import main
from cl_core.cli.run import DEMO_FULL, DEMO_METHODS, DEMO_QUICK, DEMO_SETTINGS
from cl_core.continual.config import RunConfig
from cl_core.continual.report.markdown import _unlike_official_lines


def test_demo_compares_the_paper_formula_and_the_official_recipe():
    assert "lcia" in DEMO_METHODS and "dema-paper" in DEMO_METHODS
    cfg = RunConfig(methods=DEMO_METHODS, **DEMO_FULL)
    cfg.validate()
    assert cfg.plan("dema-paper").ema.formula == "paper" and cfg.plan("dema").ema.formula == "official"
    # dema-paper keeps the run's scale and fallback, and a recipe's under --recipe lcia
    assert RunConfig(dema_fallback=0.05).plan("dema-paper").ema.fallback == 0.05
    under = RunConfig(recipe="lcia", methods=("dema-paper",)).plan("dema-paper")
    assert under.ema.formula == "paper" and under.max_grad_norm == 0.0 and under.new_set_init == "latest"
    # lcia as the paper ran it: no clipping, new sets from the last trained set, every trainable
    # tensor averaged, one routing decision per test file, official constants
    lcia = cfg.plan("lcia")
    assert (lcia.max_grad_norm, lcia.new_set_init, lcia.params, lcia.route) == (0.0, "latest", "trainable", "file")
    assert (lcia.ema.formula, lcia.ema.scale, lcia.ema.fallback) == ("official", 2.0, 0.01) and lcia.grouping


def test_report_says_how_dema_group_differs_from_the_official_run():
    cfg = RunConfig(methods=("dema+group", "lcia", "dema"))
    methods = {m: {"settings": cfg.describe(m)} for m in cfg.methods}
    lines = _unlike_official_lines(methods)
    assert len([x for x in lines if x]) == 1   # dema+group only: lcia is the run, dema does not group
    assert "**dema+group is not the paper's run as it ran:**" in lines[0]
    assert "gradient clipping: max norm 1 (lcia: none)" in lines[0] and "fresh init" in lines[0]
    same = RunConfig(methods=("dema+group",), max_grad_norm=0.0, new_set_init="latest", route="file",
                     dema_params="trainable")
    assert _unlike_official_lines({"dema+group": {"settings": same.describe("dema+group")}}) == []


@pytest.mark.parametrize("quick", [False, True])
def test_demo_takes_the_model_size_and_every_dema_setting(captured, tmp_path, quick):
    flags = ["--hidden-size", "48", "--num-layers", "3", "--lora-r", "16", "--dema-formula", "paper",
             "--dema-scale", "1.5", "--dema-fallback", "0.05", "--dema-tasks", "2,3"]
    assert main(["demo", *(["--quick"] if quick else []), "--methods", "dema", "--out", str(tmp_path / "d"),
                 "--quiet", *flags]) == 0
    cfg = captured[-1]
    assert (cfg.hidden_size, cfg.num_layers, cfg.lora_r) == (48, 3, 16)
    assert (cfg.dema_formula, cfg.dema_scale, cfg.dema_fallback, cfg.dema_tasks) == ("paper", 1.5, 0.05, (2, 3))
    # without the flags: the preset's values, else RunConfig's
    assert main(["demo", *(["--quick"] if quick else []), "--out", str(tmp_path / "e"), "--quiet"]) == 0
    preset = DEMO_QUICK if quick else DEMO_FULL
    for name in DEMO_SETTINGS:
        assert getattr(captured[-1], name) == preset.get(name, getattr(RunConfig(), name)), name


def test_demo_and_run_help_show_the_defaults(capsys):
    for cmd in ("demo", "run"):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        for flag in ("--hidden-size", "--num-layers", "--lora-r", "--dema-formula", "--dema-scale",
                     "--dema-fallback", "--dema-tasks"):
            assert flag in text, (cmd, flag)
    assert "width (its LoRA tensors are width x --lora-r) (default: 64)" in text   # run's


def test_tiny_model_size_with_a_model_folder_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="--hidden-size size the tiny model"):
        RunConfig(model=str(tmp_path), hidden_size=128).validate({"hidden_size": "--hidden-size", "model": "--model"})
