"""DEMA under ``torch.distributed``: what the engine itself needs (the process-group helpers,
DTensor checks, the statistics reducer, shard groups read from the parameters). Trainer-level
helpers that take a model live above the engine: cl_core.integrations.fsdp (FSDP1 wrappers)
and cl_core.integrations.deepspeed.

Data parallel (DDP, the Trainer under ``torchrun``): every rank holds the full, equal
parameters and, after the gradient all-reduce, equal gradients, so every rank computes
the same EMA with no communication at all.  Nothing to do here.

Sharded parameters (FSDP): each rank holds a slice of every tensor, so the per-tensor
L1 sums a, b, c, d that decide α are partial.  The engine hands its per-tensor local
sums to ``reduce_stats`` as one ``[T, 5]`` float32 tensor per (device, dtype) group;
:class:`StatsReducer` sums it across the shard group with **one** ``all_reduce`` per
call — one per step for the usual single-dtype LoRA — so α equals the unsharded α.

* FSDP2 (``fully_shard``): parameters and gradients are ``DTensor``s; the engine works
  on ``to_local()``; the shard group is the mesh dimension with a ``Shard`` placement.
* FSDP1 (``FullyShardedDataParallel(..., use_orig_params=True)``): the original
  parameters are flat views into this rank's slice of the flat parameter (possibly
  empty); the shard group is the wrapper's ``process_group``, which only the model knows
  (``cl_core.integrations.fsdp``).
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch


def _dist():
    import torch.distributed as dist

    return dist


def dist_ready() -> bool:
    dist = _dist()
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return _dist().get_world_size() if dist_ready() else 1


def rank() -> int:
    return _dist().get_rank() if dist_ready() else 0


def _dtensor_cls():
    try:
        from torch.distributed.tensor import DTensor
    except Exception:
        return None
    return DTensor


def is_dtensor(t) -> bool:
    cls = _dtensor_cls()
    return cls is not None and isinstance(t, cls)


def _shard_dims(t) -> list[int]:
    return [i for i, pl in enumerate(t.placements) if pl.is_shard()]


def dtensor_shard_group(params: Iterable[torch.Tensor]):
    """The process group the DTensor parameters are sharded over, or None if none is sharded.

    All sharded parameters must be sharded over the same single mesh dimension (FSDP2,
    and the shard dimension of HSDP); otherwise a ValueError says so.
    """
    group, where = None, None
    for i, p in enumerate(params):
        if not is_dtensor(p):
            continue
        dims = _shard_dims(p)
        if not dims:
            continue
        if len(dims) != 1:
            raise ValueError(f"DEMA: parameter {i} is sharded over {len(dims)} mesh dimensions "
                             f"({p.placements}); only one shard dimension (FSDP2/HSDP) is supported")
        mesh = p.device_mesh
        g = mesh.get_group(dims[0]) if mesh.ndim > 1 else mesh.get_group()
        if group is None:
            group, where = g, i
        elif g is not group:
            raise ValueError(f"DEMA: parameters {where} and {i} are sharded over different process "
                             "groups; build one engine per group")
    return group


class StatsReducer:
    """``reduce_stats`` for :class:`cl_core.DEMA`: sums the local per-tensor statistics of
    sharded parameters across the shard group, one ``all_reduce`` per call, in place.

    ``calls`` counts the all-reduces issued (the tests check it is one per step).
    """

    def __init__(self, group=None):
        self.group = group
        self.calls = 0

    def __call__(self, stats: torch.Tensor) -> None:
        dist = _dist()
        self.calls += 1
        # Issued on every rank even for an empty tensor, so the collectives stay matched.
        dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=self.group)

    def __repr__(self):
        return f"StatsReducer(group={self.group!r}, calls={self.calls})"


def auto_reduce_stats(params: Iterable[torch.Tensor], group=None) -> Callable | None:
    """The ``reduce_stats`` the engine needs for ``params``: a :class:`StatsReducer` over the
    shard group when they are FSDP2 DTensor shards (or over ``group``, the shard group a caller
    found for parameters that do not carry it, as FSDP1's flat views) under an initialised
    process group of size > 1, else ``None`` (single process, DDP: nothing to reduce).
    FSDP1 models: :func:`cl_core.integrations.fsdp.auto_reduce_stats` finds the group."""
    if not dist_ready() or world_size() == 1:
        return None
    found = dtensor_shard_group(list(params))
    group = found if found is not None else group
    if group is None or _dist().get_world_size(group) == 1:
        return None
    return StatsReducer(group)


def full_tensor(local: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Gather a local shard shaped like ``like``'s local shard into the full tensor
    (DTensor ``like``); returns ``local`` unchanged for a plain tensor."""
    if not is_dtensor(like):
        return local
    from torch.distributed.tensor import DTensor

    d = DTensor.from_local(local.to(like.to_local().device), like.device_mesh, like.placements,
                           shape=like.shape, stride=like.stride(), run_check=False)
    return d.full_tensor()


# The refusal of a DEMAOptimizer handed to DeepSpeed: the engine raises it (DEMAOptimizer sees
# its parameter lists replaced) as well as the DeepSpeed integration (it finds one inside
# DeepSpeed's optimizer), so it lives here, below both.
DEMA_OPTIMIZER_UNDER_DEEPSPEED = (
    "DEMAOptimizer does not run under DeepSpeed: DeepSpeed steps its inner optimizer over its own flat fp32 "
    "partitions, not over the parameters the DEMAOptimizer was built for. Pass the plain torch optimizer "
    "(or none: the Trainer builds AdamW) and add the callback: Trainer(..., callbacks=[cl_core.DEMACallback()])")
