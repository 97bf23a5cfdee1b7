"""MoELoRA, CoIN's own continual-tuning method: in every adapted linear layer a mixture of LoRA
experts weighted per token by a learned router (Chen et al., "CoIN", arXiv 2403.08350; the
official layer is ``CoINMOELoraLinear`` in JingyangQiao/CoIN ``CoIN/peft/tuners/clitmoelora.py``).

For a frozen base layer W (out × in) and an input token x, with E experts of rank r/E each:

    g(x)  = softmax(R x)                          R: the router, E × in, no bias
    y     = W x + b + (α / r) · Σ_e g_e(x) · B_e A_e x      A_e: (r/E) × in,  B_e: out × (r/E)

as the official layer computes it: the LoRA rank r is split evenly across the experts (r must be
a multiple of E), the scaling is α / r of the whole rank, every expert is used for every token
(a dense softmax, no top-k), A_e starts from N(0, 0.01²), B_e from zero (so the model starts as
the base model) and R from ``nn.Linear``'s default initialisation. The official scripts
(``scripts/CoIN/Train_MOE/*.sh``) pass ``--expert_num 2`` (their config's default is 4):
``MoELoRAConfig`` defaults to 2 experts and the dense router. ``top_k=k`` keeps each token's k
largest router weights and renormalises them to sum 1 (an option the official code does not
have). With dropout, as in the official layer, each expert draws its own dropout mask; the
router sees the input without dropout.

MoELoRA is its own method in CoIN, trained task after task on one adapter set without any EMA;
``DEMACallback`` can still average its tensors (a model without PEFT adapters averages every
trainable tensor: the experts and the routers), but no published run does that.

API
---
    from cl_core.moelora import MoELoRAConfig, apply_moelora, save_moelora, load_moelora

    cfg = MoELoRAConfig(r=8, lora_alpha=16, num_experts=2, target_modules="all-linear")
    apply_moelora(model, cfg)      # in place: every target nn.Linear -> MoELoRALinear; only the
                                   #   experts and routers stay trainable; returns the module names
    moelora_parameters(model)      # [(name, parameter)] of the experts and routers
    save_moelora(model, "out/")    # out/moelora_config.json + out/moelora.safetensors
    load_moelora(fresh_base, "out/")   # the same layers on a fresh base, weights loaded (frozen
                                   #   unless trainable=True): outputs identical to the saved model

The runner drives it as one adapter set trained task after task (cl_core.continual.adapters.MoELoRASet).

The layer needs torch only; its files need safetensors (``pip install ".[hf]"``). Works with
``transformers.Trainer`` (the model stays a plain ``nn.Module``; the optimizer sees
the trainable experts and routers only). The adapter cannot be merged into W: the router's
weights depend on the input.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn
from torch.nn import functional as F

from cl_core.atomic_io import atomic_write, write_json_atomic

__all__ = ["ADAPTER_NAME", "CONFIG_NAME", "WEIGHTS_NAME", "MoELoRAConfig", "MoELoRALinear",
           "apply_moelora", "load_moelora", "moelora_parameters", "moelora_state_dict", "read_moelora_config",
           "save_moelora", "target_module_names"]

log = logging.getLogger("cl_core.moelora")

ADAPTER_NAME = "moelora"                 # the runner's name for the one adapter set
CONFIG_NAME = "moelora_config.json"
WEIGHTS_NAME = "moelora.safetensors"
FORMAT = "cl_core.moelora"
# Parts of a multimodal model "all-linear" leaves alone, as the official find_all_linear_names
# skips mm_projector / vision_tower / vision_resampler (LLaVA's own names) and as HF's LLaVA
# names them (vision_tower, multi_modal_projector), and Qwen-VL's vision tower with its patch
# merger (visual): the experts go on the language model.
MULTIMODAL_PARTS = ("mm_projector", "vision_tower", "vision_resampler", "multi_modal_projector", "visual")


@dataclass(frozen=True)
class MoELoRAConfig:
    """Settings of a MoELoRA adapter (module docstring). Checked on construction: a bad value
    raises ValueError naming the field (``MoELoRAConfig.r=6``)."""

    r: int = 8                              # total LoRA rank, split evenly across the experts
    lora_alpha: float = 16                  # scaling α / r (of the total rank, as the official layer)
    num_experts: int = 2                    # the official scripts' --expert_num 2
    top_k: Optional[int] = None             # None: every expert, dense softmax (official)
    dropout: float = 0.0                    # on the experts' input (official default 0.05)
    target_modules: Union[str, tuple] = "all-linear"   # or module names (exact or last parts)
    # the scripts' r 128 / alpha 256 give scaling 2, as r 8 / alpha 16 here

    def __post_init__(self):
        if isinstance(self.target_modules, list):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        for name in ("r", "num_experts"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"MoELoRAConfig.{name}={v!r} must be a whole number >= 1")
        if self.r % self.num_experts:
            raise ValueError(f"MoELoRAConfig.r={self.r} is not a multiple of MoELoRAConfig.num_experts="
                             f"{self.num_experts}: the rank is split evenly across the experts (each gets r / "
                             "num_experts), as in the official MoELoRA")
        k = self.top_k
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.num_experts):
            raise ValueError(f"MoELoRAConfig.top_k={k!r} must be None (every expert, the official dense router) "
                             f"or a whole number from 1 to MoELoRAConfig.num_experts={self.num_experts}")
        a = self.lora_alpha
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not (a > 0 and math.isfinite(a)):
            raise ValueError(f"MoELoRAConfig.lora_alpha={a!r} must be a positive number")
        d = self.dropout
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0 <= d < 1:
            raise ValueError(f"MoELoRAConfig.dropout={d!r} must be a number in [0, 1)")
        t = self.target_modules
        if isinstance(t, str):
            if not t:
                raise ValueError("MoELoRAConfig.target_modules='' names no module; give 'all-linear' or names")
        elif not t or not all(isinstance(n, str) and n for n in t):
            raise ValueError(f"MoELoRAConfig.target_modules={t!r} must be 'all-linear', a module name or a "
                             "non-empty list of module names")

    @property
    def expert_rank(self) -> int:
        return self.r // self.num_experts

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.r

    def to_dict(self) -> dict:
        d = asdict(self)
        if isinstance(d["target_modules"], tuple):
            d["target_modules"] = list(d["target_modules"])
        return d

    def describe(self) -> str:
        """The adapter in words, for reports."""
        router = "dense softmax router" if self.top_k is None else f"softmax router, top-{self.top_k} renormalised"
        return (f"one MoELoRA set: {self.num_experts} LoRA experts of rank {self.expert_rank} (r {self.r} split) "
                f"and a {router} per layer")


class MoELoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus MoELoRA experts and router (module docstring).

    Parameters: ``lora_A`` (E, r/E, in), ``lora_B`` (E, out, r/E), ``router`` (E, in); the base
    layer is kept as ``base_layer`` (its tensors are not copied)."""

    def __init__(self, base_layer: nn.Linear, config: MoELoRAConfig):
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"MoELoRALinear wraps an nn.Linear, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.num_experts, self.expert_rank = config.num_experts, config.expert_rank
        self.scaling, self.top_k = config.scaling, config.top_k
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        w = base_layer.weight
        kw = dict(device=w.device, dtype=w.dtype)
        e, re = self.num_experts, self.expert_rank
        self.lora_A = nn.Parameter(torch.empty(e, re, self.in_features, **kw))
        self.lora_B = nn.Parameter(torch.empty(e, self.out_features, re, **kw))
        self.router = nn.Parameter(torch.empty(e, self.in_features, **kw))
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        # The official initialisation: A ~ N(0, 0.01²), B = 0 (the model starts as the base),
        # the router as nn.Linear's default (kaiming-uniform, a = √5).
        nn.init.normal_(self.lora_A, mean=0.0, std=0.01)
        nn.init.zeros_(self.lora_B)
        nn.init.kaiming_uniform_(self.router, a=math.sqrt(5))

    # The base layer's tensors under their usual names, for code that reads q_proj.weight.
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self):
        return self.base_layer.bias

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        """Router weights of every token, (..., E): softmax, or its renormalised top-k."""
        g = torch.softmax(F.linear(x, self.router), dim=-1)
        if self.top_k is not None and self.top_k < self.num_experts:
            top, idx = torch.topk(g, self.top_k, dim=-1)
            g = torch.zeros_like(g).scatter(-1, idx, top / top.sum(dim=-1, keepdim=True))
        return g

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        xa = x.to(self.lora_A.dtype)
        g = self.gates(xa)
        e, re = self.num_experts, self.expert_rank
        if isinstance(self.dropout, nn.Identity) or not self.training:
            # all experts at once: two matmuls of plain LoRA's size, the gates applied between
            h = F.linear(xa, self.lora_A.reshape(e * re, self.in_features)).unflatten(-1, (e, re))
        else:
            # one dropout mask per expert, as the official layer calls dropout once per expert
            h = torch.stack([F.linear(self.dropout(xa), self.lora_A[i]) for i in range(e)], dim=-2)
        h = (h * g.unsqueeze(-1)).flatten(-2)
        b = self.lora_B.permute(1, 0, 2).reshape(self.out_features, e * re)
        return result + (F.linear(h, b) * self.scaling).to(result.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, experts={self.num_experts}, "
                f"expert_rank={self.expert_rank}, top_k={self.top_k}, scaling={self.scaling:g}")


