"""The runner's MoELoRA adapter set: CoIN's MoELoRA layer (cl_core.moelora) driven through the
AdapterSets protocol (cl_core.lora_sets), as the runner drives its PEFT LoRA sets."""
from __future__ import annotations

from typing import Optional

from cl_core.lora_sets import AdapterSets
from cl_core.moelora import ADAPTER_NAME, MoELoRAConfig, apply_moelora, load_moelora, save_moelora


class MoELoRASet(AdapterSets):
    """One MoELoRA adapter trained task after task, driven as ``cl_core.lora_sets.LoRASets``
    (the AdapterSets protocol), so the runner trains it as it trains a LoRA set. MoELoRA has no grouping: every task trains the one set (group 0)."""

    def __init__(self, model, config: Optional[MoELoRAConfig] = None):
        self.config = config
        self.model = model
        self._applied = getattr(model, "_cl_core_moelora", None) is not None
        if not self._applied and config is None:
            raise ValueError("MoELoRASet needs a MoELoRAConfig to add the adapter to a plain model")

    def prepare_task(self, decision):
        """Add the adapter on the first task, keep training it afterwards; returns
        (adapter name, whether the set existed)."""
        if decision.group != 0:
            raise ValueError(f"MoELoRA trains one adapter set; the decision names group {decision.group}")
        if bool(decision.reused) != self._applied:
            raise ValueError("the decision re-trains the MoELoRA set, but the model has none yet" if decision.reused
                             else "the decision opens the MoELoRA set, but the model already has it")
        if not self._applied:
            apply_moelora(self.model, self.config)
            self._applied = True
        return ADAPTER_NAME, bool(decision.reused)

    def save(self, directory) -> None:
        save_moelora(self.model, directory)

    @classmethod
    def from_pretrained(cls, base_model, directory, is_trainable: bool = False) -> "MoELoRASet":
        model = load_moelora(base_model, directory, trainable=is_trainable)
        return cls(model, model._cl_core_moelora[0])
