"""FSDP at the trainer level: the helpers that need the model (or its wrapper), above the engine.

FSDP2 (``fully_shard``) parameters are DTensors that carry their shard group, so the engine
finds it alone (``cl_core.dema.distributed.auto_reduce_stats(params)``). FSDP1
(``FullyShardedDataParallel(..., use_orig_params=True)``) hands out plain views into each
rank's slice of a flat parameter: only the wrapper knows the process group, so a trainer
integration (or a user building a ``cl_core.DEMA`` over FSDP1 parameters) asks here:

    engine = cl_core.DEMA(params, reduce_stats=cl_core.integrations.fsdp.auto_reduce_stats(params, model))

Needs torch only.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch

from cl_core.dema import distributed as cl_dist


def fsdp1_shard_group(model):
    """The ``process_group`` of the FSDP1 wrapper(s) in ``model``, or None if not FSDP1."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    except Exception:
        return None
    if model is None:
        return None
    groups = []
    for m in model.modules():
        if isinstance(m, FSDP):
            g = m.process_group
            if all(g is not h for h in groups):
                groups.append(g)
    if not groups:
        return None
    if len(groups) > 1:
        raise ValueError(f"cl_core.integrations.fsdp: the FSDP modules of {type(model).__name__} use "
                         f"{len(groups)} different process groups; DEMA sums its statistics over one shard "
                         "group: wrap the model with one process group")
    return groups[0]


def auto_reduce_stats(params: Iterable[torch.Tensor], model=None) -> Callable | None:
    """The ``reduce_stats`` for a :class:`cl_core.DEMA` over ``params``: a
    :class:`cl_core.dema.distributed.StatsReducer` when they are sharded (FSDP2 DTensors, or
    parameters of an FSDP1 ``model``) under an initialised process group of size > 1, else
    ``None`` (single process, DDP: nothing to reduce)."""
    if not cl_dist.dist_ready() or cl_dist.world_size() == 1:
        return None
    params = list(params)
    group = None
    if cl_dist.dtensor_shard_group(params) is None:
        group = fsdp1_shard_group(model)
    return cl_dist.auto_reduce_stats(params, group=group)


def is_sharded(params: Iterable[torch.Tensor], model=None) -> bool:
    """True when ``params`` are slices of larger tensors held across ranks."""
    if not cl_dist.dist_ready() or cl_dist.world_size() == 1:
        return False
    params = list(params)
    return cl_dist.dtensor_shard_group(params) is not None or fsdp1_shard_group(model) is not None