# --------------------------------------------------------------------------- applying

def _output_layer_names(model) -> set:
    get = getattr(model, "get_output_embeddings", None)
    out = get() if callable(get) else None
    return {n for n, m in model.named_modules() if out is not None and m is out}


def target_module_names(model, target_modules) -> list:
    """The names of the ``nn.Linear`` modules a config adapts. ``"all-linear"``: every linear
    layer but the output layer (``lm_head``) and the multimodal parts (MULTIMODAL_PARTS); a
    name or list of names: the modules named so exactly or by their last dotted parts (PEFT's
    rule). A named module that is not an ``nn.Linear``, or no match at all, is a ValueError."""
    modules = dict(model.named_modules())
    if any(isinstance(m, MoELoRALinear) for m in modules.values()):
        raise ValueError(f"{type(model).__name__} already has MoELoRA layers; apply MoELoRA to a fresh base model")
    if target_modules == "all-linear":
        skip = _output_layer_names(model)
        names = [n for n, m in modules.items() if isinstance(m, nn.Linear) and n not in skip
                 and not any(part in n.split(".") for part in MULTIMODAL_PARTS)]
        if not names:
            raise ValueError(f"target_modules='all-linear': {type(model).__name__} has no nn.Linear layer to adapt")
        return names
    wanted = (target_modules,) if isinstance(target_modules, str) else tuple(target_modules)
    names, found = [], set()
    for n, m in modules.items():
        hit = [t for t in wanted if n == t or n.endswith("." + t)]
        if not hit:
            continue
        if not isinstance(m, nn.Linear):
            raise ValueError(f"target_modules: {n} is a {type(m).__name__}, not an nn.Linear; MoELoRA adapts "
                             "linear layers only")
        names.append(n)
        found.update(hit)
    missing = [t for t in wanted if t not in found]
    if missing:
        raise ValueError(f"target_modules {missing} match no module of {type(model).__name__} (its linear layers end "
                         f"in: {', '.join(sorted({n.rsplit('.', 1)[-1] for n, m in modules.items() if isinstance(m, nn.Linear)}))})")
    return names


