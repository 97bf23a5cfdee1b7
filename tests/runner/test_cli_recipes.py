"""`cl-core run --recipe ... --route ... --new-set-init ... --max-grad-norm ... --dema-params ...`:
the flags reach RunConfig, defaults and choices are the runner's own, bad mixes exit 2."""
import logging

import pytest

from cl_core.cli import main
from cl_core.continual.config import RunConfig
from cl_core.continual.methods import METHODS


def test_recipe_flags_reach_the_config(tmp_path, captured):
    assert main(["run", "--recipe", "lcia", "--out", str(tmp_path / "a"), "--quiet"]) == 0
    cfg = captured[-1]
    assert cfg.recipe == "lcia" and cfg.methods == ("lcia",)
    assert main(["run", "--recipe", "cl-next", "--methods", "lora", "cl-next", "--out", str(tmp_path / "b"),
                 "--quiet"]) == 0
    assert captured[-1].methods == ("lora", "cl-next")
    assert main(["run", "--bundled-tasks", "all", "--methods", "dema+group", "--route", "file", "--new-set-init", "latest",
                 "--max-grad-norm", "0", "--dema-params", "trainable", "--out", str(tmp_path / "c"), "--quiet"]) == 0
    cfg = captured[-1]
    assert (cfg.route, cfg.new_set_init, cfg.max_grad_norm, cfg.dema_params) == ("file", "latest", 0.0, "trainable")
    # Without flags: refused with the three ways to give tasks, nothing run (was: eight bundled tasks)
    n = len(captured)
    assert main(["run", "--out", str(tmp_path / "e"), "--quiet"]) == 2 and len(captured) == n
    # Only the tasks: the runner's defaults (one method, dema, as before the recipes).
    assert main(["run", "--bundled-tasks", "all", "--out", str(tmp_path / "d"), "--quiet"]) == 0
    d, defaults = captured[-1], RunConfig()
    assert d.tasks is None
    assert d.methods == ("dema",)
    for k in ("recipe", "route", "new_set_init", "max_grad_norm", "dema_params", "dema_scale", "dema_fallback",
              "dema_formula", "ema_beta", "steps", "lr", "order", "variant"):
        assert getattr(d, k) == getattr(defaults, k), k


def test_demo_compares_every_method_and_recipe(tmp_path, captured):
    assert main(["demo", "--quick", "--out", str(tmp_path / "q"), "--quiet"]) == 0
    from cl_core.cli.run import DEMO_METHODS

    # the custom methods and the official recipe (lcia); not cl-next, not MoELoRA (the multimodal
    # demo's), none of the paper's baselines (--compare paper runs those)
    assert captured[-1].methods == DEMO_METHODS == tuple(
        m for m in METHODS if m not in ("cl-next", "moelora", "replay", "ewc", "lwf", "olora"))
    assert main(["demo", "--quick", "--methods", "lora,ema", "--out", str(tmp_path / "m"), "--quiet"]) == 0
    assert captured[-1].methods == ("lora", "ema")


def test_recipe_with_a_custom_flag_exits_2(tmp_path, caplog):
    out = tmp_path / "o"
    with caplog.at_level(logging.ERROR):
        code = main(["run", "--recipe", "lcia", "--route", "instance", "--max-grad-norm", "0.5", "--out", str(out),
                     "--quiet"])
    assert code == 2
    assert "--max-grad-norm set, but only recipe methods run (lcia)" in caplog.text
    assert not out.exists()


def test_choices_come_from_the_runner(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["run", "--recipe", "official"])
    assert exc.value.code == 2
    assert "invalid choice: 'official' (choose from 'custom', 'lcia', 'cl-next')" in capsys.readouterr().err
