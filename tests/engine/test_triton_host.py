"""The host side of the Triton DEMA backend (cl_core/dema/twopass/triton_backend.py and
cl_core/dema/cuda_launch.py) on what only a real GPU would otherwise show: every launch
under its tensors' device, CUDA-graph capture refused, calls from another stream ordered
after the last one, resized tensors refused before any state changes, and the interpreter
refused on CUDA tensors.

Runs on CPU tensors under the Triton interpreter. The device, capture and stream parts go
through the seams of cuda_launch.py (`_is_cuda`, `_enter_device`, `_capturing`,
`_current_stream`, `_record_use`), replaced here by recorders: this shows that the host code
enters the right device around every launch, refuses before anything changes and orders
streams, not what CUDA then does with it. That (a group on cuda:1 without set_device, a
step on a side stream, a refused capture) only a GPU shows: `make gpu-check` runs the
test_cuda_* cases below there.
"""
from __future__ import annotations

import contextlib

import pytest
import torch

from cl_core import DEMA, DEMAConfig
from cl_core.dema import cuda_launch
from cl_core.dema.state import GroupState
from cl_core.kernels import triton_dema, triton_fused
from tests.helpers import make_params, state_tensors

LAUNCHERS = {triton_dema: ("dema_stats", "dema_decide", "dema_apply"), triton_fused: ("step", "flush", "pending")}


def _grads(params, gen):
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)


SHAPES = ((5, 3), (33,), (2, 600))


class FakeStream:
    """Stands for a torch.cuda.Stream: records what it was asked to wait for."""

    def __init__(self, name):
        self.name, self.waited = name, []

    def wait_stream(self, other):
        self.waited.append(other.name)

    def __repr__(self):
        return self.name


@pytest.fixture
def fake_cuda(monkeypatch):
    """Makes cuda_launch treat the CPU group as a CUDA one: records the device entered
    (and whether a launch ran inside it), the stream current at each call, the buffers
    marked as used on a stream; `capturing` switches capture on."""
    rec = {"entered": [], "depth": 0, "stream": FakeStream("default"), "capturing": False, "recorded": [],
           "launches": []}

    @contextlib.contextmanager
    def enter(device):
        rec["entered"].append(device)
        rec["depth"] += 1
        try:
            yield
        finally:
            rec["depth"] -= 1

    monkeypatch.setattr(cuda_launch, "_is_cuda", lambda device: True)
    monkeypatch.setattr(cuda_launch, "kernels_interpreted", lambda kernel: False)  # the CPU tensors are real
    monkeypatch.setattr(cuda_launch, "_enter_device", enter)
    monkeypatch.setattr(cuda_launch, "_capturing", lambda device: rec["capturing"])
    monkeypatch.setattr(cuda_launch, "_current_stream", lambda device: rec["stream"])
    monkeypatch.setattr(cuda_launch, "_record_use", lambda t, stream: rec["recorded"].append((t, stream.name)))
    for module, names in LAUNCHERS.items():
        for name in names:
            original = getattr(module, name)

            def launch(*args, _original=original, _name=name, **kwargs):
                rec["launches"].append((_name, rec["depth"], rec["entered"][-1] if rec["entered"] else None))
                return _original(*args, **kwargs)

            monkeypatch.setattr(module, name, launch)
    return rec


def _engine(params, **config):
    return DEMA(params, DEMAConfig(backend="triton", formula="paper", **config))


def _started_engine():
    """Parameters and an engine past its first update (the lazy start), with the generator that
    draws the next gradients."""
    params = make_params(SHAPES)
    engine = _engine(params)
    gen = torch.Generator().manual_seed(1)
    _grads(params, gen)
    engine.update()
    return params, engine, gen


def test_every_launch_runs_under_the_groups_device(fake_cuda):
    params = make_params(SHAPES)
    engine = _engine(params)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        _grads(params, gen)
        engine.update()
    engine.ema_tensors()  # a read: canonicalize's launch
    launches = fake_cuda["launches"]
    assert {name for name, _, _ in launches} == set(LAUNCHERS[triton_dema])
    device = engine.groups[0].state.device
    assert all(depth >= 1 and dev == device for _, depth, dev in launches), launches


def test_the_recorders_see_a_launch_outside_the_guard(fake_cuda):
    """The check above can fail: a launch made without entering the device is seen as such."""
    params = make_params(SHAPES)
    engine = _engine(params)
    _grads(params, torch.Generator().manual_seed(1))
    engine.update()
    backend = engine.groups[0].backend
    fake_cuda["launches"].clear()
    backend._update([p for p in params], [p.grad for p in params], None)  # bypasses update()'s guard
    assert fake_cuda["launches"] and all(depth == 0 for _, depth, _ in fake_cuda["launches"])


def test_a_captured_update_is_refused_before_anything_changes(fake_cuda):
    params, engine, gen = _started_engine()
    before = state_tensors(engine)
    fake_cuda["launches"].clear()
    fake_cuda["capturing"] = True
    _grads(params, gen)
    with pytest.raises(RuntimeError, match="captured into a CUDA graph.*outside the graph"):
        engine.update()
    assert fake_cuda["launches"] == []
    assert all(torch.equal(a, b) for a, b in zip(before, state_tensors(engine)))
    fake_cuda["capturing"] = False
    engine.update()  # outside the capture it runs again
    assert fake_cuda["launches"]


