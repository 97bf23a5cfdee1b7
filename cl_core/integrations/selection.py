"""Which tensors a trainer callback averages: the `params=` argument ("lora", "trainable" or a
callable), the PEFT adapter tensors of the active adapter of every outermost PEFT model, the
model wrappers to strip. Shared by the Hugging Face and the Lightning callbacks and by the
EMA adapter export. Needs torch only: PEFT models are recognised when peft is installed
(without peft there are no tuner layers, hence no PEFT model).
"""
from __future__ import annotations

import logging
from typing import Iterable

import torch

logger = logging.getLogger(__name__)

# What `params=` takes in both callbacks (a callable too: f(model) -> (name, parameter) pairs).
PARAM_CHOICES = ("lora", "trainable")


def check_params_arg(params, who: str = "DEMACallback") -> None:
    """Refuse a ``params=`` argument neither callback understands, naming what was written."""
    if not callable(params) and params not in PARAM_CHOICES:
        raise ValueError(f"{who}(params={params!r}): use 'lora' (the adapter tensors of the active adapter), "
                         "'trainable' (every trainable tensor, e.g. LLaVA's projector too, as the official LCIA "
                         "code averages) or a callable returning (name, parameter) pairs")


def _tuner_layer_cls():
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except Exception:  # peft missing or broken: no tuner layers can exist
        return None
    return BaseTunerLayer


def unwrap_model(model):
    """Strip DDP / DataParallel / torch.compile wrappers (FSDP is kept: its params are the real ones)."""
    while True:
        if hasattr(model, "_orig_mod") and isinstance(getattr(model, "_orig_mod"), torch.nn.Module):
            model = model._orig_mod
        elif isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            model = model.module
        else:
            return model


def tuner_layers(model) -> list:
    """(name, module) of every PEFT tuner layer (LoraLayer and friends) in ``model``."""
    cls = _tuner_layer_cls()
    if cls is None:
        return []
    return [(n, m) for n, m in model.named_modules() if isinstance(m, cls)]


def is_peft_model(model) -> bool:
    """True for a ``peft.PeftModel`` and for a transformers model with adapters added."""
    return hasattr(model, "peft_config") and bool(tuner_layers(model))


def active_adapter_names(model) -> list[str]:
    """Active adapter names, in first-seen order over the tuner layers."""
    names: list[str] = []
    for _, layer in tuner_layers(model):
        active = layer.active_adapters
        if isinstance(active, str):
            active = [active]
        for a in active:
            if a not in names:
                names.append(a)
    return names


def adapter_named_parameters(model, adapter_name: str | Iterable[str] | None = None, *,
                             trainable_only: bool = True) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) of the adapter tensors of ``adapter_name`` (default: the active adapters).

    Names are the full ``model.named_parameters()`` names; the order is the module order,
    so it is the same on every rank and on every run.
    """
    if adapter_name is None:
        adapters = active_adapter_names(model)
    elif isinstance(adapter_name, str):
        adapters = [adapter_name]
    else:
        adapters = list(adapter_name)
    wanted = set()
    for _, layer in tuner_layers(model):
        for attr in getattr(layer, "adapter_layer_names", ()):
            container = getattr(layer, attr, None)
            if container is None:
                continue
            for a in adapters:
                if a not in container:
                    continue
                item = container[a]
                if isinstance(item, torch.nn.Parameter):
                    wanted.add(id(item))
                elif isinstance(item, torch.nn.Module):
                    for p in item.parameters():
                        wanted.add(id(p))
    out, seen = [], set()
    # named_parameters gives canonical names (and de-duplicates tied tensors)
    for name, p in model.named_parameters():
        if id(p) in wanted and id(p) not in seen and (p.requires_grad or not trainable_only):
            seen.add(id(p))
            out.append((name, p))
    return out


def select_dema_parameters(model) -> list[tuple[str, torch.nn.Parameter]]:
    """What DEMA averages for ``model``: the trainable adapter tensors of the active adapter
    of a PEFT model, else every parameter with ``requires_grad``.

    Raises ``ValueError`` when that is nothing.
    """
    model = unwrap_model(model)
    if is_peft_model(model):
        active = active_adapter_names(model)
        named = adapter_named_parameters(model, active)
        if not named:
            raise ValueError(
                f"DEMA: the PEFT model has no trainable adapter parameters for its active adapter(s) "
                f"{active}; make the adapter trainable (e.g. set_adapter(name) / is_trainable=True) "
                "before training with DEMA")
        return named
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError(
            f"DEMA: {type(model).__name__} has no trainable parameters (every parameter has "
            "requires_grad=False), so there is nothing to average; add a LoRA adapter or unfreeze "
            "the parameters to train")
    return named


def outer_peft_models(module) -> list[tuple[str, torch.nn.Module]]:
    """(name prefix, model) of the outermost PEFT models inside ``module`` (itself included)."""
    found = []
    for name, m in module.named_modules():
        if any(p == "" or name == p or name.startswith(p + ".") for p, _ in found):
            continue                                  # inside a PEFT model already found
        if hasattr(m, "peft_config") and is_peft_model(m):
            found.append((name, m))
    return [(f"{name}." if name else "", m) for name, m in found]


def select_parameters(module, params="lora", who: str = "DEMACallback") -> list[tuple[str, torch.nn.Parameter]]:
    """The (name, parameter) pairs a trainer callback averages, named as ``module`` names them.

    ``"lora"``: the trainable tensors of the active adapter of every (outermost) PEFT model in
    ``module`` (``module`` itself when it is one), or every trainable parameter when there is
    no PEFT model; ``"trainable"``: every parameter with ``requires_grad``; a callable:
    ``params(module)`` returning parameters or (name, parameter) pairs.
    """
    check_params_arg(params, who)
    canonical = {}
    for n, p in module.named_parameters():
        canonical.setdefault(id(p), n)
    if callable(params):
        named = []
        for item in params(module):
            if isinstance(item, torch.Tensor):
                item = (canonical.get(id(item), f"param_{len(named)}"), item)
            if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], torch.Tensor)):
                raise TypeError(f"{who}(params=callable): the callable must return parameters or "
                                f"(name, parameter) pairs, got {type(item).__name__}")
            named.append(item)
        what = "tensors to average (the params= callable returned none)"
    elif params == "trainable":
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        what = "trainable parameters (every parameter has requires_grad=False)"
    else:
        peft_models = outer_peft_models(module)
        named = []
        for prefix, model in peft_models:
            named += [(canonical.get(id(p), prefix + n), p) for n, p in select_dema_parameters(model)]
        if not peft_models:
            logger.info("%s(params='lora'): %s holds no PEFT model; averaging every trainable parameter",
                         who, type(module).__name__)
            named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        what = ("LoRA tensors of the active adapter" if peft_models
                else "trainable parameters (every parameter has requires_grad=False)")
    if not named:
        raise ValueError(f"{who}(params={params!r}): {type(module).__name__} has no {what}, so there is nothing "
                         "to average; add a LoRA adapter or unfreeze the parameters to train")
    if len({id(p) for _, p in named}) != len(named):
        raise ValueError(f"{who}: the selected parameters hold the same tensor twice")
    return named
