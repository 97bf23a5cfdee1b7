"""EMA weights as a standard PEFT adapter folder; evaluation with the EMA swapped in;
several named adapters; LoRA scaling kept in sync."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from cl_core import DEMACallback
from cl_core.integrations.extras import transformers_adapter_support
from cl_core.integrations.selection import adapter_named_parameters, select_dema_parameters
from cl_core.integrations.state_files import atomic_save, load_state_file
from cl_core.integrations.peft import save_ema_adapter
from tests.dist_scripts.common import TokenDataset, sequential_trainer_cls, training_args
from tests.helpers import lora_config, tiny_llama, tiny_peft_llama


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def _trainer(model, out, cb, **kw):
    return sequential_trainer_cls()(model=model, args=training_args(out, **kw), train_dataset=TokenDataset(),
                                    eval_dataset=TokenDataset(8, seed=9), callbacks=[cb])


@pytest.mark.slow
def test_ema_adapter_round_trip_and_swap_evaluate(tmp_path):
    from peft import PeftModel

    model = tiny_peft_llama()
    cb = DEMACallback(replace_at_end=False)
    trainer = _trainer(model, tmp_path / "run", cb, max_steps=4)
    trainer.train()
    live = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = TokenDataset(4, seed=3).ids

    out = cb.save_ema_adapter(str(tmp_path / "ema_adapter"))
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors"]
    # the modes of its siblings (a plain mkdir under the umask), not mkdtemp's private 0700
    (tmp_path / "sibling").mkdir()
    assert os.stat(out).st_mode & 0o777 == (tmp_path / "sibling").stat().st_mode & 0o777 != 0o700
    assert all(torch.equal(p, live[n]) for n, p in model.named_parameters())     # live weights untouched
    saved = load_file(os.path.join(out, "adapter_model.safetensors"))
    for name, ema in zip(cb.engine.names, cb.engine.ema_tensors()):
        assert torch.equal(saved[name.replace(".default", "")], ema)

    loaded = PeftModel.from_pretrained(tiny_llama(), out)
    with cb.engine.swap():
        want = _logits(model, ids)
        ema_eval = trainer.evaluate()["eval_loss"]
    torch.testing.assert_close(_logits(loaded, ids), want, rtol=0, atol=0)
    live_eval = trainer.evaluate()["eval_loss"]
    assert ema_eval != live_eval
    assert all(torch.equal(p, live[n]) for n, p in model.named_parameters())     # swap restored them

    # writing again replaces the files in place
    save_ema_adapter(model, cb, out)
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors"]


@pytest.mark.slow
def test_several_named_adapters_only_the_active_one_is_averaged(tmp_path):
    from peft import PeftModel

    model = tiny_peft_llama(adapter_name="task_one")
    model.add_adapter("task_two", model.peft_config["task_one"])
    model.set_adapter("task_two")
    one_before = {n: p.detach().clone() for n, p in adapter_named_parameters(model, "task_one", trainable_only=False)}
    cb = DEMACallback()
    _trainer(model, tmp_path / "run", cb, max_steps=3).train()
    assert cb.engine.names and all(".task_two." in n for n in cb.engine.names)
    assert cb.engine.names == [n for n, _ in select_dema_parameters(model)]
    for n, p in adapter_named_parameters(model, "task_one", trainable_only=False):
        assert torch.equal(p, one_before[n])

    out = cb.save_ema_adapter(str(tmp_path / "two"))          # a non-default name still lands in out/
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors"]
    loaded = PeftModel.from_pretrained(tiny_llama(), out, adapter_name="task_two")
    ids = TokenDataset(4, seed=3).ids
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids), rtol=0, atol=0)   # EMA replaced at end

    with pytest.raises(ValueError, match="does not average"):
        save_ema_adapter(model, cb, str(tmp_path / "one"), adapter_name="task_one")


@pytest.mark.slow
def test_lora_scaling_kept_in_sync(tmp_path):
    """rsLoRA + a per-module alpha, and a layer whose scale was changed at run time: the
    exported adapter, loaded by PEFT, computes what the live model computes with the EMA."""
    from peft import PeftModel

    model = tiny_peft_llama(use_rslora=True, alpha_pattern={"v_proj": 3.0})
    cb = DEMACallback(replace_at_end=False)
    _trainer(model, tmp_path / "run", cb, max_steps=3).train()
    layer = model.base_model.model.model.layers[1].self_attn.q_proj
    layer.set_scale("default", 0.5)                       # live scaling now differs from the config
    ids = TokenDataset(4, seed=3).ids
    out = cb.save_ema_adapter(str(tmp_path / "ema"))
    with open(os.path.join(out, "adapter_config.json")) as f:
        conf = json.load(f)
    assert conf["use_rslora"] is True and conf["alpha_pattern"] == {"v_proj": 3.0} and conf["inference_mode"] is True
    loaded = PeftModel.from_pretrained(tiny_llama(), out)
    with cb.engine.swap():
        want = _logits(model, ids)
    torch.testing.assert_close(_logits(loaded, ids), want, rtol=1e-6, atol=1e-6)

    # without folding the run-time scale the outputs differ (the check above is not vacuous)
    save_ema_adapter(model, cb, str(tmp_path / "raw"), fold_scaling=False)
    raw = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "raw"))
    assert not torch.allclose(_logits(raw, ids), want, atol=1e-6)


def test_rslora_export_where_the_layers_do_not_keep_use_rslora(tmp_path):
    """peft < 0.18 LoRA layers have no ``use_rslora`` attribute (only the adapter's config says
    rsLoRA): the export must take the configured scaling alpha / sqrt(r) from the config, not
    alpha / r, or the exported lora_B is off by sqrt(r). Shown on a real rsLoRA model with the
    attribute removed from every layer (r=4: alpha / r would be half the true scaling)."""
    import math

    from peft import PeftModel

    import cl_core.integrations.peft as pe

    model = tiny_peft_llama(use_rslora=True, r=4, lora_alpha=8)
    cb = DEMACallback(replace_at_end=False)
    _trainer(model, tmp_path / "run", cb, max_steps=3).train()
    layers = [m for _, m in pe.tuner_layers(model) if hasattr(m, "r")]
    assert layers
    for layer in layers:
        assert layer.scaling["default"] == 8 / math.sqrt(4)            # what PEFT computes with rsLoRA
        if hasattr(layer, "use_rslora"):  # peft >= 0.18 keeps it; on an older peft the layout is already the real one
            del layer.use_rslora
        assert pe._configured_scaling(layer, "default", model.peft_config["default"]) == 8 / math.sqrt(4)
    assert pe._scaling_ratios(model, "default") == {}                  # nothing to fold: the live scaling is the configured one
    out = cb.save_ema_adapter(str(tmp_path / "ema"))
    saved = load_file(os.path.join(out, "adapter_model.safetensors"))
    for name, ema in zip(cb.engine.names, cb.engine.ema_tensors()):
        assert torch.equal(saved[name.replace(".default", "")], ema)    # lora_B not rescaled
    ids = TokenDataset(4, seed=3).ids
    with cb.engine.swap():
        want = _logits(model, ids)
    torch.testing.assert_close(_logits(PeftModel.from_pretrained(tiny_llama(), out), ids), want, rtol=0, atol=0)


def test_export_refused_before_training_without_peft_or_for_an_unknown_adapter(tmp_path):
    model = tiny_peft_llama()
    cb = DEMACallback()
    with pytest.raises(RuntimeError, match="training has not begun"):
        cb.save_ema_adapter(str(tmp_path / "x"))
    plain = tiny_llama()
    from cl_core import DEMA

    with pytest.raises(ValueError, match="needs a PEFT model"):
        save_ema_adapter(plain, DEMA(list(plain.parameters())), str(tmp_path / "x"))
    with pytest.raises(ValueError, match="not in the model"):
        save_ema_adapter(model, DEMA(select_dema_parameters(model)), str(tmp_path / "x"), adapter_name="nope")


def test_atomic_save_and_load(tmp_path):
    path = tmp_path / "sub" / "state.pt"
    atomic_save({"a": torch.arange(3), "names": ["x"]}, str(path))
    assert os.listdir(path.parent) == ["state.pt"]
    assert torch.equal(load_state_file(str(path))["a"], torch.arange(3))
    with pytest.raises(FileNotFoundError):
        load_state_file(str(tmp_path / "missing.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="junk.pt"):
        load_state_file(str(tmp_path / "junk.pt"))

    class Boom:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        atomic_save({"x": Boom()}, str(path))
    assert os.listdir(path.parent) == ["state.pt"]              # old file kept, no temp left
    assert torch.equal(load_state_file(str(path))["a"], torch.arange(3))


@pytest.mark.slow
@pytest.mark.skipif(transformers_adapter_support() is not None, reason=str(transformers_adapter_support()))
def test_transformers_native_adapter_exports_for_both_loaders(tmp_path):
    """model.add_adapter(...) (no PeftModel wrapper): the folder loads with
    PeftModel.from_pretrained and with transformers' model.load_adapter."""
    from peft import PeftModel

    model = tiny_llama()
    torch.manual_seed(1)
    model.add_adapter(lora_config(), adapter_name="default")
    cb = DEMACallback(replace_at_end=False)
    _trainer(model, tmp_path / "run", cb, max_steps=3).train()
    assert cb.engine.names and all(".lora_" in n for n in cb.engine.names)
    out = cb.save_ema_adapter(str(tmp_path / "ema"))
    ids = TokenDataset(4, seed=3).ids
    with cb.swap():
        want = _logits(model, ids)
    torch.testing.assert_close(_logits(PeftModel.from_pretrained(tiny_llama(), out), ids), want, rtol=0, atol=0)
    native = tiny_llama()
    native.load_adapter(out)
    torch.testing.assert_close(_logits(native, ids), want, rtol=0, atol=0)


