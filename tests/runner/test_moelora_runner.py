"""Method moelora in the runner: `cl-core run --methods moelora` end to end on the bundled
tasks (one MoELoRA set trained task after task, saved per task, reloaded by load_moelora into a
fresh base with the run model's outputs and accuracies, resumed after a stop with the same
results), its flags and their errors."""
import json
import logging

import pytest

from cl_core.cli import main
from cl_core.continual.config import RunConfig
from tests.helpers import stop_after_first_task

# stage 1 off (a random tiny base): this test is about the chain, the files and the reload
SMALL = ["--bundled-tasks", "textvqa", "imagenet", "--stage1-steps", "0", "--steps", "4", "--batch-size", "8",
         "--n-train", "32", "--n-test", "8", "--max-length", "96", "--quiet"]


@pytest.mark.slow
def test_moelora_runs_task_after_task_and_its_export_reloads_with_identical_outputs(tmp_path, capsys, monkeypatch):
    import torch

    from cl_core.continual.run import ContinualRun
    from cl_core.continual.adapters import MoELoRASet
    from cl_core.moelora import MoELoRALinear, load_moelora

    ids = torch.arange(4, 20).reshape(2, 8)
    saved_logits = []
    real_save = MoELoRASet.save

    def save_and_note_the_outputs(self, directory):  # the real save, and what the model computed then
        was = self.model.training
        with torch.no_grad():
            saved_logits.append(self.model.eval()(ids).logits)
        self.model.train(was)
        real_save(self, directory)

    monkeypatch.setattr(MoELoRASet, "save", save_and_note_the_outputs)
    out = tmp_path / "run"
    assert main(["run", *SMALL, "--methods", "moelora", "--out", str(out)]) == 0
    assert "moelora" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    seed = results["methods"]["moelora"]["seeds"]["0"]
    assert len(seed["matrix"]) == 2 and all(len(row) == 2 for row in seed["matrix"])
    # one set, re-trained by the second task, never an EMA
    assert seed["groups"] == [0, 0] and seed["reused"] == [False, True] and seed["ema"] == [False, False]
    assert seed["init_from"] == [None, 0] and seed["alpha"] == [[], []]
    settings = results["methods"]["moelora"]["settings"]
    assert settings["LoRA sets"].startswith("one MoELoRA set: 2 LoRA experts of rank 4")
    assert settings["EMA"] == "none" and settings["gradient clipping"] == "max norm 1"
    report = (out / "report.md").read_text()
    assert "| moelora | one MoELoRA set: 2 LoRA experts of rank 4 (r 8 split) and a dense softmax router" in report
    # The adapter saved after the last task, on a fresh base: the outputs the run's model had,
    # not the base's, and the accuracies the run recorded.
    final = out / "chains" / "moelora" / "seed0" / "task1"
    assert sorted(p.name for p in final.iterdir()) == ["moelora.safetensors", "moelora_config.json"]
    assert not (final.parent / "task0").exists()  # only the latest task's adapter is kept
    cfg = RunConfig.from_dict(json.loads((out / "config.json").read_text()))
    runner = ContinualRun(cfg, out)
    runner.prepare()
    model = load_moelora(runner._load_base(0), final).eval()
    assert sum(isinstance(m, MoELoRALinear) for m in model.modules()) == 2 * 7  # every linear layer, 2 layers
    with torch.no_grad():
        assert len(saved_logits) == 2 and torch.equal(model(ids).logits, saved_logits[-1])
        assert not torch.equal(runner._load_base(0)(ids).logits, saved_logits[-1])
    assert runner._evaluate(model, None) == seed["matrix"][-1]
    # Stopped after task 1 and resumed (the set reloaded trainable from its files): the same
    # losses, accuracies and final outputs as the uninterrupted run.
    from cl_core.continual.run import run

    other = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        run(cfg, other, quiet=True, threads=1, on_task_end=stop_after_first_task)
    resumed = run(cfg, other, quiet=True, threads=1)["methods"]["moelora"]["seeds"]["0"]
    assert resumed["matrix"] == seed["matrix"] and resumed["loss"] == seed["loss"]
    assert len(saved_logits) == 4 and torch.equal(saved_logits[-1], saved_logits[1])


def test_moelora_flags_reach_the_config(tmp_path, captured):
    assert main(["run", "--bundled-tasks", "all", "--methods", "moelora", "--moe-experts", "4", "--moe-top-k", "2", "--out",
                 str(tmp_path / "a"), "--quiet"]) == 0
    cfg = captured[-1]
    assert cfg.methods == ("moelora",) and (cfg.moe_experts, cfg.moe_top_k) == (4, 2)
    mc = cfg.moelora_config()
    assert (mc.r, mc.lora_alpha, mc.num_experts, mc.top_k, mc.expert_rank) == (8, 16, 4, 2, 2)
    plan = cfg.plan("moelora")
    assert plan.adapter == "moelora" and plan.ema is None and not plan.grouping and plan.max_grad_norm == 1.0
    # defaults: CoIN's scripts (2 experts, every expert for every token)
    assert (RunConfig().moe_experts, RunConfig().moe_top_k) == (2, None)


@pytest.mark.parametrize("argv, line", [
    (["--methods", "moelora", "--lora-r", "6", "--moe-experts", "4"],
     "--lora-r 6 is not a multiple of --moe-experts 4"),
    (["--methods", "moelora", "--moe-top-k", "3"], "--moe-top-k 3 must be None"),
    (["--methods", "lora", "--moe-experts", "4"],
     "--moe-experts set, but method moelora does not run (lora): add moelora to the methods, or drop --moe-experts"),
    (["--methods", "moelora", "--max-grad-norm", "0.5"],
     "--max-grad-norm set, but only methods with fixed settings run (moelora)"),
    (["--methods", "moelora", "--dema-tasks", "2"], "--dema-tasks set, but no method of the run has an EMA"),
])
def test_bad_moelora_settings_exit_2_naming_the_flag(tmp_path, caplog, argv, line):
    out = tmp_path / "o"
    with caplog.at_level(logging.ERROR):
        code = main(["run", *argv, "--out", str(out), "--quiet"])
    assert code == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].startswith(line), errors
    assert not out.exists()
