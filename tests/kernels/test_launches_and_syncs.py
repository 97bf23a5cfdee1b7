"""GPU-path properties checked on CPU: launches per update do not grow with the tensor
count, and neither the torch nor the triton path synchronises with the host."""
from __future__ import annotations

import os

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
@pytest.mark.slow
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


@pytest.mark.slow
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
@pytest.mark.slow
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.slow
def test_triton_aligned_sweeps_equal_reference(dtype):
    """Every numel a multiple of 8 and every address 16-byte aligned: the ALIGNED stats
    and apply kernels (128-bit accesses when compiled) run, and equal the reference.
    Tolerances: EMA rtol 1e-5 (fp32 sums in another order); α rtol 2e-3 (see test_fused.py)."""
    def run(backend):
        gen = torch.Generator().manual_seed(7)
        params = [torch.randn(s, generator=gen).to(dtype) for s in [(3, 344), (1032,), (2, 4), (8,)]]
        engine = DEMA(params, DEMAConfig(backend=backend, formula="paper"))
        for t in range(4):
            for i, p in enumerate(params):
                p.add_((torch.randn(p.shape, generator=gen) * 0.1).to(dtype))
                p.grad = None if (t == 2 and i == 1) else torch.randn(p.shape, generator=gen).to(dtype)
            if t == 1:
                params[0].grad[0, 0] = float("nan")
            engine.update()
        return engine

    fast, ref = run("triton"), run("reference")
    assert fast.groups[0].backend._aligned
    for a, b in zip(fast.ema_tensors(), ref.ema_tensors()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast.stats.alpha, ref.stats.alpha, rtol=2e-3, atol=1e-6)
    assert fast.stats.nonfinite_skips.tolist() == ref.stats.nonfinite_skips.tolist() == [1, 0, 0, 0]


# ---------------------------------------------------------------------- CUDA (make gpu-check)
def _compiled_cuda() -> bool:
    return torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")


cuda = pytest.mark.skipif(not _compiled_cuda(), reason="needs a CUDA GPU and compiled kernels: run `make gpu-check`")


# LoRA-like shapes (every numel a multiple of 8: the ALIGNED kernels) and odd ones (the general path)
CUDA_ALIGNED = [(8, 4096), (4096, 8), (8, 11008), (16,)]
CUDA_GENERAL = [(3, 5), (1030,), (7, 33), (1,)]


def _cuda_run(backend, formula, dtype, shapes, steps=6):
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen).to("cuda", dtype) for s in shapes]
    engine = DEMA(params, DEMAConfig(backend=backend, formula=formula))
    for t in range(steps):
        for i, p in enumerate(params):
            p.add_((torch.randn(p.shape, generator=gen) * 0.1).to("cuda", dtype))
            p.grad = None if (t == 3 and i == 1) else torch.randn(p.shape, generator=gen).to("cuda", dtype)
        if t == 2:
            params[0].grad[0, 0] = float("nan")
        engine.update()
    return engine


@cuda
@pytest.mark.parametrize("shapes", [CUDA_ALIGNED, CUDA_GENERAL], ids=["aligned", "general"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("formula", ["official", "paper", "fixed"])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_cuda_backend_equals_reference(backend, formula, dtype, shapes):
    """Every backend against the reference on CUDA tensors. Tolerances: EMA rtol 1e-5
    (fp32 sums in another order), α rtol 2e-3 (conditioning of a/c, see test_fused.py)."""
    fast, ref = _cuda_run(backend, formula, dtype, shapes), _cuda_run("reference", formula, dtype, shapes)
    for a, b in zip(fast.ema_tensors(), ref.ema_tensors()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast.stats.alpha, ref.stats.alpha, rtol=2e-3, atol=1e-6)
    assert fast.stats.nonfinite_skips.tolist() == ref.stats.nonfinite_skips.tolist()


@cuda
def test_cuda_launches_do_not_grow_with_tensor_count(cuda_launches):
    from cl_core import DEMAOptimizer

    for n in (2, 64):
        params = [torch.randn(8, 64 + 8 * (i % 3), device="cuda") for i in range(n)]
        engine = DEMA(params, DEMAConfig(backend="triton"))
        for p in params:
            p.grad = torch.randn_like(p)
        engine.update()
        before = cuda_launches["n"]
        engine.update()
        assert cuda_launches["n"] - before == 3  # stats, decide, apply
        leaves = [torch.nn.Parameter(p.clone()) for p in params]
        opt = DEMAOptimizer(torch.optim.AdamW(leaves, lr=1e-3), DEMAConfig(backend="triton"), fused=True)
        for _ in range(2):
            for p in leaves:
                p.grad = torch.randn_like(p)
            before = cuda_launches["n"]
            opt.step()
            assert cuda_launches["n"] - before == 1  # one fused launch per step


@cuda
@pytest.mark.parametrize("formula", ["official", "paper", "fixed"])
def test_cuda_hot_path_makes_no_host_sync(formula):
    """torch.cuda.set_sync_debug_mode("error") around the hot path: any device-to-host
    synchronisation (.item(), float(), a blocking copy) raises."""
    from cl_core import DEMAOptimizer

    params = [torch.randn(s, device="cuda") for s in CUDA_ALIGNED + CUDA_GENERAL]
    engine = DEMA(params, DEMAConfig(backend="triton", formula=formula))
    leaves = [torch.nn.Parameter(p.clone()) for p in params]
    opt = DEMAOptimizer(torch.optim.AdamW(leaves, lr=1e-3), DEMAConfig(backend="triton", formula=formula), fused=True)
    for p, q in zip(params, leaves):
        p.grad = torch.randn_like(p)
        q.grad = torch.randn_like(q)
    engine.update()  # first calls compile kernels and build tables (syncs allowed there)
    opt.step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            for p, q in zip(params, leaves):
                p.grad = torch.randn_like(p)
                q.grad = torch.randn_like(q)
            engine.update()
            opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(torch.cat([e.reshape(-1) for e in opt.engine.ema_tensors()])).all()
