"""LoRA sets as PEFT adapters, driven by instruction-grouping decisions (LCIA, docs/design.md §4).

API
---
    from cl_core.lora_sets import LoRASets, adapter_name

    sets = LoRASets(model, lora_config)          # model: a transformers model or a PeftModel
    name, dema_on = sets.prepare_task(decision)  # decision: cl_core.grouping.Decision (or any
                                                 #   object with .group and .reused)
        reused=True   -> activates the existing adapter "group_<g>" (it keeps its weights and
                         is trained further), dema_on=True
        reused=False  -> adds a fresh adapter "group_<g>" from lora_config and activates it,
                         dema_on=False (nothing to protect yet, the official rule)
      Only the active adapter is trainable afterwards (PEFT's set_adapter).
    sets.model                                   # the peft.PeftModel (train it as usual)
    sets.trainable_parameters() -> [(name, p)]   # what to give the optimizer / cl_core.DEMA
    sets.groups -> list[int]                     # groups that have an adapter
    sets.forward_routed(input_ids, groups, attention_mask=None, **kw)   # mixed batch, row i on
    sets.generate_routed(input_ids, groups, attention_mask=None, **kw)  #   adapter of groups[i]
    sets.save(directory)                         # one sub-folder per adapter: directory/group_0/
    LoRASets.from_pretrained(base_model, directory, is_trainable=False) -> LoRASets

Mixed batches use PEFT's per-row ``adapter_names=`` and work only on a ``peft.PeftModel`` in
eval mode: the routed calls switch the model to eval for the call and restore its mode, and
run under ``torch.no_grad()``. A group of None or -1 runs that row on the base model.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Protocol, Sequence

__all__ = ["ADAPTER_PREFIX", "BASE", "AdapterSets", "LoRASets", "adapter_name"]

ADAPTER_PREFIX = "group_"
BASE = "__base__"  # PEFT's name for "no adapter" in adapter_names
_NAME = re.compile(r"^group_(\d+)$")


def adapter_name(group: int) -> str:
    """The PEFT adapter name of a group (not one letter: PEFT warns about prefix clashes)."""
    if isinstance(group, bool) or not isinstance(group, int) or group < 0:
        raise ValueError(f"group={group!r} must be an int >= 0")
    return f"{ADAPTER_PREFIX}{group}"


class AdapterSets(Protocol):
    """What the continual runner drives, task after task: the PEFT LoRA sets here, or one
    MoELoRA set (cl_core.continual.adapters.MoELoRASet). Both declare it."""

    model: object      # the model to train and evaluate (the adapters inside)

    def prepare_task(self, decision) -> tuple:
        """Add or activate the set of ``decision`` (``.group``, ``.reused``); returns
        (adapter name, whether the set existed)."""
        ...

    def save(self, directory) -> None:
        """Write every set under ``directory`` (``from_pretrained`` reads it back)."""
        ...

    @classmethod
    def from_pretrained(cls, base_model, directory, is_trainable: bool = False, **kwargs) -> "AdapterSets":
        """The sets saved in ``directory``, on ``base_model``."""
        ...


class LoRASets(AdapterSets):
    def __init__(self, model, lora_config=None):
        from peft import PeftModel

        self.lora_config = lora_config
        if isinstance(model, PeftModel):
            self.model = model
        else:
            self.model = None
            self._base = model
        if self.model is None and lora_config is None:
            raise ValueError("LoRASets needs a lora_config to add adapters to a plain model")

    # ------------------------------------------------------------------ state
    @property
    def groups(self) -> list:
        if self.model is None:
            return []
        found = (_NAME.match(n) for n in self.model.peft_config)
        return sorted(int(m.group(1)) for m in found if m)

    @property
    def active_group(self):
        if self.model is None:
            return None
        m = _NAME.match(self.model.active_adapter)
        return int(m.group(1)) if m else None

    def trainable_parameters(self) -> list:
        if self.model is None:
            return []
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    # ------------------------------------------------------------- decisions
    def prepare_task(self, decision):
        """Activate (reused) or add (new) the group's adapter; returns (adapter_name, dema_on)."""
        group, reused = decision.group, bool(decision.reused)
        name = adapter_name(group)
        have = self.groups
        if reused:
            if group not in have:
                raise ValueError(
                    f"the decision reuses group {group}, but the model has no adapter {name!r} "
                    f"(adapters: {[adapter_name(g) for g in have]})"
                )
            self.model.set_adapter(name)
            return name, True
        if group in have:
            raise ValueError(f"the decision opens group {group}, but adapter {name!r} already exists")
        if self.lora_config is None:
            raise ValueError(f"cannot add adapter {name!r}: LoRASets was created without a lora_config")
        if self.model is None:
            from peft import get_peft_model

            self.model = get_peft_model(self._base, self.lora_config, adapter_name=name)
            self._base = None
        else:
            self.model.add_adapter(name, self.lora_config)
        self.model.set_adapter(name)
        return name, False

    # --------------------------------------------------------------- routing
    def _names(self, groups: Sequence, batch: int) -> list:
        if self.model is None:
            raise ValueError("no LoRA set yet: call prepare_task first")
        groups = list(groups)
        if len(groups) != batch:
            raise ValueError(f"groups has {len(groups)} entries for a batch of {batch} rows")
        have = set(self.groups)
        names = []
        for i, g in enumerate(groups):
            if hasattr(g, "item"):  # numpy / torch scalars
                g = g.item()
            if g is None or g == -1:
                names.append(BASE)
                continue
            if isinstance(g, bool) or g not in have:
                raise ValueError(f"groups[{i}]={g!r}: no adapter for that group (have {sorted(have)})")
            names.append(adapter_name(int(g)))
        return names

    def _routed(self, method: str, input_ids, groups, attention_mask, kwargs):
        import torch

        names = self._names(groups, input_ids.shape[0])
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                fn = getattr(self.model, method)
                if attention_mask is not None:
                    kwargs = dict(kwargs, attention_mask=attention_mask)
                return fn(input_ids=input_ids, adapter_names=names, **kwargs)
        finally:
            if was_training:
                self.model.train()

    def forward_routed(self, input_ids, groups, attention_mask=None, **kwargs):
        """Forward a mixed batch: row i uses the adapter of groups[i]."""
        return self._routed("forward", input_ids, groups, attention_mask, kwargs)

    def generate_routed(self, input_ids, groups, attention_mask=None, **gen_kwargs):
        """generate() for a mixed batch: row i uses the adapter of groups[i]."""
        return self._routed("generate", input_ids, groups, attention_mask, gen_kwargs)

    # ----------------------------------------------------------- persistence
    def save(self, directory) -> None:
        if self.model is None:
            raise ValueError("no LoRA set to save yet")
        self.model.save_pretrained(str(directory))

    @classmethod
    def from_pretrained(cls, base_model, directory, is_trainable: bool = False, lora_config=None) -> "LoRASets":
        """Load every ``group_<g>`` adapter saved under ``directory`` onto ``base_model``."""
        from peft import PeftModel

        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"LoRA sets folder {directory}: not found")
        found = sorted(
            (int(m.group(1)), p)
            for p in directory.iterdir()
            if (m := _NAME.match(p.name)) and (p / "adapter_config.json").is_file()
        )
        if not found:
            raise ValueError(f"LoRA sets folder {directory}: no group_<n>/adapter_config.json inside")
        (g0, p0), rest = found[0], found[1:]
        model = PeftModel.from_pretrained(base_model, str(p0), adapter_name=adapter_name(g0), is_trainable=is_trainable)
        for g, p in rest:
            model.load_adapter(str(p), adapter_name=adapter_name(g), is_trainable=is_trainable)
        return cls(model, lora_config)
