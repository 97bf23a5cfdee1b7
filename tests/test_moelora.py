"""MoELoRA (cl_core.moelora): the layer against a plain per-expert reference (shapes, dtypes,
seeds, top-k), the base model's output at initialisation, which tensors train and get
gradients, the real transformers.Trainer (with DEMACallback on top), export and reload into a
fresh base with identical outputs, and bad input refused before anything changes."""
import json
import math

import pytest
import torch
from torch import nn

from cl_core.moelora import (CONFIG_NAME, WEIGHTS_NAME, MoELoRAConfig, MoELoRALinear, apply_moelora,
                             load_moelora, moelora_parameters, save_moelora, target_module_names)
from cl_core.continual.adapters import MoELoRASet
from cl_core.grouping import Decision
from tests.helpers import tiny_llama

IDS = torch.tensor([[1, 5, 9, 13, 17, 21, 4], [1, 30, 31, 7, 8, 2, 0]])


def reference(layer: MoELoRALinear, x: torch.Tensor) -> torch.Tensor:
    """The official layer's arithmetic, written out per expert and per token in float64:
    W x + b + Σ_e softmax(R x)_e · (α/r) · B_e A_e x, the gates cut to the renormalised top-k."""
    xd = x.double()
    w, b = layer.base_layer.weight.double(), layer.base_layer.bias
    out = xd @ w.T + (0 if b is None else b.double())
    logits = xd @ layer.router.detach().double().T
    g = torch.softmax(logits, dim=-1)
    if layer.top_k is not None:
        keep = torch.zeros_like(g, dtype=torch.bool)
        for idx in torch.cartesian_prod(*[torch.arange(s) for s in g.shape[:-1]]).reshape(-1, g.dim() - 1):
            order = sorted(range(g.shape[-1]), key=lambda e: -g[tuple(idx)][e].item())
            keep[tuple(idx)][order[:layer.top_k]] = True
        g = torch.where(keep, g, 0.0)
        g = g / g.sum(-1, keepdim=True)
    for e in range(layer.num_experts):
        a, bb = layer.lora_A[e].double(), layer.lora_B[e].double()
        out = out + g[..., e:e + 1] * layer.scaling * ((xd @ a.T) @ bb.T)
    return out


def _random_layer(seed, in_f, out_f, bias, dtype, **cfg):
    torch.manual_seed(seed)
    base = nn.Linear(in_f, out_f, bias=bias).to(dtype)
    layer = MoELoRALinear(base, MoELoRAConfig(**cfg))
    with torch.no_grad():  # a trained adapter: B away from zero, a router with clear preferences
        layer.lora_B.normal_(0, 0.5)
        layer.router.normal_(0, 1.0)
    return layer


CASES = [  # (in, out, bias, r, alpha, experts, top_k, input shape)
    (16, 24, True, 8, 16, 2, None, (3, 5)),
    (16, 24, False, 8, 16, 4, None, (7,)),
    (32, 8, True, 12, 6, 3, 2, (2, 4)),
    (9, 13, True, 4, 8, 4, 1, (2, 3)),
    (20, 20, False, 6, 12, 1, None, (5,)),
    (16, 24, True, 8, 16, 4, 4, (2, 2)),
]
TOLS = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 6e-2}