def test_save_ema_adapter_when_another_process_creates_the_folder_first(tmp_path, monkeypatch):
    """Two DDP ranks saving one folder at once: the one that loses the rename (the folder
    appeared after it looked) replaces the two files inside instead of failing with
    "Directory not empty"; the folder ends complete and holds the EMA."""
    from cl_core import DEMA
    import cl_core.integrations.peft as pe

    model = tiny_peft_llama()
    named = select_dema_parameters(model)
    engine = DEMA(named)
    for _, p in named:
        p.grad = torch.ones_like(p)
    engine.update()
    out = tmp_path / "ema"
    save_ema_adapter(model, engine, str(out))            # the other rank's copy, already in place
    (out / "adapter_model.safetensors").write_bytes(b"stale")
    real_isdir = os.path.isdir
    looked = []

    def isdir_racing(path):                              # this rank looked before the other renamed
        if os.path.abspath(path) == str(out) and not looked:
            looked.append(path)
            return False
        return real_isdir(path)

    monkeypatch.setattr(pe.os.path, "isdir", isdir_racing)
    save_ema_adapter(model, engine, str(out))
    assert looked and sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors"]
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".ema.tmp")]
    saved = load_file(str(out / "adapter_model.safetensors"))
    assert len(saved) == len(named)


def test_transformers_adapter_support_names_versions_and_fix(monkeypatch):
    """One line naming the transformers, the peft it needs and the pip fix when transformers
    declares a higher peft floor than the installed one; None when the floor is met."""
    import peft
    import transformers
    from transformers.integrations import peft as hf_peft

    monkeypatch.setattr(hf_peft, "MIN_PEFT_VERSION", "999.0.0", raising=False)
    line = transformers_adapter_support()
    assert line is not None and "\n" not in line
    assert f"transformers {transformers.__version__} needs peft >= 999.0.0" in line
    assert f"peft {peft.__version__} is installed" in line and "pip install 'peft>=999.0.0'" in line
    monkeypatch.setattr(hf_peft, "MIN_PEFT_VERSION", peft.__version__)
    assert transformers_adapter_support() is None
    monkeypatch.delattr(hf_peft, "MIN_PEFT_VERSION")
    assert transformers_adapter_support() is None