def test_a_call_from_another_stream_waits_for_the_last_one(fake_cuda):
    params, engine, gen = _started_engine()
    first = fake_cuda["stream"]
    assert first.waited == [] and fake_cuda["recorded"] == []  # one stream so far: nothing to order
    side = fake_cuda["stream"] = FakeStream("side")
    _grads(params, gen)
    engine.update()
    assert side.waited == ["default"]
    backend = engine.groups[0].backend
    recorded = {id(t) for t, name in fake_cuda["recorded"] if name == "side"}
    kept = [backend.partials, backend.dpart, backend.dyn_tab, backend.mode, backend.stats,
            engine.groups[0].state.ema_flat, engine.groups[0].state.d]
    assert all(id(t) in recorded for t in kept)
    _grads(params, gen)
    engine.update()  # same stream again: no second wait
    assert side.waited == ["default"]
    fake_cuda["stream"] = first
    engine.ema_tensors()  # a read from the first stream waits for the side stream's update
    assert first.waited == ["side"]


def test_a_resized_tensor_is_refused_before_anything_changes():
    params, engine, gen = _started_engine()
    before = state_tensors(engine)
    with torch.no_grad():
        params[2].data = params[2].data.reshape(-1)[:700].clone()  # 1,200 elements -> 700
    params[2].grad = torch.randn(params[2].shape, generator=gen)
    for p in params[:2]:
        p.grad = torch.randn(p.shape, generator=gen)
    with pytest.raises(ValueError, match=r"tensor 2 .* has 700 elements .* built for 1200"):
        engine.update()
    assert all(torch.equal(a, b) for a, b in zip(before, state_tensors(engine)))


def test_a_resized_gradient_is_refused():
    """torch refuses `p.grad =` of another size, but a backend is handed gradients by its
    caller (a hook, a sharded trainer): checked too."""
    params, engine, gen = _started_engine()
    before = state_tensors(engine)
    grads = [p.grad for p in params]
    grads[1] = torch.randn(20, generator=gen)  # 33 expected
    with pytest.raises(ValueError, match=r"gradient of tensor 1 .* has 20 elements"):
        engine.groups[0].backend.update(params, grads)
    assert all(torch.equal(a, b) for a, b in zip(before, state_tensors(engine)))


def test_the_interpreter_is_refused_on_cuda_tensors():
    """TRITON_INTERPRET=1 (the kernels here are interpreted) with a group on a GPU: refused
    with a sentence, before a table is allocated on that device."""
    from cl_core.dema.twopass.triton_backend import TritonBackend

    assert cuda_launch.kernels_interpreted(triton_dema._dema_stats_kernel)  # tests/conftest.py sets it
    config = DEMAConfig(backend="triton")
    state = GroupState([p.detach() for p in make_params(SHAPES)], config)
    state.device = torch.device("cuda", 1)  # what a group on the second GPU records
    with pytest.raises(RuntimeError, match=r"TRITON_INTERPRET=1.*cuda:1.*Unset TRITON_INTERPRET"):
        TritonBackend(state, config, torch.float32)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_cuda_group_on_the_second_gpu_runs_without_set_device():
    params = [torch.nn.Parameter(p.detach().to("cuda:1")) for p in make_params(SHAPES)]
    ref = DEMA([torch.nn.Parameter(p.detach().cpu()) for p in params], DEMAConfig(backend="reference", formula="paper"))
    engine = DEMA(params, DEMAConfig(backend="triton", formula="paper"))
    assert torch.cuda.current_device() == 0
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        for p, q in zip(params, ref.params):
            q.grad = torch.randn(q.shape, generator=gen)
            p.grad = q.grad.to("cuda:1")
        engine.update()
        ref.update()
    for a, b in zip(engine.ema_tensors(), ref.ema_tensors()):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_captured_update_is_refused():
    params = [torch.nn.Parameter(p.detach().cuda()) for p in make_params(SHAPES)]
    engine = DEMA(params, DEMAConfig(backend="triton", formula="paper"))
    for p in params:
        p.grad = torch.randn_like(p)
    engine.update()
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        with pytest.raises(RuntimeError, match="CUDA graph"):
            with torch.cuda.graph(graph, stream=stream):
                engine.update()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_update_on_a_side_stream_equals_the_default_stream():
    def run(side):
        params = [torch.nn.Parameter(p.detach().cuda()) for p in make_params(SHAPES)]
        engine = DEMA(params, DEMAConfig(backend="triton", formula="paper"))
        gen = torch.Generator().manual_seed(1)
        stream = torch.cuda.Stream()
        for t in range(4):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen).cuda()
            if side and t % 2:
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    engine.update()
                torch.cuda.current_stream().wait_stream(stream)
            else:
                engine.update()
        return [e.cpu() for e in engine.ema_tensors()]

    for a, b in zip(run(False), run(True)):
        assert torch.equal(a, b)
