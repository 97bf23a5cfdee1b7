"""Every Python block of README.md and docs/*.md runs as written, in a fresh folder.

Unlabelled blocks run here, each in its own process (so one block's imports or global state
cannot help another). Labelled blocks (`<!-- example: NAME -->`) run in the tests that also
check what they promise (resume, files written, launchers): LABELLED names them, and a label
nobody runs fails. Sketches (`<!-- sketch: ... -->`) are shown, never run, and listed here so
that a block cannot drift into being one unnoticed. The README's labelled blocks must be the
docs' blocks of the same label, character for character."""
import json
import os
import subprocess
import sys

import pytest
import torch

from tests.helpers import DOCS, README, ROOT, doc_blocks, doc_example

# label -> the test that runs it
LABELLED = {
    "trainer": "test_trainer_example_trains_saves_and_resumes",
    "plain-loop": "test_plain_loop_example",
    "lightning": "test_lightning_example",
    "deepspeed-script": "test_deepspeed_script_under_torchrun",
}
# every sketch: file name and first line, so a new one is a visible decision
SKETCHES = {
    ("README.md", "trainer = Trainer(model=peft_model, args=args, train_dataset=train_ds, callbacks=[DEMACallback()])"),
    ("README.md", "from cl_core.integrations.lightning import DEMACallback"),
    ("README.md", "args = TrainingArguments(\"out\", deepspeed={\"zero_optimization\": {\"stage\": 0}, \"bf16\": {\"enabled\": \"auto\"},"),
    ("grouping.md", "from cl_core.lora_sets import LoRASets"),
}

ALL = [(path, b) for path in DOCS for b in doc_blocks(path)]
PLAIN = [(path, b) for path, b in ALL if not b["label"] and not b["sketch"]]


def test_every_block_is_run_or_a_listed_sketch():
    labels = {b["label"] for _, b in ALL if b["label"]}
    assert labels == set(LABELLED), f"labels without a test: {labels - set(LABELLED)}; tests without a block: {set(LABELLED) - labels}"
    sketches = {(path.name, b["code"].splitlines()[0]) for path, b in ALL if b["sketch"]}
    assert sketches == SKETCHES
    assert len(PLAIN) >= 3  # engine, grouping, runner


def test_readme_examples_are_the_docs_examples():
    for b in doc_blocks(README):
        if b["label"]:
            assert b["code"] == doc_example(b["label"]), f"README's {b['label']!r} block differs from the docs' one"


@pytest.mark.slow
@pytest.mark.parametrize("path, block", PLAIN, ids=[b["where"] for _, b in PLAIN])
def test_block_runs_as_written(path, block, tmp_path):
    script = tmp_path / "block.py"
    script.write_text(block["code"])
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    p = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, f"{block['where']} failed:\n{p.stderr[-3000:]}"


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the examples write out/, optimizer.pt, ema_adapter/
    return tmp_path


@pytest.mark.slow
def test_trainer_example_trains_saves_and_resumes(in_tmp):
    ns = {}
    torch.manual_seed(0)
    exec(compile(doc_example("trainer"), "integrations.md:trainer", "exec"), ns)
    dema = ns["dema"]
    assert dema.engine.num_updates == 8
    assert (in_tmp / "out" / "checkpoint-4" / "dema_state.pt").is_file()
    assert sorted(os.listdir(in_tmp / "out" / "ema_adapter")) == ["adapter_config.json", "adapter_model.safetensors"]
    # the resume the comment promises: from checkpoint-4 to the same EMA
    from transformers import Trainer

    from cl_core import DEMACallback

    again = DEMACallback()
    peft_model = ns["peft_model"]
    Trainer(model=peft_model, args=ns["args"], train_dataset=ns["train_ds"], callbacks=[again]).train(
        resume_from_checkpoint=str(in_tmp / "out" / "checkpoint-4"))
    assert again.resumed_from == "optimizer"           # the state rode in checkpoint-4/optimizer.pt
    assert list(peft_model.peft_config) == ["default"]  # resume added no adapter to the model
    for a, b in zip(again.engine.ema_tensors(), dema.engine.ema_tensors()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_plain_loop_example(in_tmp):
    ns = {}
    torch.manual_seed(0)
    exec(compile(doc_example("plain-loop"), "integrations.md:plain-loop", "exec"), ns)
    opt = ns["opt"]
    assert opt.engine.num_updates == 50 and opt.fused
    assert torch.isfinite(ns["ema_loss"])
    sd = torch.load(in_tmp / "optimizer.pt", weights_only=True)
    assert {"state", "param_groups", "dema"} <= set(sd)
    for p, e in zip(ns["model"].parameters(), opt.engine.ema_tensors()):
        assert torch.equal(p.detach(), e)


@pytest.mark.slow
def test_lightning_example(in_tmp):
    pytest.importorskip("lightning", reason="the lightning extra is not installed")
    ns = {}
    exec(compile(doc_example("lightning"), "integrations.md:lightning", "exec"), ns)
    dema, trainer_ = ns["dema"], ns["trainer"]
    assert dema.fused and dema.engine.num_updates == trainer_.global_step > 0
    assert sorted(os.listdir(in_tmp / "ema_adapter")) == ["adapter_config.json", "adapter_model.safetensors"]


@pytest.mark.slow
@pytest.mark.distributed
def test_deepspeed_script_under_torchrun(tmp_path):
    """The DeepSpeed script as the page says to launch it on a CPU-only machine."""
    pytest.importorskip("deepspeed", reason="the deepspeed extra is not installed")
    (tmp_path / "train_ds.py").write_text(doc_example("deepspeed-script") + (
        "\nimport json\njson.dump({'updates': dema.engine.num_updates}, open('done.json', 'w'))\n"))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                        "train_ds.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert json.loads((tmp_path / "done.json").read_text()) == {"updates": 8}
    assert sorted(os.listdir(tmp_path / "out" / "ema_adapter")) == ["adapter_config.json", "adapter_model.safetensors"]
