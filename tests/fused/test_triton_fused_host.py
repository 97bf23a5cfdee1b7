"""The host side of the Triton fused step (cl_core/dema/onepass/triton_driver.py with
cl_core/dema/cuda_launch.py): every launch under the group's device, a captured
optimizer.step() refused before anything changes, a step from another stream ordered after
the last one, the interpreter refused on CUDA tensors, and a flush whose per-tensor sums
are deterministic (the decide kernel's fixed-order reduction, no index_add_).

On CPU tensors under the Triton interpreter, through the recorders of
tests/engine/test_triton_host.py (`fake_cuda`): they show what the host code does, not
what CUDA then does with it; the test_cuda_* cases (run by `make gpu-check`) show that on
a GPU.
"""
from __future__ import annotations

import pytest
import torch

from cl_core import DEMAConfig, DEMAOptimizer
from cl_core.dema import cuda_launch
from cl_core.kernels import layouts as L
from cl_core.kernels import triton_dema, triton_fused
from tests.engine.test_triton_host import LAUNCHERS, FakeStream, fake_cuda  # noqa: F401  (a fixture)
from tests.kernels.test_program_order import SMALL_TILE
from tests.helpers import engine_snapshot, make_params, state_tensors

SHAPES = [(3, 5), (2, 1030), (7,), (4100,)]  # 2,060 and 4,100 elements: 3 and 5 tiles of 1,024


def _optimizer(params, formula="paper"):
    return DEMAOptimizer(torch.optim.AdamW(params, lr=1e-2), DEMAConfig(backend="triton", formula=formula),
                         fused=True)


def _grads(params, gen):
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(p.device)


@pytest.fixture
def small_tiles(monkeypatch):
    monkeypatch.setattr(triton_fused, "TILE", SMALL_TILE)  # several tiles per tensor


def test_every_fused_launch_runs_under_the_groups_device(fake_cuda, small_tiles):
    params = make_params(SHAPES)
    opt = _optimizer(params)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        _grads(params, gen)
        opt.step()
    opt._fused.pending_stats()
    opt.engine.ema_tensors()  # the flush: its kernel and the fold
    assert opt._fused.generic_steps == 0
    names = {name for name, _, _ in fake_cuda["launches"]}
    assert set(LAUNCHERS[triton_fused]) <= names and "dema_decide" in names
    device = opt.engine.groups[0].state.device
    assert all(depth >= 1 and dev == device for _, depth, dev in fake_cuda["launches"]), fake_cuda["launches"]


def test_a_captured_fused_step_is_refused_before_anything_changes(fake_cuda, small_tiles):
    params = make_params(SHAPES)
    opt = _optimizer(params)
    gen = torch.Generator().manual_seed(1)
    _grads(params, gen)
    opt.step()
    _grads(params, gen)
    before = state_tensors(opt.engine, params, opt.inner)
    fake_cuda["launches"].clear()
    fake_cuda["capturing"] = True
    with pytest.raises(RuntimeError, match="captured into a CUDA graph.*outside the graph"):
        opt.step()
    assert fake_cuda["launches"] == []
    after = state_tensors(opt.engine, params, opt.inner)
    assert len(before) == len(after) and all(torch.equal(a, b) for a, b in zip(before, after))
    assert opt._fused.generic_steps == 0  # refused, not sent down the generic path
    fake_cuda["capturing"] = False
    opt.step()
    assert fake_cuda["launches"]


def test_a_fused_step_from_another_stream_waits_for_the_last_one(fake_cuda, small_tiles):
    params = make_params(SHAPES)
    opt = _optimizer(params)
    gen = torch.Generator().manual_seed(1)
    _grads(params, gen)
    opt.step()
    first = fake_cuda["stream"]
    side = fake_cuda["stream"] = FakeStream("side")
    _grads(params, gen)
    opt.step()
    assert side.waited == ["default"]
    drv = opt._fused._drivers[0]
    recorded = {id(t) for t, name in fake_cuda["recorded"] if name == "side"}
    assert all(id(t) in recorded for t in (drv.part, drv.flags, drv.dcarry, drv.stab, drv.upload,
                                            opt.engine.groups[0].state.ema_flat))
    fake_cuda["stream"] = first
    opt.engine.ema_tensors()  # an EMA read on the first stream waits for the side stream's step
    assert first.waited == ["side"]


