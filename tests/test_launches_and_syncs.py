"""GPU-path properties checked on CPU: launches per update do not grow with the tensor
count, and neither the torch nor the triton path synchronises with the host."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import cl_core.kernels.native
from cl_core import DEMA, DEMAConfig

SYNC_OPS = {
    torch.ops.aten._local_scalar_dense.default,
    torch.ops.aten.item.default,
    torch.ops.aten.is_nonzero.default,
}


class CountSyncs(TorchDispatchMode):
    """Counts the aten ops that read a device value on the host (.item(), float(), bool())."""

    def __init__(self):
        super().__init__()
        self.syncs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in SYNC_OPS:
            self.syncs.append(str(func))
        return func(*args, **(kwargs or {}))


def _engine(n_tensors, backend, formula="official", hook=None):
    gen = torch.Generator().manual_seed(n_tensors)
    params = [torch.randn(3 + i % 5, 7, generator=gen) for i in range(n_tensors)]
    engine = DEMA(params, DEMAConfig(backend=backend, formula=formula), reduce_stats=hook)
    return engine, params


def _step(params, gen):
    for p in params:
        p.data.add_(torch.randn(p.shape, generator=gen) * 0.1)
        p.grad = torch.randn(p.shape, generator=gen)


@pytest.mark.parametrize("formula", ["official", "paper", "fixed"])
def test_triton_launches_do_not_grow_with_tensor_count(launches, formula):
    per_update = {}
    for n in (2, 64):
        engine, params = _engine(n, "triton", formula)
        gen = torch.Generator().manual_seed(0)
        counts = []
        for _ in range(3):
            _step(params, gen)
            before = launches["n"]
            engine.update()
            counts.append(launches["n"] - before)
        per_update[n] = counts
    assert per_update[2] == per_update[64] == [3, 3, 3]


def test_triton_launches_with_reduce_hook(launches):
    calls = []
    for n in (2, 64):
        engine, params = _engine(n, "triton", hook=lambda stats: calls.append(stats.shape))
        _step(params, torch.Generator().manual_seed(0))
        before = launches["n"]
        engine.update()
        assert launches["n"] - before == 4  # stats, reduce, decide, apply
    assert calls == [(2, 5), (64, 5)]  # one reduction per update, whatever the count


@pytest.mark.parametrize("backend", ["torch", "torch-pure", "triton"])
@pytest.mark.parametrize("formula", ["official", "paper", "fixed"])
def test_update_makes_no_host_sync(backend, formula, monkeypatch):
    if backend == "torch-pure":
        monkeypatch.setattr(cl_core.kernels.native, "function_for", lambda dtype: None)
        backend = "torch"
    engine, params = _engine(16, backend, formula)
    gen = torch.Generator().manual_seed(0)
    params[3].grad = None
    _step(params[:3], gen)
    with CountSyncs() as mode:
        engine.update()  # the first update allocates the state: checked too
        for t in range(3):
            _step(params, gen)
            if t == 1:
                params[5].grad = None
                params[6].grad[0, 0] = float("nan")
            engine.update()
    assert mode.syncs == []


def test_the_sync_counter_can_fail():
    with CountSyncs() as mode:
        float(torch.ones(1).sum())
        engine, params = _engine(2, "reference")
        _step(params, torch.Generator().manual_seed(0))
        engine.update()
        _step(params, torch.Generator().manual_seed(1))
        engine.update()
    assert len(mode.syncs) > 2  # the reference backend does sync (float(α)), by design
