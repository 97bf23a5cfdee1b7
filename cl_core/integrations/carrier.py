"""The Hugging Face callback's DEMA state, carried inside the Trainer's optimizer state dict.

A state-dict hook on the torch optimizer that holds the averaged tensors puts the callback's
state into the first parameter group of the optimizer's state dict, under ``"cl_core.dema"``:
the one place of an optimizer state dict that ``torch.optim.Optimizer.load_state_dict`` keeps
(it restores the saved groups' entries, as it restores their ``lr``). The Trainer writes that
state into ``optimizer.pt`` (DeepSpeed: into each rank's optimizer file) and loads it back
before ``on_train_begin``, where :meth:`OptimizerCarrier.take` takes it out of the group again.
FSDP saves optimizer states in its own format, so nothing is carried there (per-rank files).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from cl_core.dema.optim import CARRIED_KEY as CARRY_KEY     # the first param group's entry carrying the state
from cl_core.dema.optim import DEMA_STATE_KEY

__all__ = ["CARRY_KEY", "OptimizerCarrier"]


class OptimizerCarrier:
    """Carries ``state()`` (the callback's state dict, None before training) in the state dict
    of one torch optimizer; ``optimizer`` is that optimizer, None where nothing is carried."""

    def __init__(self, state: Callable[[], Optional[dict]]):
        self._state = state
        self.optimizer = None
        self._user_optimizer = None
        self._hook = None

    def attach(self, optimizer, *, ds_inner=None, sharded: bool = False, user_optimizer=None) -> None:
        """Hook the torch optimizer that holds the averaged tensors, so its state dict (which
        the Trainer saves and restores) carries the DEMA state: DeepSpeed's inner optimizer
        (``ds_inner``), else the one inside accelerate's wrapper (a DEMAOptimizer when one runs);
        none for FSDP shards (``sharded``). ``user_optimizer``: the user's own DEMAOptimizer."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if ds_inner is not None:
            carrier = ds_inner
        elif sharded:
            carrier = None           # FSDP writes optimizer states in its own format: per-rank files
        else:
            carrier = getattr(optimizer, "optimizer", optimizer)
        if not isinstance(carrier, torch.optim.Optimizer) or not carrier.param_groups:
            carrier = None
        self.optimizer = carrier
        self._user_optimizer = user_optimizer
        if carrier is not None:
            self._hook = carrier.register_state_dict_post_hook(self._carry)

    def take(self) -> Optional[dict]:
        """The carried state the Trainer restored into the optimizer (taken out of it), or None."""
        if self.optimizer is None:
            return None
        carried = self.optimizer.param_groups[0].pop(CARRY_KEY, None)
        if carried is None and self.optimizer is self._user_optimizer:
            # a DEMAOptimizer sets the entry aside when it loads (DEMAOptimizer.load_state_dict)
            carried, self.optimizer.carried_state = self.optimizer.carried_state, None
        return carried

    def _carry(self, optimizer, sd: dict) -> dict:
        """State-dict post hook: the callback's state into the first param group's entries."""
        state = self._state()
        if state is None or not sd.get("param_groups"):
            return sd
        sd = dict(sd)
        if optimizer is not self._user_optimizer:
            # the one-pass wrapper the callback installed: its own "dema" entry is the same engine
            # state (a user's DEMAOptimizer keeps its entry, so it still loads without the callback)
            sd.pop(DEMA_STATE_KEY, None)
        groups = list(sd["param_groups"])
        groups[0] = {**groups[0], CARRY_KEY: state}
        sd["param_groups"] = groups
        return sd
