"""Host time of one fused optimizer + DEMA step on the Triton path, kernels aside.

Every Triton launch is replaced by a no-op, so what is timed is the Python/C++ work of
`DEMAOptimizer.step()` on the triton path: reading the gradients, the per-step checks
(dtype, device, contiguity, storage), one hyper-parameter row per param group, the
step counters, the one host-to-device copy of the per-step table. The baseline is
torch's whole `AdamW(fused=True).step()` on the same tensors. Both see gradients
re-created before every step (as after `zero_grad(set_to_none=True)`; not timed).

Tensors are small (LoRA A/B-like 8 x 16 and 16 x 8) so that the baseline is mostly
torch's own host work too: on CPU its arithmetic is the only part not host overhead,
and on CUDA (`--device cuda`) its kernels run asynchronously. Target: ratio ≤ 1 at 448
and at 4,480 tensors (the host work must not grow faster per tensor than torch's).
"""
from __future__ import annotations

import pytest
import torch

from cl_core import DEMAConfig, DEMAOptimizer

COUNTS = (448, 4480)


@pytest.fixture
def no_launches(monkeypatch):
    """Every Triton launch (compiled or interpreted) becomes a no-op."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    monkeypatch.setattr(JITFunction, "run", lambda self, *a, **k: None)
    monkeypatch.setattr(InterpretedFunction, "run", lambda self, *a, **k: None)


def _params(count, device):
    gen = torch.Generator().manual_seed(count)
    shapes = [(8, 16), (16, 8)] * (count // 2)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(device)) for s in shapes]


def _fresh_grads(params):
    def setup():
        for p in params:
            p.grad = torch.empty_like(p).normal_()
    return setup


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("count", COUNTS)
def test_torch_adamw_fused_step(benchmark, report, device, count):
    params = _params(count, device)
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01, fused=True)
    _fresh_grads(params)()
    opt.step()
    _sync(device)
    benchmark.pedantic(opt.step, setup=_fresh_grads(params), rounds=30, iterations=1, warmup_rounds=3)
    _sync(device)
    report.add(f"host {count} tensors", "torch AdamW fused=True step", benchmark, baseline=True)


@pytest.mark.parametrize("count", COUNTS)
def test_cl_core_fused_step_host_time(benchmark, report, device, count, no_launches, monkeypatch):
    if device == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")  # the triton backend accepts CPU tensors only then
    params = _params(count, device)
    opt = DEMAOptimizer(torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01), DEMAConfig(backend="triton"),
                        fused=True)
    _fresh_grads(params)()
    opt.step()  # builds the tables (once)
    _sync(device)
    benchmark.pedantic(opt.step, setup=_fresh_grads(params), rounds=30, iterations=1, warmup_rounds=3)
    _sync(device)
    assert opt._fused.generic_steps == 0
    group = f"host {count} tensors"
    report.add(group, "cl_core fused step, Triton launches as no-ops", benchmark)
    report.want(f"host time of a fused step / torch AdamW fused step, {count} tensors",
                "cl_core fused step, Triton launches as no-ops", "torch AdamW fused=True step", "≤ 1.0",
                lambda r: r <= 1.0, group=group)