def _wrap(model, names, config: MoELoRAConfig) -> None:
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, MoELoRALinear(getattr(parent, child), config))


def apply_moelora(model, config: MoELoRAConfig) -> list:
    """Replace every target linear layer of ``model`` by a ``MoELoRALinear``, in place; freeze
    every other parameter (only experts and routers train, as the official
    ``mark_only_lora_as_trainable`` with bias "none"). Returns the adapted module names. Every
    check runs before the model is changed."""
    if not isinstance(config, MoELoRAConfig):
        raise TypeError(f"apply_moelora(config=...) takes a MoELoRAConfig, got {type(config).__name__}")
    names = target_module_names(model, config.target_modules)
    for p in model.parameters():
        p.requires_grad_(False)
    _wrap(model, names, config)
    model._cl_core_moelora = (config, tuple(names))
    log.info("MoELoRA on %d linear layers (%s), %d trainable parameters", len(names), config.describe(),
             sum(p.numel() for _, p in moelora_parameters(model)))
    return names


def _layers(model) -> list:
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, MoELoRALinear)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no MoELoRA layers (apply_moelora or load_moelora first)")
    return layers


def moelora_parameters(model) -> list:
    """(name, parameter) of every expert and router of ``model``."""
    return [(f"{n}.{k}", getattr(m, k)) for n, m in _layers(model) for k in ("lora_A", "lora_B", "router")]


