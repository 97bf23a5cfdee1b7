"""The run settings declared once (RunConfig fields with their flags) and the method table:
the CLI parser generated from the fields sets every setting, and the table's plans."""
import dataclasses

import pytest

from cl_core.cli import build_parser
from cl_core.cli.run import FLAGS, config_from_args
from cl_core.continual import methods
from cl_core.continual.config import DEMA_PARAMS, RunConfig, cli_settings
from cl_core.dema.config import DEMAConfig


def _other_value(f):
    """A value for field ``f``'s flag that differs from its default: (command-line text, the
    RunConfig value it must give)."""
    cli = f.metadata["cli"]
    if cli.get("action") == "store_true":
        return [], True
    if "choices" in cli:
        choice = next(c for c in cli["choices"] if c != f.default)
        return [choice], choice
    if f.name == "methods":
        return ["lora,ema", "dema"], ("lora", "ema", "dema")
    if f.name == "seeds":
        return ["7,8", "9"], (7, 8, 9)
    if f.name == "dema_tasks":
        return ["1,2"], (1, 2)
    if cli.get("type") is int:
        return (["7", "9"], (7, 9)) if cli.get("nargs") == "+" else (["7"], 7)
    if cli.get("type") is float:
        return ["0.25"], 0.25
    return (["x.json"], ("x.json",)) if cli.get("nargs") == "+" else (["somewhere"], "somewhere")


@pytest.mark.parametrize("f", cli_settings(), ids=lambda f: f.name)
def test_every_flag_sets_its_own_setting_and_nothing_else(f):
    flag = f.metadata["flag"]
    text, value = _other_value(f)
    argv = [flag, *text]
    if f.name == "task_files":
        argv += ["--model", "m"]
    args = build_parser().parse_args(["run", *argv])
    cfg = config_from_args(args)
    default = config_from_args(build_parser().parse_args(["run"]))
    changed = {g.name for g in dataclasses.fields(RunConfig) if getattr(cfg, g.name) != getattr(default, g.name)}
    expected = {f.name} | ({"model"} if f.name == "task_files" else set())
    if f.name == "recipe":          # the CLI's method default follows the recipe
        expected |= {"methods"}
    assert changed == expected
    assert getattr(cfg, f.name) == value
    assert FLAGS[f.name] == flag


def test_cli_defaults_are_runconfigs():
    cfg = config_from_args(build_parser().parse_args(["run"]))
    assert dataclasses.replace(cfg, methods=None) == RunConfig()
    assert cfg.methods == ("dema",)


def test_settings_without_a_flag_stay_python_only():
    no_flag = {f.name for f in dataclasses.fields(RunConfig)} - {f.name for f in cli_settings()}
    assert "num_heads" in no_flag and "stage1_seed" in no_flag
    assert not no_flag & set(FLAGS)


def test_dema_params_choices_are_the_integrations():
    from cl_core.integrations.selection import PARAM_CHOICES

    assert DEMA_PARAMS == PARAM_CHOICES


def test_recipe_plans_are_fixed_and_custom_methods_take_them_under_a_recipe():
    cfg = RunConfig(dema_scale=3.0, max_grad_norm=0.5)
    assert cfg.plan("lcia") == methods.TABLE["lcia"].fixed
    assert cfg.plan("dema").ema == DEMAConfig(scale=3.0)
    assert cfg.plan("dema").max_grad_norm == 0.5
    under = RunConfig(recipe="lcia", methods=("dema+group", "ema"), ema_beta=0.5)
    lcia = methods.TABLE["lcia"].fixed
    p = under.plan("dema+group")
    assert (p.grouping, p.ema, p.new_set_init, p.params, p.max_grad_norm, p.route) == \
        (True, lcia.ema, lcia.new_set_init, lcia.params, lcia.max_grad_norm, lcia.route)
    assert under.plan("ema").ema == DEMAConfig(formula="fixed", beta=0.5)   # a recipe has no β
    assert under.plan("ema").grouping is False
    with pytest.raises(ValueError, match="unknown method 'sgd'"):
        cfg.plan("sgd")


def test_the_table_defines_every_method_once():
    names = [m.name for m in methods._TABLE]
    assert len(names) == len(set(names)) == len(methods.METHODS)
    for m in methods._TABLE:
        assert (m.fixed is None) == (m.kind == "custom"), m.name
        assert all(other in methods.TABLE for other in m.compare_with), m.name
        assert set(m.reads) <= {f.name for f in dataclasses.fields(RunConfig)}, m.name
    assert methods.dema_precision("lcia", 0, True) == "official"
    assert methods.dema_precision("lcia", 2, True) == methods.dema_precision("dema", 0, True) == "fp32"