@pytest.mark.parametrize("dtype", list(TOLS))
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"in{c[0]}-out{c[1]}-r{c[3]}-E{c[5]}-k{c[6]}")
@pytest.mark.parametrize("seed", [0, 1])
def test_layer_equals_the_per_expert_reference(case, dtype, seed):
    in_f, out_f, bias, r, alpha, experts, top_k, shape = case
    layer = _random_layer(seed, in_f, out_f, bias, dtype, r=r, lora_alpha=alpha, num_experts=experts, top_k=top_k)
    x = torch.randn(*shape, in_f, generator=torch.Generator().manual_seed(seed + 10)).to(dtype)
    y = layer(x)
    assert y.dtype == dtype and y.shape == (*shape, out_f)
    ref = reference(layer, x)
    scale = ref.abs().max().item()
    assert (y.double() - ref).abs().max().item() <= TOLS[dtype] * max(1.0, scale)
    assert layer.lora_A.shape == (experts, r // experts, in_f) and layer.lora_B.shape == (experts, out_f, r // experts)
    assert layer.router.shape == (experts, in_f) and layer.scaling == alpha / r


def test_top_k_keeps_k_experts_per_token_and_renormalises():
    layer = _random_layer(3, 12, 6, True, torch.float32, r=8, num_experts=4, top_k=2)
    g = layer.gates(torch.randn(5, 12))
    assert ((g > 0).sum(-1) == 2).all()
    torch.testing.assert_close(g.sum(-1), torch.ones(5))
    dense = _random_layer(3, 12, 6, True, torch.float32, r=8, num_experts=4)
    assert ((dense.gates(torch.randn(5, 12)) > 0).sum(-1) == 4).all()


def test_dropout_is_drawn_once_per_expert_and_not_for_the_router_nor_in_eval():
    layer = _random_layer(4, 16, 8, False, torch.float32, r=4, num_experts=2, dropout=0.5).train()

    class Numbered(nn.Module):  # stands for dropout: call k scales by k + 1, so each call is visible
        calls = 0

        def forward(self, x):
            self.calls += 1
            return x * (self.calls + 1)

    layer.dropout = Numbered()
    x = torch.randn(3, 16)
    g = layer.gates(x)  # the router sees x itself
    want = layer.base_layer(x) + sum(g[:, e:e + 1] * layer.scaling * ((x * (e + 2)) @ layer.lora_A[e].T)
                                     @ layer.lora_B[e].T for e in range(2))
    torch.testing.assert_close(layer(x), want)
    assert layer.dropout.calls == 2
    layer.eval()
    torch.testing.assert_close(layer(x), reference(layer, x).float())
    assert layer.dropout.calls == 2


def test_initialised_model_equals_the_base_and_only_experts_and_routers_train():
    base = tiny_llama(0)
    plain = tiny_llama(0)
    ref = plain(IDS).logits
    names = apply_moelora(base, MoELoRAConfig(r=4, lora_alpha=8, num_experts=2))
    assert torch.equal(base(IDS).logits, ref)  # B = 0: exactly the base model
    # every linear layer of the decoder, not the output layer
    want = {n for n, m in plain.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"}
    assert set(names) == want and len(names) == 14
    trainable = {n for n, p in base.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in moelora_parameters(base)} == {f"{n}.{k}" for n in names
                                                                      for k in ("lora_A", "lora_B", "router")}
    for n in names:
        layer = base.get_submodule(n)
        lin = plain.get_submodule(n)
        assert layer.lora_A.shape == (2, 2, lin.in_features) and layer.lora_B.shape == (2, lin.out_features, 2)
        assert layer.router.shape == (2, lin.in_features)
        assert torch.count_nonzero(layer.lora_B) == 0 and layer.lora_A.std().item() == pytest.approx(0.01, rel=0.3)
        assert layer.weight is layer.base_layer.weight  # code reading q_proj.weight still finds it


def test_gradients_reach_experts_and_routers_only():
    model = tiny_llama(0)
    apply_moelora(model, MoELoRAConfig(r=4, lora_alpha=8, num_experts=2, target_modules=["q_proj", "v_proj"]))
    # at initialisation B = 0: only B gets a gradient (A and the router cannot change the output yet)
    model(IDS, labels=IDS).loss.backward()
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, n
    params = dict(moelora_parameters(model))
    assert all(params[n].grad.abs().sum() > 0 for n in params if n.endswith("lora_B"))
    assert all(torch.count_nonzero(params[n].grad) == 0 for n in params if not n.endswith("lora_B"))
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        for n, p in params.items():
            if n.endswith("lora_B"):
                p.normal_(0, 0.1)
    model(IDS, labels=IDS).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params.values())
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def _dataset(n=16):
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(3, 64, (n, 8), generator=g)
    return [{"input_ids": r, "labels": r, "attention_mask": torch.ones_like(r)} for r in rows]


def test_trainer_trains_experts_and_routers_and_dema_averages_them(tmp_path):
    from transformers import Trainer, TrainingArguments

    from cl_core import DEMACallback, DEMAConfig

    model = tiny_llama(0, train=True)
    apply_moelora(model, MoELoRAConfig(r=4, lora_alpha=8, num_experts=2))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cb = DEMACallback(DEMAConfig(), params="lora")  # no PEFT model: every trainable tensor
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], save_strategy="no",
                             max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2, logging_strategy="no",
                             disable_tqdm=True, remove_unused_columns=False)
    Trainer(model=model, args=args, train_dataset=_dataset(), callbacks=[cb]).train()
    trained = {n for n, _ in moelora_parameters(model)}
    assert set(cb.engine.names) == trained
    for n, p in model.named_parameters():
        if n in trained:
            assert not torch.equal(p, before[n]), n
        else:
            assert torch.equal(p, before[n]), n  # the base stays frozen


