"""Shared test helpers, one home for each: the paths of the checkout and the test data, the
tiny Llama (with and without LoRA) every model test builds, the distance in ulps between
16-bit tensors, and the table of inner optimizers the fused tests run.

The torchrun scripts in tests/dist_scripts import the model builders too (through
tests/dist_scripts/common.py; the launchers put the checkout on PYTHONPATH).
"""
from __future__ import annotations

from pathlib import Path

import torch

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
README = ROOT / "README.md"
DATA_GROUPING = TESTS / "data_grouping"
DIST_SCRIPTS = TESTS / "dist_scripts"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]


def doc_blocks(path) -> list[dict]:
    """The ```python blocks of a Markdown file, each {"code", "label", "sketch", "where"}: `label`
    from an `<!-- example: NAME -->` line right above the fence, `sketch` when the line above is
    `<!-- sketch: ... -->` (shown, never run)."""
    import re

    text = Path(path).read_text()
    blocks = []
    for m in re.finditer(r"(?m)^```python\n(.*?)^```", text, re.S):
        before = text[:m.start()].rstrip("\n").rsplit("\n", 1)[-1].strip()
        label = re.fullmatch(r"<!-- example: ([\w-]+) -->", before)
        blocks.append({"code": m.group(1), "label": label.group(1) if label else None,
                       "sketch": before.startswith("<!-- sketch:"),
                       "where": f"{Path(path).name}:{text[:m.start()].count(chr(10)) + 1}"})
    return blocks


def doc_example(label: str, path=None) -> str:
    """The one block labelled `label` (in docs/ unless `path` is given)."""
    files = [path] if path else DOCS[1:]
    found = [b["code"] for f in files for b in doc_blocks(f) if b["label"] == label]
    assert len(found) == 1, f"{len(found)} blocks labelled {label!r} in {[str(f) for f in files]}"
    return found[0]

# --- the tiny Llama ---------------------------------------------------------------------

# Small enough that a Trainer step takes milliseconds on a CPU, big enough to have grouped
# query attention (4 heads, 2 key/value heads) and the q/v projections LoRA targets.
TINY_LLAMA = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2)


def tiny_llama_config(**changes):
    """A transformers LlamaConfig of TINY_LLAMA with `changes` on top."""
    from transformers import LlamaConfig

    unknown = sorted(set(changes) - set(TINY_LLAMA))
    if unknown:
        # a misspelt field would otherwise pass silently into LlamaConfig's **kwargs
        raise TypeError(f"tiny_llama_config: {unknown} are not fields of TINY_LLAMA ({sorted(TINY_LLAMA)}); "
                        "add a new field to TINY_LLAMA first")
    return LlamaConfig(**{**TINY_LLAMA, **changes})


def tiny_llama(seed: int = 0, *, train: bool = False, **changes):
    """A tiny LlamaForCausalLM whose weights depend on `seed` alone; in eval mode unless
    `train` (Lightning keeps the mode it is handed, and its tests hand a module in train
    mode). `changes`: other values for TINY_LLAMA's fields (see tiny_llama_config)."""
    from transformers import LlamaForCausalLM

    config = tiny_llama_config(**changes)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).train(train)


def lora_config(**kw):
    """LoRA r=4 on q_proj and v_proj with a random B (init_lora_weights=False), so the
    adapter changes the output from step one; `kw` on top."""
    from peft import LoraConfig

    base = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                task_type="CAUSAL_LM", init_lora_weights=False)
    base.update(kw)
    return LoraConfig(**base)


def tiny_peft_llama(seed: int = 0, adapter_name: str = "default", lora_seed: int | None = None, *,
                    base=None, train: bool = False, **lora_kw):
    """A PEFT LoRA model on `base` (default: tiny_llama(seed, train=train)), its adapter
    drawn from `lora_seed` (default seed + 1); `lora_kw` changes lora_config."""
    from peft import get_peft_model

    if base is not None and train:
        raise TypeError("tiny_peft_llama: `train` sets the mode of the default base; set the mode of `base` instead")
    model = tiny_llama(seed, train=train) if base is None else base
    torch.manual_seed(seed + 1 if lora_seed is None else lora_seed)
    return get_peft_model(model, lora_config(**lora_kw), adapter_name=adapter_name)


# --- ulps -------------------------------------------------------------------------------

# The spacing of the 16-bit floats in [1, 2) (2 to the minus the stored mantissa bits): one
# ulp relative, the unit of the tolerances of the bf16/fp16 tests.
ULP = {torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}