def moelora_state_dict(model) -> dict:
    """The experts and routers as {name: tensor} (detached, contiguous, on the CPU)."""
    return {n: p.detach().to("cpu").contiguous() for n, p in moelora_parameters(model)}


# --------------------------------------------------------------------------- saving and loading

def _safetensors():
    try:
        import safetensors.torch
    except ImportError as exc:  # the layer itself needs torch only; its files need safetensors
        raise ImportError(f"saving and loading MoELoRA adapters needs safetensors ({exc}); install it with: "
                          "pip install \".[hf]\" (in the cl_core checkout)") from None
    return safetensors.torch


def save_moelora(model, directory) -> Path:
    """Write ``moelora_config.json`` (the config and the adapted module names) and
    ``moelora.safetensors`` (experts and routers) into ``directory``; returns the folder."""
    st_save = _safetensors().save

    info = getattr(model, "_cl_core_moelora", None)
    if info is None:
        raise ValueError(f"{type(model).__name__} has no MoELoRA adapter (apply_moelora or load_moelora first)")
    config, names = info
    tensors = moelora_state_dict(model)
    directory = Path(directory)
    data = st_save(tensors, metadata={"format": FORMAT})
    atomic_write(directory / WEIGHTS_NAME, lambda f: f.write(data), binary=True)
    base = getattr(model, "config", None)
    write_json_atomic({"format": FORMAT, "version": 1, "config": config.to_dict(), "modules": list(names),
                       "base_model_type": getattr(base, "model_type", None),
                       "base_model_class": type(model).__name__}, directory / CONFIG_NAME, indent=1)
    return directory


def read_moelora_config(directory) -> tuple:
    """(MoELoRAConfig, module names) of a folder written by save_moelora."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"MoELoRA folder {directory}: no {CONFIG_NAME} inside")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not JSON ({exc})") from None
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise ValueError(f"{path}: not a cl_core MoELoRA config (format {d.get('format') if isinstance(d, dict) else None!r})")
    if d.get("version") != 1:
        raise ValueError(f"{path}: version {d.get('version')!r}; this cl_core reads version 1")
    try:
        return MoELoRAConfig(**d["config"]), list(d["modules"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path}: bad MoELoRA config ({exc})") from None


def load_moelora(model, directory, trainable: bool = False):
    """Put the MoELoRA adapter saved in ``directory`` onto ``model`` (a fresh base model of the
    same architecture), in place, and return it: the saved layers, their saved weights, frozen
    unless ``trainable``. Missing, extra or mis-shaped tensors raise ValueError before the model
    is changed."""
    load_file = _safetensors().load_file

    directory = Path(directory)
    config, names = read_moelora_config(directory)
    path = directory / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"MoELoRA folder {directory}: no {WEIGHTS_NAME} inside")
    tensors = load_file(str(path))
    modules = dict(model.named_modules())
    if any(isinstance(m, MoELoRALinear) for m in modules.values()):
        raise ValueError(f"{type(model).__name__} already has MoELoRA layers; load into a fresh base model")
    e, re = config.num_experts, config.expert_rank
    expected = {}
    for n in names:
        m = modules.get(n)
        if not isinstance(m, nn.Linear):
            raise ValueError(f"{path}: the adapter was saved for a linear layer {n}, which this "
                             f"{type(model).__name__} {'lacks' if m is None else 'has as a ' + type(m).__name__}")
        expected.update({f"{n}.lora_A": (e, re, m.in_features), f"{n}.lora_B": (e, m.out_features, re),
                         f"{n}.router": (e, m.in_features)})
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or extra:
        raise ValueError(f"{path}: {len(missing)} tensors missing (first: {missing[:1]}), {len(extra)} unexpected "
                         f"(first: {extra[:1]}); the file does not belong to {CONFIG_NAME}")
    bad = [k for k, shape in expected.items() if tuple(tensors[k].shape) != shape]
    if bad:
        raise ValueError(f"{path}: {bad[0]} has shape {tuple(tensors[bad[0]].shape)}, the model needs "
                         f"{expected[bad[0]]}: the adapter was saved for another model size")
    for p in model.parameters():
        p.requires_grad_(False)
    _wrap(model, names, config)
    model._cl_core_moelora = (config, tuple(names))
    with torch.no_grad():
        for n, p in moelora_parameters(model):
            p.copy_(tensors[n])
            p.requires_grad_(trainable)
    return model
