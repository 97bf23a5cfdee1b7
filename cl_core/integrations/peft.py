"""The EMA of a PEFT adapter, written as a standard PEFT adapter folder.

:func:`save_ema_adapter` writes the EMA weights as ``adapter_config.json`` +
``adapter_model.safetensors``, a folder that ``peft.PeftModel.from_pretrained`` (and
transformers' ``load_adapter``) loads unchanged. Where a layer's live LoRA scaling was changed
at run time (``set_scale`` / ``scale_layer``), the ratio to the configured scaling is folded
into ``lora_B`` so that the loaded adapter computes what the live model computes.

Needs peft and safetensors (``pip install ".[hf]"``); which tensors the callbacks average
is :mod:`cl_core.integrations.selection` (torch only).
"""
from __future__ import annotations

import copy
import math
import os
import shutil
import tempfile

import torch

from cl_core.atomic_io import usual_dir_mode

from cl_core.dema.distributed import is_dtensor
from cl_core.integrations.extras import missing_extra

try:
    import peft  # noqa: F401  (the export writes PEFT's adapter format)
except ImportError as exc:  # an optional extra
    raise missing_extra("cl_core.integrations.peft (the EMA adapter export)", "hf", "peft", exc) from exc
try:
    import safetensors.torch  # noqa: F401
except ImportError as exc:
    raise missing_extra("cl_core.integrations.peft (the EMA adapter export)", "hf", "safetensors", exc) from exc

from cl_core.integrations.selection import (active_adapter_names, adapter_named_parameters,  # noqa: E402
                                            is_peft_model, tuner_layers, unwrap_model)

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


# --------------------------------------------------------------------------- export


def _configured_scaling(layer, adapter: str, config=None) -> float:
    """The scaling PEFT gives ``layer`` from its configuration: alpha / r, or alpha / sqrt(r) with
    rsLoRA. Layers of peft < 0.18 do not keep ``use_rslora``; the adapter's config (``config``,
    the model's ``peft_config[adapter]``) then says it, never a silent alpha / r."""
    r = layer.r[adapter]
    alpha = layer.lora_alpha[adapter]
    flags = getattr(layer, "use_rslora", None)
    if isinstance(flags, dict) and adapter in flags:
        rslora = bool(flags[adapter])
    else:
        rslora = bool(getattr(config, "use_rslora", False))
    if rslora:
        return alpha / math.sqrt(r)
    return alpha / r


def _scaling_ratios(model, adapter: str) -> dict[str, float]:
    """module name -> live scaling / configured scaling, for the layers where they differ."""
    ratios = {}
    config = getattr(model, "peft_config", {}).get(adapter)
    for mname, layer in tuner_layers(model):
        scaling = getattr(layer, "scaling", None)
        if not isinstance(scaling, dict) or adapter not in scaling:
            continue
        if not hasattr(layer, "r") or adapter not in getattr(layer, "r", {}):
            continue
        live = scaling[adapter]
        if isinstance(live, torch.Tensor):
            live = float(live)
        conf = _configured_scaling(layer, adapter, config)
        if conf != 0 and not math.isclose(live, conf, rel_tol=1e-12, abs_tol=0.0):
            ratios[mname] = live / conf
    return ratios


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
    covered = {id(p) for p in engine.model_params}  # (DeepSpeed: the model's own, not the fragments)
    missing = [n for n, p in named if id(p) not in covered and p.requires_grad]
    if not any(id(p) in covered for _, p in named):
        missing = [n for n, _ in named] or [f"<no tensors of {adapter_name!r}>"]
    if missing:
        raise ValueError(
            f"save_ema_adapter: the DEMA engine does not average {len(missing)} trainable tensor(s) of "
            f"adapter {adapter_name!r}, e.g. {missing[0]!r}; was it built for another adapter?")
    if any(is_dtensor(p) for p in engine.params):
        raise ValueError("save_ema_adapter: parameters are sharded (FSDP); gather a full state first")

    # The EMA whole, flushed, one tensor per averaged parameter (under DeepSpeed a gather:
    # collective, every rank calls this), handed to PEFT by the model's names in the
    # parameter dtype; the model's other tensors (PEFT may save more than the averaged ones)
    # as they are. The live weights are not touched.
    ema = engine.export_ema()
    by_id = {id(p): t.to(p.dtype) for p, t in zip(engine.model_params, ema)}
    state = model.state_dict()
    named_all = dict(model.named_parameters(remove_duplicate=False))
    for n, p in named_all.items():
        if id(p) in by_id:
            state[n] = by_id[id(p)]
    sd = get_peft_model_state_dict(model, state_dict=state, adapter_name=adapter_name)
    sd = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in sd.items()}
    if not write:
        return out_dir

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
        usual_dir_mode(tmp)   # was 0700 (ema_adapter private beside its 0755 siblings)
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
