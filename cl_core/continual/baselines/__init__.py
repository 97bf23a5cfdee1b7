"""The paper's baselines as runner hooks (issue 32): replay, EWC, LwF, O-LoRA. Each method of
the table (cl_core.continual.methods) that names a module here in ``hooks`` gets one
:class:`Baseline` per chain; the runner calls it around each task and the Trainer adds its
``loss`` to every step (cl_core.continual.training.train's ``hook``).

    hook = baselines.for_method(cfg, "ewc", seed)      # None for a method without hooks
    examples = hook.examples(j, examples)              # before task j (replay mixes its buffer in)
    hook.begin_task(model, j)                          # after the task's set is active
    train(..., hook=hook)                              # loss + hook.loss(model, inputs, outputs)
    hook.end_task(model, j, examples, encode)          # after training (EWC's Fisher, the buffer)
    hook.save(folder) / hook.load(folder)              # with the task's adapters (resume)
"""
from __future__ import annotations

import importlib
from typing import Optional


class Baseline:
    """A method's own data, loss term and state across tasks. The defaults do nothing."""

    ordered = False     # train() reads the examples in the given order (replay's per-batch mixture)

    def __init__(self, cfg, seed: int):
        self.cfg = cfg
        self.seed = seed

    def decision(self, j: int):
        """Task ``j``'s set (a grouping.Decision), or None for the runner's own choice."""
        return None

    def examples(self, j: int, examples: list) -> list:
        return examples

    def begin_task(self, model, j: int) -> None:
        pass

    def loss(self, model, inputs, outputs):
        return None

    def end_task(self, model, j: int, examples: list, encode) -> None:
        pass

    def save(self, folder) -> None:
        pass

    def load(self, folder) -> None:
        pass


def trainable(model) -> dict:
    """name -> parameter of every trainable tensor (the active LoRA set: what these methods
    regularise), in the model's order."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def answer_mask(labels):
    """The positions whose next token is an answer token (labels != -100 shifted by one): the
    logits there predict the answer, as the model's own loss reads them."""
    return labels[:, 1:] != -100


def for_method(cfg, name: str, seed: int) -> Optional[Baseline]:
    """The hook of method ``name`` for one chain (None when the method has none)."""
    from cl_core.continual.methods import method

    module = method(name).hooks
    if module is None:
        return None
    return importlib.import_module(module).Hook(cfg, seed)