def test_export_and_reload_into_a_fresh_base_gives_identical_outputs(tmp_path):
    model = tiny_llama(0)
    cfg = MoELoRAConfig(r=6, lora_alpha=12, num_experts=3, top_k=2, target_modules=("q_proj", "down_proj"))
    set_ = MoELoRASet(model, cfg)
    with pytest.raises(ValueError, match="re-trains the MoELoRA set, but the model has none yet"):
        set_.prepare_task(Decision(group=0, reused=True, similarities=[]))
    with pytest.raises(ValueError, match="MoELoRA trains one adapter set; the decision names group 1"):
        set_.prepare_task(Decision(group=1, reused=False, similarities=[]))
    assert set_.prepare_task(Decision(group=0, reused=False, similarities=[])) == ("moelora", False)
    torch.manual_seed(5)
    with torch.no_grad():
        for _, p in moelora_parameters(model):
            p.normal_(0, 0.2)
    model.eval()
    out = tmp_path / "adapter"
    set_.save(out)
    assert sorted(p.name for p in out.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME])
    saved = json.loads((out / CONFIG_NAME).read_text())
    assert saved["config"]["num_experts"] == 3 and saved["config"]["top_k"] == 2 and len(saved["modules"]) == 4
    fresh = load_moelora(tiny_llama(0), out)
    assert torch.equal(fresh(IDS).logits, model(IDS).logits)
    gen = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(fresh.generate(IDS, **gen), model.generate(IDS, **gen))
    assert not any(p.requires_grad for p in fresh.parameters())
    again = MoELoRASet.from_pretrained(tiny_llama(0), out, is_trainable=True)
    assert {n for n, p in again.model.named_parameters() if p.requires_grad} == {n for n, _ in
                                                                                  moelora_parameters(model)}
    with pytest.raises(ValueError, match="opens the MoELoRA set, but the model already has it"):
        again.prepare_task(Decision(group=0, reused=False, similarities=[]))
    assert again.prepare_task(Decision(group=0, reused=True, similarities=[])) == ("moelora", True)
    # a re-saved reload is the same file content
    again.save(tmp_path / "again")
    assert (tmp_path / "again" / WEIGHTS_NAME).read_bytes() == (out / WEIGHTS_NAME).read_bytes()


@pytest.mark.parametrize("kw, needle", [
    (dict(r=6, num_experts=4), "MoELoRAConfig.r=6 is not a multiple of MoELoRAConfig.num_experts=4"),
    (dict(num_experts=0), "MoELoRAConfig.num_experts=0 must be a whole number >= 1"),
    (dict(top_k=3), "MoELoRAConfig.top_k=3 must be None"),
    (dict(top_k=0), "MoELoRAConfig.top_k=0"),
    (dict(lora_alpha=float("nan")), "MoELoRAConfig.lora_alpha=nan"),
    (dict(dropout=1.0), "MoELoRAConfig.dropout=1.0"),
    (dict(target_modules=()), "MoELoRAConfig.target_modules=()"),
])
def test_bad_settings_are_refused_naming_the_field(kw, needle):
    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        MoELoRAConfig(**kw)


def test_bad_targets_and_mismatched_folders_are_refused_before_the_model_changes(tmp_path):
    model = tiny_llama(0)
    with pytest.raises(ValueError, match=r"\['qproj'\] match no module .*q_proj"):
        apply_moelora(model, MoELoRAConfig(target_modules=("qproj",)))
    with pytest.raises(ValueError, match="is a LlamaRMSNorm, not an nn.Linear"):
        apply_moelora(model, MoELoRAConfig(target_modules=("q_proj", "norm")))
    assert not any(isinstance(m, MoELoRALinear) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())  # nothing frozen either
    apply_moelora(model, MoELoRAConfig(r=4))
    with pytest.raises(ValueError, match="already has MoELoRA layers"):
        apply_moelora(model, MoELoRAConfig(r=4))
    save_moelora(model, tmp_path / "a")
    wider = tiny_llama(0, hidden_size=48, intermediate_size=96)
    with pytest.raises(ValueError, match="saved for another model size"):
        load_moelora(wider, tmp_path / "a")
    assert not any(isinstance(m, MoELoRALinear) for m in wider.modules())
    with pytest.raises(FileNotFoundError, match=f"no {CONFIG_NAME} inside"):
        load_moelora(tiny_llama(0), tmp_path)
    with pytest.raises(ValueError, match="has no MoELoRA adapter"):
        save_moelora(tiny_llama(0), tmp_path / "b")


def test_all_linear_leaves_the_multimodal_parts_alone():
    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.vision_tower = nn.Sequential(nn.Linear(4, 4))
            self.multi_modal_projector = nn.Linear(4, 4)
            self.language_model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))

    assert target_module_names(Toy(), "all-linear") == ["language_model.0", "language_model.1"]
    assert math.isclose(MoELoRAConfig(r=128, lora_alpha=256).scaling, 2.0)  # the scripts' r 128 / alpha 256


def test_on_a_tiny_llava_the_experts_go_on_the_language_model_only(tmp_path):
    from tests.integrations.test_llava import IMAGE_TOKEN, N_IMAGE_TOKENS, tiny_llava

    model = tiny_llava().eval()
    ids = torch.cat([torch.full((1, N_IMAGE_TOKENS), IMAGE_TOKEN), IDS[:1]], dim=1)
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    ref = model(input_ids=ids, pixel_values=pixels).logits
    names = apply_moelora(model, MoELoRAConfig(r=4, lora_alpha=8))
    assert len(names) == 14 and all(".language_model." in n for n in names)  # not the vision tower, projector, head
    assert torch.equal(model(input_ids=ids, pixel_values=pixels).logits, ref)
    with torch.no_grad():
        for _, p in moelora_parameters(model):
            p.normal_(0, 0.1)
    save_moelora(model, tmp_path)
    fresh = load_moelora(tiny_llava().eval(), tmp_path)
    out = fresh(input_ids=ids, pixel_values=pixels).logits
    assert torch.equal(out, model(input_ids=ids, pixel_values=pixels).logits) and not torch.equal(out, ref)
