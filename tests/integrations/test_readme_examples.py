"""The README's "Add it to your Trainer" examples run as written."""
import os
import re

import pytest
import torch
from tests.helpers import README as README_PATH

README = str(README_PATH)


def integration_blocks():
    with open(README) as f:
        text = f.read()
    m = re.search(r"<!-- section: integration -->(.*?)<!-- /section: integration -->", text, re.S)
    assert m, "README has no integration section"
    return re.findall(r"```python\n(.*?)```", m.group(1), re.S)


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the examples write out/ and optimizer.pt


def test_there_are_two_examples():
    blocks = integration_blocks()
    assert len(blocks) == 2
    assert "callbacks=[dema]" in blocks[0] and "DEMAOptimizer(" in blocks[1]


@pytest.mark.slow
def test_readme_trainer_example_trains_saves_and_resumes(tmp_path):
    ns = {}
    torch.manual_seed(0)
    exec(compile(integration_blocks()[0], "README.md:trainer", "exec"), ns)
    dema = ns["dema"]
    assert dema.engine.num_updates == 8
    assert (tmp_path / "out" / "checkpoint-4" / "dema_state.pt").is_file()
    assert sorted(os.listdir(tmp_path / "out" / "ema_adapter")) == ["adapter_config.json",
                                                                   "adapter_model.safetensors"]
    # the resume the comment promises: from checkpoint-4 to the same EMA
    from cl_core import DEMACallback
    from transformers import Trainer

    again = DEMACallback()
    peft_model = ns["peft_model"]
    Trainer(model=peft_model, args=ns["args"], train_dataset=ns["train_ds"], callbacks=[again]).train(
        resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-4"))
    assert again.resumed_from == "optimizer"           # the state rode in checkpoint-4/optimizer.pt
    for a, b in zip(again.engine.ema_tensors(), dema.engine.ema_tensors()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_plain_pytorch_example(tmp_path):
    ns = {}
    torch.manual_seed(0)
    exec(compile(integration_blocks()[1], "README.md:plain", "exec"), ns)
    opt = ns["opt"]
    assert opt.engine.num_updates == 50
    assert torch.isfinite(ns["ema_loss"])
    sd = torch.load(tmp_path / "optimizer.pt", weights_only=True)
    assert {"state", "param_groups", "dema"} <= set(sd)
    for p, e in zip(ns["model"].parameters(), opt.engine.ema_tensors()):
        assert torch.equal(p.detach(), e)
