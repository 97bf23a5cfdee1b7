"""The CPU fused step with DEMAConfig(ema_dtype="param"): θ* and g_prev kept in the
parameter dtype (bf16/fp16) by csrc/fused_cpu.c's cpu_fused_*_param_* kernels.

Two comparisons per run (the fused kernel must really run: `.fused` and no generic step):

- Same trajectory, DEMA half. After every fused step the parameters and gradients of
  that step are handed to standalone engines (DEMA, ema_dtype="param"): backend="torch"
  (csrc/dema_cpu.c, dema_cpu_param_*) must agree bit for bit: θ*, α at every step (read
  from the pending state, no flush), d, skips, started, has_prev, and g_prev of every
  tensor that never saw NaN/inf (after a non-finite step the fused sweep has already
  written g_prev, the engine leaves it; such a tensor's θ stays NaN, so it is skipped
  for good and its g_prev is never read again). backend="reference" (the literal maths):
  θ* and α bit for bit too (the same 16-bit arithmetic; against the official code itself:
  tests/engine/test_official_bits.py).
- Whole run against fused=False (torch backend, optimizer step then engine update): the
  kernel's optimizer half is not torch's bf16/fp16 update bit for bit (as with an fp32
  EMA, tests/fused/test_cpu_fused.py): torch rounds the `alpha=` of `add_` (SGD's lr, momentum,
  dampening, L2 decay) to the storage dtype where the kernel keeps it fp32, and torch's
  vectorised `lerp_` (Adam's exp_avg) uses a fused multiply-add. The runs part by an ulp
  here and there: parameters and θ* within 2 ulps per step, α relative 5e-2 (a ratio of
  the norms of two slightly different runs), skips exact.
"""
from __future__ import annotations

import pytest
import torch

from cl_core import DEMA, DEMAConfig, DEMAOptimizer
from cl_core.kernels import cpu_fused, native
from tests.helpers import FP16_EPS, ULP, make_params, optimizer_table

pytestmark = pytest.mark.skipif(native.load("fused") is None, reason="no C compiler: no native fused kernels")

# sizes below, at and above the kernel's CHUNK of 1024 elements, and one of a few elements
SHAPES = [(40, 70), (70,), (3, 40), (1030,)]
# eps=1e-4 for every Adam: representable in fp16 (torch's 1e-8 rounds to 0 there: 0/0 at step 1)
OPTIMIZERS = optimizer_table(["adamw", "adam-l2", "adam", "sgd-nesterov", "sgd-dampening"],
                             changes={"adamw": FP16_EPS, "adam-l2": FP16_EPS, "adam": FP16_EPS})
DTYPES = [torch.bfloat16, pytest.param(torch.float16, marks=pytest.mark.skipif(
    cpu_fused.kernels(torch.float16, torch.float16) is None, reason="compiler without _Float16: no fp16 kernels"))]


def _set_grads(params, t, gen, dtype, nonfinite):
    """Gradients of step t: tensor 1 has none every 4th step; with `nonfinite`, a NaN in
    tensor 3 at step 5 and an inf in tensor 2 at step 7 (both stay skipped afterwards)."""
    for i, p in enumerate(params):
        p.grad = None if (t % 4 == 3 and i == 1) else (torch.randn(p.shape, generator=gen) * 0.5).to(dtype)
    if nonfinite and t == 5:
        params[3].grad[7] = float("nan")
    if nonfinite and t == 7:
        params[2].grad[1, 2] = float("inf")


def _fused_opt(params, opt_name, formula, fused=True):
    opt = DEMAOptimizer(OPTIMIZERS[opt_name](params), DEMAConfig(ema_dtype="param", formula=formula), fused=fused)
    assert opt.fused  # "auto" picks the fused kernel too
    return opt


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("formula", ["official", "paper", "fixed"])
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_same_trajectory_equals_the_engines(dtype, formula, opt_name):
    steps = 10
    params = make_params(SHAPES, dtype)
    opt = _fused_opt(params, opt_name, formula, fused="auto" if formula == "fixed" else True)
    shadows, engines = {}, {}
    for backend in ("torch", "reference"):
        shadows[backend] = [torch.nn.Parameter(p.detach().clone()) for p in params]
        engines[backend] = DEMA(shadows[backend], DEMAConfig(ema_dtype="param", formula=formula, backend=backend))
        engines[backend].ensure_groups()  # θ* starts as θ_0, as the optimizer's engine does at its first step
    gen = torch.Generator().manual_seed(1)
    for t in range(steps):
        _set_grads(params, t, gen, dtype, nonfinite=True)
        grads = [None if p.grad is None else p.grad.clone() for p in params]
        opt.step()
        for backend, eng in engines.items():
            with torch.no_grad():
                for s, p, g in zip(shadows[backend], params, grads):
                    s.copy_(p)
                    s.grad = g
            eng.update()
        fused_stats, torch_stats = opt.engine.stats, engines["torch"].stats  # pending α: no flush
        assert torch.equal(fused_stats.alpha, torch_stats.alpha), (t, fused_stats.alpha, torch_stats.alpha)
        assert torch.equal(fused_stats.nonfinite_skips, torch_stats.nonfinite_skips), t
        assert torch.equal(fused_stats.missing_grads, torch_stats.missing_grads), t
        assert torch.equal(fused_stats.alpha, engines["reference"].stats.alpha), t
        if t in (2, 6, steps - 1):  # an EMA read flushes: the next step starts with nothing pending
            fused_ema = opt.engine.ema_tensors()
            for i, (a, b, r) in enumerate(zip(fused_ema, engines["torch"].ema_tensors(), engines["reference"].ema_tensors())):
                assert a.dtype == dtype
                assert torch.equal(a, b) and torch.equal(a, r), (t, i, int((a != b).sum()), int((a != r).sum()))
    assert opt._fused.generic_steps == 0  # every step ran the fused kernel
    fs, ts = opt.engine.state_dict(), engines["torch"].state_dict()
    for key in ("d", "alpha", "skips", "started", "has_prev", "missing_grads"):
        assert torch.equal(fs[key], ts[key]), (key, fs[key], ts[key])
    assert fs["skips"].tolist() == [0, 0, 3, 5]  # the inf (step 7) and NaN (step 5) steps on
    if formula != "fixed":
        for i, (a, b) in enumerate(zip(fs["grad_prev"], ts["grad_prev"])):
            if fs["skips"][i] == 0:
                assert a.dtype == dtype and torch.equal(a, b), i


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_whole_run_against_the_generic_path(dtype, opt_name):
    steps, formula = 8, "paper"
    runs = []
    for fused in (True, False):
        params = make_params(SHAPES, dtype)
        opt = DEMAOptimizer(OPTIMIZERS[opt_name](params), DEMAConfig(ema_dtype="param", formula=formula), fused=fused)
        gen = torch.Generator().manual_seed(1)
        for t in range(steps):
            _set_grads(params, t, gen, dtype, nonfinite=True)
            opt.step()
        runs.append((params, opt))
    (fp, fo), (gp, go) = runs
    assert fo.fused and fo._fused.generic_steps == 0 and not go.fused
    tol = 2 * steps * ULP[dtype]
    for a, b in zip(fp, gp):
        torch.testing.assert_close(a.detach().float(), b.detach().float(), rtol=tol, atol=tol, equal_nan=True)
    for a, b in zip(fo.engine.ema_tensors(), go.engine.ema_tensors()):
        assert a.dtype == b.dtype == dtype
        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(fo.engine.stats.alpha, go.engine.stats.alpha, rtol=5e-2, atol=1e-5)
    assert torch.equal(fo.engine.stats.nonfinite_skips, go.engine.stats.nonfinite_skips)


