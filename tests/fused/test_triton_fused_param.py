"""The Triton one-pass fused step with the EMA in the parameter dtype:
DEMAConfig(ema_dtype="param") on bfloat16/float16 parameters keeps θ* and g_prev in that
dtype, and the kernel (EMA_IN_PARAM_DTYPE in cl_core/kernels/triton_fused.py) rounds every
difference, product, sum and norm of the EMA maths to it, as the reference does.

Run under the Triton interpreter (tests/conftest.py), small tensors. Three checks:

1. Against the reference on the fused run's own inputs: the θ_t and g_t each fused step
   produced are replayed, one update per step, through DEMA(backend="reference") and
   through the native CPU kernel (backend="torch", kernels/csrc/dema_cpu.c
   DEFINE_PARAM_FN). This isolates the EMA maths from the optimizer update, whose bf16
   stores the interpreter truncates where a GPU rounds (tests/fused/test_fused.py).
   Bit for bit: θ*, g_prev, d, flags, skips and α (the three compute the same 16-bit
   arithmetic: norms exact float64 sums rounded once, α's operations rounded; the
   official formula's bits against the official code itself: tests/engine/test_official_bits.py).
2. Against the generic path (fused=False, same config): parameters, optimizer state
   and EMA within 2 ulps per step (the interpreter's bf16 truncation of θ, as in
   tests/fused/test_fused.py; float16 conversions are exact in the interpreter).
3. Program-order independence: bit-identical results when the programs of each launch run
   reversed or shuffled (the machinery of tests/kernels/test_program_order.py).

Every run asserts the fused kernel really ran in the parameter-dtype mode: each step is one
launch of the step kernel with EMA_IN_PARAM_DTYPE=True, and no step took the generic path
(whose DEMA pass is the Triton DEMA backend's own ema_dtype="param" mode, tested in
tests/engine/test_triton_param.py).
"""
from __future__ import annotations

import pytest
import torch

from cl_core import DEMA, DEMAConfig, DEMAOptimizer
from tests.helpers import FP16_EPS, ULP, optimizer_table, ulp_distance
from tests.kernels.test_program_order import (  # noqa: F401  (program_order is a fixture)
    ALIGNED_SHAPES,
    ORDERS,
    SMALL_TILE,
    _assert_identical,
    _fused_run,
    program_order,
)

# AdamW with two parameter groups of their own learning rates; the Adams with an eps
# float16 can hold
OPTIMIZERS = optimizer_table(["adamw", "adam", "adam-l2", "sgd-nesterov", "sgd-dampening"], split_lr={"adamw": 5e-3},
                             changes={"adam": FP16_EPS, "adam-l2": {**FP16_EPS, "lr": 3e-3}})
# numels not multiples of 8 (the general kernel) / every numel a multiple of 8 and every
# buffer 16-byte aligned (the ALIGNED kernel)
GENERAL = [(3, 5), (1030,), (7,), (5,)]
ALIGNED = [(3, 8), (1032,), (16,), (8,)]


@pytest.fixture
def step_launches(monkeypatch):
    """The constexprs of every launch of the fused step kernel: [(EMA_IN_PARAM_DTYPE, ALIGNED)]."""
    from cl_core.kernels import triton_fused

    seen = []
    kernel = triton_fused._fused_step_kernel

    class Recorder:
        def __getitem__(self, grid):
            launch = kernel[grid]

            def run(*args, **kwargs):
                seen.append((kwargs["EMA_IN_PARAM_DTYPE"], kwargs["ALIGNED"]))
                return launch(*args, **kwargs)

            return run

    monkeypatch.setattr(triton_fused, "_fused_step_kernel", Recorder())
    return seen