def test_the_flush_folds_without_index_add_and_repeats_bit_for_bit(monkeypatch, small_tiles):
    """The per-tensor sums of the flush are the decide kernel's (one program each, a fixed
    order): the same bits on every run, and equal to the float64 sum of the partials to
    float32 precision. index_add_ (float atomics on CUDA) is not called."""

    def no_index_add(self, *args, **kwargs):
        raise AssertionError("index_add_ called")

    monkeypatch.setattr(torch.Tensor, "index_add_", no_index_add)
    folds = []
    original_fold = None

    def run():
        nonlocal original_fold
        params = make_params(SHAPES)
        opt = _optimizer(params)
        gen = torch.Generator().manual_seed(1)
        ds = []
        for t in range(4):
            _grads(params, gen)
            opt.step()
            if t % 2:
                drv = opt._fused._drivers[0]
                w, r = drv.parity, 1 - drv.parity
                opt.engine.flush()  # the flush writes part[w] (its d) and folds it
                tile = torch.tensor(drv.tile0 + [drv.n_tiles])
                parts = drv.part[w, :, L.P_D].double()
                expect = torch.stack([parts[tile[k]:tile[k + 1]].sum() for k in range(len(SHAPES))])
                d = engine_snapshot(opt.engine)["d"]
                torch.testing.assert_close(d.double(), expect, rtol=2e-7, atol=0)
                ds.append(d.clone())
        return ds, [e.clone() for e in opt.engine.ema_tensors()]

    (d1, e1), (d2, e2) = run(), run()
    assert all(torch.equal(a, b) for a, b in zip(d1 + e1, d2 + e2))
    assert all(int((d > 0).sum()) == len(SHAPES) for d in d1)  # the paper formula's d is live


def test_the_interpreter_is_refused_on_cuda_tensors_by_the_fused_step(small_tiles):
    from cl_core.dema.onepass.triton_driver import TritonFusedDriver
    from cl_core.dema.onepass.protocols import GroupMembers
    from cl_core.dema.state import GroupState

    assert cuda_launch.kernels_interpreted(triton_fused._fused_step_kernel)
    params = make_params(SHAPES)
    state = GroupState([p.detach() for p in params], DEMAConfig(backend="triton"))
    cuda = torch.device("cuda", 0)
    members = GroupMembers(state, cuda, torch.float32, list(range(len(params))), params, [0] * len(params),
                           [None] * len(params), [None] * len(params), None)
    with pytest.raises(RuntimeError, match=r"TRITON_INTERPRET=1.*cuda:0"):
        TritonFusedDriver(members)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_captured_fused_step_is_refused():
    params = make_params(SHAPES, device="cuda")
    opt = _optimizer(params)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="CUDA graph"):
        with torch.cuda.graph(graph):
            opt.step()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_fused_steps_on_a_side_stream_equal_the_default_stream():
    def run(side):
        params = make_params(SHAPES, device="cuda")
        opt = _optimizer(params)
        gen = torch.Generator().manual_seed(1)
        stream = torch.cuda.Stream()
        for t in range(4):
            _grads(params, gen)
            if side and t % 2:
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    opt.step()
                torch.cuda.current_stream().wait_stream(stream)
            else:
                opt.step()
        return [p.detach().cpu() for p in params] + [e.cpu() for e in opt.engine.ema_tensors()]

    for a, b in zip(run(False), run(True)):
        assert torch.equal(a, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_flush_repeats_bit_for_bit():
    def run():
        params = make_params(SHAPES, device="cuda")
        opt = _optimizer(params)
        gen = torch.Generator().manual_seed(1)
        out = []
        for _ in range(4):
            _grads(params, gen)
            opt.step()
            out += [e.cpu() for e in opt.engine.ema_tensors()] + [engine_snapshot(opt.engine)["d"].cpu()]
        return out

    for a, b in zip(run(), run()):
        assert torch.equal(a, b)