def _ordered(x: torch.Tensor) -> torch.Tensor:
    """16-bit floats as integers in numeric order: neighbours differ by 1, +0 and -0 are 0."""
    bits = x.contiguous().reshape(-1).view(torch.int16).int()
    return torch.where(bits < 0, -(bits & 0x7FFF), bits)


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in ulps between two tensors of the same 16-bit float dtype
    (representable numbers between them, elementwise). NaN must stand at the same places
    in both; there it counts 0."""
    assert a.dtype == b.dtype and a.dtype in ULP, (a.dtype, b.dtype)
    assert a.shape == b.shape, (a.shape, b.shape)
    nan_a, nan_b = torch.isnan(a).reshape(-1), torch.isnan(b).reshape(-1)
    assert torch.equal(nan_a, nan_b), "NaN at different places"
    d = (_ordered(a) - _ordered(b)).abs().masked_fill(nan_a, 0)
    return int(d.max()) if d.numel() else 0


# --- inner optimizers -------------------------------------------------------------------

# name -> (torch optimizer, hyper-parameters): one of each update rule the fused kernels
# implement (decoupled and L2 weight decay, custom betas, Nesterov, dampening, plain SGD).
OPTIMIZER_CONFIGS = {
    "adamw": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1)),
    "adam-l2": (torch.optim.Adam, dict(lr=1e-2, weight_decay=0.05)),
    "adam": (torch.optim.Adam, dict(lr=3e-3, betas=(0.8, 0.95))),
    "sgd-nesterov": (torch.optim.SGD, dict(lr=1e-2, momentum=0.9, nesterov=True, weight_decay=0.01)),
    "sgd-dampening": (torch.optim.SGD, dict(lr=2e-2, momentum=0.5, dampening=0.3)),
    "sgd": (torch.optim.SGD, dict(lr=1e-2)),
}
# eps well above float16's smallest numbers: torch's eps=1e-8 rounds to 0 there, and its
# own float16 Adam divides 0 by 0 where exp_avg_sq underflows
FP16_EPS = dict(eps=1e-4)


def optimizer_table(names, *, changes=None, split_lr=None) -> dict:
    """{name: build(params) -> torch optimizer} for `names`, in that order (the order of the
    tests' parameter ids). `changes`: {name: {hyper-parameter: value}} on top of
    OPTIMIZER_CONFIGS; `split_lr`: {name: lr}, where params[:2] form a group of their own
    with that lr (two groups with their own hyper-parameters)."""
    changes, split_lr = changes or {}, split_lr or {}
    unknown = sorted((set(names) | set(changes) | set(split_lr)) - set(OPTIMIZER_CONFIGS))
    if unknown:
        raise KeyError(f"optimizer_table: {unknown} not in OPTIMIZER_CONFIGS ({sorted(OPTIMIZER_CONFIGS)})")
    stray = sorted((set(changes) | set(split_lr)) - set(names))
    if stray:
        raise KeyError(f"optimizer_table: changes for {stray}, which are not in names {list(names)}")

    def builder(name):
        cls, hyper = OPTIMIZER_CONFIGS[name]
        hyper = {**hyper, **changes.get(name, {})}
        if name in split_lr:
            return lambda ps: cls([{"params": ps[:2], "lr": split_lr[name]}, {"params": ps[2:]}], **hyper)
        return lambda ps: cls(ps, **hyper)

    return {name: builder(name) for name in names}


# --------------------------------------------------------------------------- engine tests


def make_params(shapes, dtype=torch.float32, *, seed: int = 0, device="cpu", parameter: bool = True) -> list:
    """One random tensor per shape (standard normal from one generator seeded with `seed`, drawn
    in float32 on the CPU, then cast to `dtype` and moved to `device`): nn.Parameters, or plain
    tensors with `parameter=False`."""
    gen = torch.Generator().manual_seed(seed)
    out = [torch.randn(s, generator=gen).to(dtype).to(device) for s in shapes]
    return [torch.nn.Parameter(t) for t in out] if parameter else out


STATE_FIELDS = ("ema", "g_prev", "started", "has_prev", "d", "alpha", "skips")


def engine_snapshot(engine) -> dict:
    """The engine's DEMA state as it sits in memory, as plain tensors (copies): `ema` and
    `g_prev` (the flat buffers; g_prev empty where the group keeps none), the per-tensor
    `started`, `has_prev`, `d`, `alpha`, `skips`, each concatenated over the engine's groups
    in group order (empty before the first update), and the counters `num_updates`,
    `skipped_steps`, `missing_grads`. Nothing is flushed or canonicalised: a pending one-pass
    update stays pending, so a test can see that a read changed nothing."""
    parts = {k: [] for k in STATE_FIELDS}
    for g in engine.groups:
        s = g.state
        if s is None:
            continue
        flat = {"ema": s.ema_flat, "g_prev": s.gprev_flat if s.gprev_flat is not None else s.ema_flat[:0],
                "started": s.started, "has_prev": s.has_prev, "d": s.d, "alpha": s.alpha, "skips": s.skips}
        for k in STATE_FIELDS:
            parts[k].append(flat[k].detach().clone())
    snap = {k: torch.cat(v) if v else torch.empty(0) for k, v in parts.items()}
    snap["num_updates"] = torch.tensor(engine.num_updates)
    snap["skipped_steps"] = torch.tensor(engine.skipped_steps)
    snap["missing_grads"] = torch.tensor(list(engine._missing), dtype=torch.int64)  # (not .stats: no device work)
    return snap


def state_tensors(engine, params=(), optimizer=None) -> list:
    """Everything a step writes, as a list of copies to compare run against run: the
    parameters, the optimizer's per-parameter state (tensors; a float step as a tensor), then
    `engine_snapshot(engine)` in its key order."""
    out = [p.detach().clone() for p in params]
    if optimizer is not None:
        for p in params:
            for _, v in sorted(optimizer.state.get(p, {}).items()):
                out.append(v.clone() if isinstance(v, torch.Tensor) else torch.tensor(float(v)))
    return out + list(engine_snapshot(engine).values())


def stop_after_first_task(method, seed, task):
    """A runner ``on_task_end`` that stops the run after the first task, as Ctrl-C would (the
    resume tests run the same config again and compare with an uninterrupted run)."""
    if task == 0:
        raise KeyboardInterrupt
