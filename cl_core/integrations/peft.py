"""PEFT helpers for DEMA: which parameters to average, saving the EMA as a PEFT adapter,
and checkpoint file I/O written atomically.

* :func:`select_dema_parameters` picks what the callback averages: the adapter
  tensors (``lora_A``/``lora_B``/embeddings/DoRA magnitude) of the *active* adapter(s)
  of a PEFT model, else every trainable parameter.
* :func:`save_ema_adapter` writes the EMA weights as a standard PEFT adapter folder
  (``adapter_config.json`` + ``adapter_model.safetensors``) that
  ``peft.PeftModel.from_pretrained`` loads unchanged.  Where a layer's live LoRA
  scaling was changed at run time (``set_scale`` / ``scale_layer``), the ratio to the
  configured scaling is folded into ``lora_B`` so that the loaded adapter computes
  what the live model computes.
* :func:`atomic_save` / :func:`load_state_file`: ``torch.save`` to a temporary file in
  the same folder, ``fsync``, then ``os.replace`` — a crash never leaves half a file.
"""
from __future__ import annotations

import copy
import math
import os
import shutil
import tempfile
from typing import Iterable

import torch

from cl_core.atomic_io import torch_save_atomic
from cl_core.dema.distributed import is_dtensor

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


# --------------------------------------------------------------------------- selection


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
    for mname, layer in tuner_layers(model):
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


# --------------------------------------------------------------------------- export


def _configured_scaling(layer, adapter: str) -> float:
    r = layer.r[adapter]
    alpha = layer.lora_alpha[adapter]
    if getattr(layer, "use_rslora", {}).get(adapter, False):
        return alpha / math.sqrt(r)
    return alpha / r


def _scaling_ratios(model, adapter: str) -> dict[str, float]:
    """module name -> live scaling / configured scaling, for the layers where they differ."""
    ratios = {}
    for mname, layer in tuner_layers(model):
        scaling = getattr(layer, "scaling", None)
        if not isinstance(scaling, dict) or adapter not in scaling:
            continue
        if not hasattr(layer, "r") or adapter not in getattr(layer, "r", {}):
            continue
        live = scaling[adapter]
        if isinstance(live, torch.Tensor):
            live = float(live)
        conf = _configured_scaling(layer, adapter)
        if conf != 0 and not math.isclose(live, conf, rel_tol=1e-12, abs_tol=0.0):
            ratios[mname] = live / conf
    return ratios


def _engine_param_ids(engine) -> set:
    # An engine over copies/fragments of the parameters (DeepSpeed) names the model's own.
    return {id(p) for p in getattr(engine, "model_params", engine.params)}