def test_first_step_nan_leaves_the_ema_as_the_engine_does():
    """A NaN gradient at a tensor's very first step: the lazy start is skipped, so θ* and
    g_prev keep what the engine started them as (θ* the parameters when the engine
    started, g_prev zeros), never the NaN parameters; the next steps of the other tensors
    equal an engine fed the same trajectory bit for bit."""
    dtype = torch.bfloat16
    params = make_params(SHAPES, dtype)
    theta0 = params[0].detach().clone()
    opt = _fused_opt(params, "adam", "official")
    shadow = [torch.nn.Parameter(p.detach().clone()) for p in params]
    eng = DEMA(shadow, DEMAConfig(ema_dtype="param", backend="torch"))
    eng.ensure_groups()
    gen = torch.Generator().manual_seed(1)
    for t in range(3):
        _set_grads(params, t, gen, dtype, nonfinite=False)
        if t == 0:
            params[0].grad[0, 0] = float("nan")
        grads = [None if p.grad is None else p.grad.clone() for p in params]
        opt.step()
        with torch.no_grad():
            for s, p, g in zip(shadow, params, grads):
                s.copy_(p)
                s.grad = g
        eng.update()
    assert opt._fused.generic_steps == 0
    fs, ts = opt.engine.state_dict(), eng.state_dict()
    assert fs["skips"].tolist() == ts["skips"].tolist() == [3, 0, 0, 0]
    assert torch.equal(fs["ema"][0], theta0) and torch.equal(fs["grad_prev"][0], torch.zeros_like(theta0))
    for key in ("ema", "grad_prev"):
        for a, b in zip(fs[key], ts[key]):
            assert torch.equal(a, b), key
    for key in ("d", "alpha", "started", "has_prev"):
        assert torch.equal(fs[key], ts[key]), key


def test_parameters_converted_to_another_dtype_take_the_generic_path(caplog):
    """bf16 θ* (ema_dtype="param") with parameters moved to fp16 after the optimizer was
    built: the kernel would read θ* as fp16, so those steps take the generic path (reason
    logged), and the EMA equals an engine fed the same trajectory."""
    params = make_params(SHAPES, torch.bfloat16)
    # SGD without momentum keeps no state (Adam's bf16 state would not take fp16 gradients)
    opt = DEMAOptimizer(torch.optim.SGD(params, lr=1e-2), DEMAConfig(ema_dtype="param"), fused=True)
    shadow = [torch.nn.Parameter(p.detach().clone()) for p in params]
    eng = DEMA(shadow, DEMAConfig(ema_dtype="param", backend="torch"))
    eng.ensure_groups()
    gen = torch.Generator().manual_seed(1)
    for t in range(5):
        if t == 2:
            for p in params:
                p.data = p.data.to(torch.float16)
        dtype = params[0].dtype
        _set_grads(params, t, gen, dtype, nonfinite=False)
        grads = [None if p.grad is None else p.grad.clone() for p in params]
        with caplog.at_level("WARNING", logger="cl_core.dema.onepass.step"):
            opt.step()
        with torch.no_grad():
            for s, p, g in zip(shadow, params, grads):
                s.data = p.detach().clone()
                s.grad = g
        eng.update()
    assert opt._fused.generic_steps == 3
    assert any("ema_dtype='param'" in r.getMessage() for r in caplog.records)
    for a, b in zip(opt.engine.ema_tensors(), eng.ema_tensors()):
        assert a.dtype == torch.bfloat16 and torch.equal(a, b)