def _run(fused, opt_name, dtype, formula, shapes, steps=4, nan_at=2, read_at=1, record=False):
    """A DEMAOptimizer run with ema_dtype="param": missing gradients at steps 1 and 3 (so a
    tensor has no previous gradient at the next), a NaN gradient in tensor 2 at `nan_at`,
    an EMA read (flush) after step `read_at`. With `record`, the parameters after each
    step and the gradients each step saw."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]
    opt = DEMAOptimizer(OPTIMIZERS[opt_name](params), DEMAConfig(backend="triton", formula=formula, ema_dtype="param"),
                        fused=fused)
    gen = torch.Generator().manual_seed(1)
    trace, reads = [], []
    for t in range(steps):
        for i, p in enumerate(params):
            missing = (t == 1 and i == 1) or (t == 3 and i in (0, 3))
            p.grad = None if missing else (torch.randn(p.shape, generator=gen) * 0.5).to(dtype)
        if t == nan_at:
            params[2].grad.view(-1)[5] = float("nan")
        grads = [None if p.grad is None else p.grad.clone() for p in params]
        opt.step()
        if record:
            trace.append(([p.detach().clone() for p in params], grads))
        if t == read_at:
            reads.append([e.clone() for e in opt.engine.ema_tensors()])
    return opt, params, trace, reads


def _check_fused_ran(opt, seen, steps, aligned):
    assert opt.fused and opt._fused.generic_steps == 0
    drv, = opt._fused._drivers
    assert type(drv).__name__ == "TritonFusedDriver" and drv.ema_in_param_dtype
    assert seen == [(True, aligned)] * steps
    assert drv.unaligned_steps == (0 if aligned else steps)


def _replay(trace, dtype, formula, backend):
    """One DEMA update per recorded step, on the recorded θ and g, with `backend`."""
    params0, _ = trace[0]
    params = [torch.nn.Parameter(p.clone()) for p in params0]
    engine = DEMA(params, DEMAConfig(backend=backend, formula=formula, ema_dtype="param"))
    for thetas, grads in trace:
        with torch.no_grad():
            for p, th, g in zip(params, thetas, grads):
                p.copy_(th)
                p.grad = None if g is None else g.clone()
        engine.update()
    return engine


def _compare_state(fused_engine, other, dtype, what):
    fs, os_ = fused_engine.state_dict(), other.state_dict()
    worst = {}
    for k, (a, b) in enumerate(zip(fs["ema"], os_["ema"])):
        assert a.dtype == dtype
        worst[f"ema{k}"] = ulp_distance(a, b)
    for k, (a, b) in enumerate(zip(fs["grad_prev"], os_["grad_prev"])):
        # A tensor with a NaN step is skipped at every later step too (its θ holds NaN
        # from then on), and its g_prev is never read again: the fused sweep writes
        # g_prev before the step's NaN probe is known (float32 EMA alike), the reference
        # keeps the last finite one.
        if (a is not None or b is not None) and fs["skips"][k] == 0:
            worst[f"gp{k}"] = ulp_distance(a, b)
    worst["d"] = ulp_distance(fs["d"].to(dtype), os_["d"].to(dtype))
    assert fs["d"].equal(fs["d"].to(dtype).float())  # d is a number of the dtype
    assert max(worst.values()) == 0, (what, worst)
    for key in ("started", "has_prev", "skips"):
        assert fs[key].tolist() == os_[key].tolist(), (what, key)
    assert torch.equal(fs["alpha"], os_["alpha"]), (what, fs["alpha"], os_["alpha"])
    return worst


CASES = [  # (optimizer, dtype, formula, shapes, also the generic path): every kind, dtype,
    # formula and both kernels; the generic path (the costlier comparison) for each dtype and path
    ("adamw", torch.bfloat16, "official", GENERAL, True),
    ("adam", torch.float16, "paper", ALIGNED, True),
    ("sgd-nesterov", torch.bfloat16, "fixed", ALIGNED, True),
    ("sgd-dampening", torch.float16, "official", GENERAL, False),
    ("adam-l2", torch.bfloat16, "paper", ALIGNED, False),
    ("adamw", torch.float16, "fixed", GENERAL, False),
]


@pytest.mark.parametrize("opt_name,dtype,formula,shapes,generic", CASES)
@pytest.mark.slow
def test_fused_param_ema_equals_the_reference_and_the_generic_path(step_launches, opt_name, dtype, formula, shapes,
                                                                   generic):
    steps = 4
    fo, fp, trace, freads = _run(True, opt_name, dtype, formula, shapes, steps=steps, record=True)
    _check_fused_ran(fo, step_launches, steps, aligned=shapes is ALIGNED)
    assert fo.engine.stats.nonfinite_skips[2] >= 1  # the NaN gradient's tensor is skipped from then on
    # the last step's α as decided on the device without a flush (the pending kernel, with
    # the norms rounded to the dtype) is the one the flush then records
    pending_alpha = fo.engine.stats.alpha.clone()
    assert torch.equal(pending_alpha, fo.engine.state_dict()["alpha"])
    # 1. the reference and the native CPU kernel on the fused run's own θ and g
    for backend in ("reference", "torch"):
        other = _replay(trace, dtype, formula, backend)
        _compare_state(fo.engine, other, dtype, backend)
        assert fo.engine.stats.nonfinite_skips.tolist() == other.stats.nonfinite_skips.tolist()
    if not generic:
        return
    # 2. the generic path: inner step, then the DEMA backend
    go, gp, _, greads = _run(False, opt_name, dtype, formula, shapes, steps=steps)
    assert go._fused is None and go.engine.groups[0].backend_name == "triton"
    tol = 2 * steps * ULP[dtype]  # 2 ulps per step, relative (see the module docstring)

    def close(a, b):
        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol, equal_nan=True)

    for a, b in zip(fp, gp):
        close(a, b)
    for a, b in zip(fo.engine.ema_tensors() + freads[0], go.engine.ema_tensors() + greads[0]):
        assert a.dtype == b.dtype == dtype
        close(a, b)
    for p_f, p_g in zip(fp, gp):  # the optimizer state is torch's own, in the parameters' dtype
        for k, v in go.inner.state[p_g].items():
            if isinstance(v, torch.Tensor) and v.numel() > 1:
                close(fo.inner.state[p_f][k], v)
    assert fo.engine.stats.nonfinite_skips.tolist() == go.engine.stats.nonfinite_skips.tolist()


@pytest.mark.slow
def test_parameters_changing_dtype_take_the_generic_path(step_launches, caplog):
    """The EMA stays bfloat16 when the parameters become float16: the fused kernel would
    read it as float16 numbers, so such a step takes the generic path (logged, counted)."""
    opt, params, _, _ = _run(True, "sgd-nesterov", torch.bfloat16, "official", GENERAL, steps=2, read_at=None,
                             nan_at=None)
    with torch.no_grad():
        for p in params:
            p.data = p.data.to(torch.float16)
            opt.inner.state[p]["momentum_buffer"] = opt.inner.state[p]["momentum_buffer"].to(torch.float16)
    for p in params:
        p.grad = torch.ones_like(p)
    with caplog.at_level("WARNING"):
        try:
            opt.step()
        except ValueError as exc:  # the generic DEMA backend may refuse the change itself
            assert "float16" in str(exc)
    assert opt._fused.generic_steps == 1
    assert "the EMA is kept in torch.bfloat16" in caplog.text
    assert step_launches == [(True, False)] * 2  # no launch for the float16 step
    assert all(e.dtype == torch.bfloat16 for e in opt.engine.ema_tensors())


# One case (~12 s): the programs share state the same way whatever the dtype; bfloat16 for
# its integer rounding, ALIGNED for the vector hints, "paper" for d carried between launches.
@pytest.mark.parametrize("opt_name,dtype,formula,shapes", [("adamw", torch.bfloat16, "paper", ALIGNED_SHAPES)])
@pytest.mark.slow
def test_fused_param_ema_does_not_depend_on_program_order(program_order, monkeypatch, opt_name, dtype, formula,
                                                          shapes):
    from cl_core.kernels import triton_fused

    monkeypatch.setattr(triton_fused, "TILE", SMALL_TILE)  # several tiles and iterations per tensor

    def run():
        snapshot, aligned = _fused_run(opt_name, dtype, formula, shapes, ema_dtype="param")
        assert aligned == [shapes is ALIGNED_SHAPES]
        return snapshot

    ref = run()
    for mode in ORDERS:
        program_order["mode"] = mode
        _assert_identical(run(), ref, mode)


def test_ulp_distance_counts_neighbours():
    """The 1-ulp check above can fail: neighbours are 1 apart, across zero too."""
    for dtype in ULP:
        a = torch.tensor([1.0, -3.5, 0.0, 2.0 ** -20], dtype=dtype)
        up = (a.view(torch.int16) + 1).view(dtype)  # the next number away from zero
        assert ulp_distance(a, a) == 0 and ulp_distance(a, up) == 1
        assert ulp_distance(a, (a.view(torch.int16) + 2).view(dtype)) == 2
        tiny = torch.tensor([1], dtype=torch.int16).view(dtype)  # the smallest positive number
        assert ulp_distance(tiny, -tiny) == 2 and ulp_distance(torch.zeros(1, dtype=dtype), -tiny) == 1