def save_ema_adapter(model, engine, out_dir: str, adapter_name: str | None = None, *,
                     fold_scaling: bool = True, write: bool = True) -> str:
    """Write the EMA weights of ``adapter_name`` (default: the active adapter) as a PEFT adapter.

    ``out_dir`` gets ``adapter_config.json`` and ``adapter_model.safetensors`` directly
    (also for a non-default adapter name), so ``PeftModel.from_pretrained(base, out_dir)``
    loads it unchanged.  ``engine`` is a :class:`cl_core.DEMA` (or anything with
    ``.engine``, e.g. a :class:`cl_core.DEMACallback`) whose parameters include every
    trainable tensor of that adapter.  The live weights are not changed.
    The folder is written to a temporary sibling and renamed into place; several processes
    saving the same folder at once (every rank of a DDP run) each leave it complete.
    Under DeepSpeed the EMA is gathered first: every rank must call this; ``write=False``
    takes part in the gather without writing (the callback writes on the main rank only).
    """
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    engine = getattr(engine, "engine", engine)
    if engine is None:
        raise ValueError("save_ema_adapter: the callback has no engine yet (training has not begun)")
    model = unwrap_model(model)
    if not is_peft_model(model):
        raise ValueError(f"save_ema_adapter needs a PEFT model (with peft_config and LoRA layers); "
                         f"got {type(model).__name__}")
    if adapter_name is None:
        active = active_adapter_names(model)
        if len(active) != 1:
            raise ValueError(f"save_ema_adapter: the model has {len(active)} active adapters {active}; "
                             "pass adapter_name=")
        adapter_name = active[0]
    if adapter_name not in model.peft_config:
        raise ValueError(f"save_ema_adapter: adapter {adapter_name!r} not in the model "
                         f"(adapters: {sorted(model.peft_config)})")
    named = adapter_named_parameters(model, adapter_name, trainable_only=False)
    covered = _engine_param_ids(engine)
    missing = [n for n, p in named if id(p) not in covered and p.requires_grad]
    if not any(id(p) in covered for _, p in named):
        missing = [n for n, _ in named] or [f"<no tensors of {adapter_name!r}>"]
    if missing:
        raise ValueError(
            f"save_ema_adapter: the DEMA engine does not average {len(missing)} trainable tensor(s) of "
            f"adapter {adapter_name!r}, e.g. {missing[0]!r}; was it built for another adapter?")
    if any(is_dtensor(p) for p in engine.params):
        raise ValueError("save_ema_adapter: parameters are sharded (FSDP); gather a full state first")

    full = getattr(engine, "full_ema_tensors", None)
    if full is not None:
        # DeepSpeed: the engine averages fp32 fragments (partitions under ZeRO-1/2/3); gather
        # the EMA whole (collective: every rank calls this) and give PEFT the tensors by name.
        ema = full()
        by_name = {n: t.to(p.dtype) for n, p, t in zip(engine.names, engine.model_params, ema)}
        sd = get_peft_model_state_dict(model, state_dict=by_name, adapter_name=adapter_name)
        sd = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in sd.items()}
        if not write:
            return out_dir
    else:
        with engine.swap():
            sd = get_peft_model_state_dict(model, adapter_name=adapter_name)
            sd = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in sd.items()}

    if fold_scaling:
        ratios = _scaling_ratios(model, adapter_name)
        for mname, ratio in ratios.items():
            for b_attr in ("lora_B", "lora_embedding_B"):
                for key in (f"{mname}.{b_attr}.weight", f"{mname}.{b_attr}"):
                    if key in sd:
                        sd[key] = (sd[key].double() * ratio).to(sd[key].dtype)

    if not _is_peft_model_wrapper(model):
        # transformers-native adapters (model.add_adapter): PEFT's loader expects the keys of a
        # PeftModel; transformers' load_adapter strips this prefix again.
        sd = {k if k.startswith(PEFT_PREFIX) else PEFT_PREFIX + k: v for k, v in sd.items()}

    config = copy.deepcopy(model.peft_config[adapter_name])
    config.inference_mode = True

    out_dir = os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    try:
        save_file(sd, os.path.join(tmp, ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
        config.save_pretrained(tmp)
        _fsync_dir_files(tmp)
        moved = False
        if not os.path.isdir(out_dir):
            try:
                os.replace(tmp, out_dir)
                moved = True
            except OSError:
                # another process (a DDP rank saving the same EMA) created it meanwhile
                if not os.path.isdir(out_dir):
                    raise
        if not moved:
            # Replace only our two files, each atomically; keep anything else in the folder.
            for name in (ADAPTER_WEIGHTS_NAME, ADAPTER_CONFIG_NAME):
                os.replace(os.path.join(tmp, name), os.path.join(out_dir, name))
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _is_peft_model_wrapper(model) -> bool:
    try:
        from peft import PeftModel
    except Exception:
        return False
    return isinstance(model, PeftModel)


def _fsync_dir_files(folder: str) -> None:
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            with open(path, "rb") as f:
                os.fsync(f.fileno())


# --------------------------------------------------------------------------- checkpoint I/O


def atomic_save(obj, path: str) -> str:
    """``torch.save(obj, path)`` through a temporary file + fsync + ``os.replace``."""
    return str(torch_save_atomic(obj, path))


def load_state_file(path: str):
    """Load a file written by :func:`atomic_save` (tensors to CPU, ``weights_only``).

    A file that cannot be loaded raises ValueError saying which of these it is: empty, cut
    short (torch.save writes a zip archive; a truncated copy has its start but not the
    directory at its end, and torch then reports "[Errno 22] Invalid argument" or a miniz
    error), or not a torch.save file at all."""
    import zipfile

    if not os.path.isfile(path):
        raise FileNotFoundError(f"DEMA state file not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt / foreign file: say which one and what to do
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(4)
        fix = ("copy it again from where it was saved, or delete it to resume with the EMA restarted "
               "from the current weights")
        zip_start = b"PK\x03\x04".startswith(head) if len(head) < 4 else head == b"PK\x03\x04"
        if size == 0:
            why = f"is empty (0 bytes); {fix}"
        elif zip_start and not zipfile.is_zipfile(path):
            why = f"is truncated ({size} bytes, the end of the archive is missing: an interrupted copy or write); {fix}"
        elif not zip_start and not head.startswith(b"\x80"):  # neither zip nor legacy pickle format
            why = f"is not a torch.save file (it starts with {head!r}); point to the dema_state.pt that cl_core wrote"
        else:
            why = f"could not be read ({type(exc).__name__}: {exc})"
        raise ValueError(f"DEMA state file {path} {why}") from exc


def names_mismatch(saved, current, *, current_what: str, saved_what: str) -> str | None:
    """Why a saved DEMA state's tensor names differ from the current ones (None when equal):
    what is missing on each side, or that the order differs. Shared by the trainer callbacks."""
    saved, current = list(saved), list(current)
    if saved == current:
        return None
    lack = [n for n in current if n not in saved]
    extra = [n for n in saved if n not in current]
    detail = []
    if lack:
        detail.append(f"{len(lack)} {current_what} not in it, e.g. {lack[0]!r}")
    if extra:
        detail.append(f"{len(extra)} tensor(s) in it {saved_what}, e.g. {extra[0]!r}")
    if not detail:
        detail.append("the tensors are in a different order")
    return "; ".join(detail)
