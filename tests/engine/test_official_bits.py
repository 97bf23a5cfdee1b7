"""DEMAConfig(ema_dtype="param") on bfloat16/float16 tensors computes the official LCIA
arithmetic op for op: every backend and both one-pass fused steps give the SAME BITS as the
official `ema_update` written out in torch ops (tests/official_oracle.py), θ* and the α record
(`stats.alpha`) compared with torch.equal after every step.

Backends: "reference", "torch" (the native C kernels dema_cpu_param_*), "torch-pure" (the
pure-torch path of the same backend), "triton" (Triton interpreter); fused: DEMAOptimizer's
CPU step (csrc/fused_cpu.c cpu_fused_*_param_*, α read from the pending decision,
cpu_fused_pending_param_*) and its Triton step (kernels/triton_fused.py EMA_IN_PARAM_DTYPE).
Random step sequences (6 per dtype on the CPU paths, 2 under the Triton interpreter: the
general and the ALIGNED kernels) over odd sizes and tensors of several blocks/tiles, with
missing, zero, repeated and huge gradients (float16 norms overflowing to inf: the fallback)
and a small-valued tensor (its first, fallback, update moves float16 elements); the sequences
must exercise both the dynamic α and the fallback. A crafted norm just above a 16-bit midpoint
checks the single rounding (and that a float32-first rounding would get another α).

"paper" and "fixed" (cl_core's own formulas) run on the same arithmetic, against the oracle's
generalisation of the official code.
"""
from __future__ import annotations

import pytest
import torch

from cl_core import DEMA, DEMAConfig, DEMAOptimizer
from cl_core.dema.state import fixed_alpha
from tests.engine.test_engine import _backend
from tests.official_oracle import OfficialEMA, round_once

# odd sizes (the general paths) and tensors of several 1,024-element blocks / tiles
SHAPES = [(5, 3), (1,), (2, 1030), (33,)]
ALIGNED = [(8,), (2, 1032), (16,)]  # every numel a multiple of 8: the Triton ALIGNED kernels
EVENTS = ("grad", "grad", "grad", "none", "zero", "same", "huge", "tiny")
DTYPES = [torch.bfloat16, torch.float16]


def _events(seed, n, steps):
    gen = torch.Generator().manual_seed(seed)
    return [[EVENTS[int(torch.randint(len(EVENTS), (1,), generator=gen))] for _ in range(n)] for _ in range(steps)]


# The last tensor is small (|θ| ~ 2e-3): in float16 its θ·0.01 is subnormal, so the first
# (fallback) update moves some of its elements by one unit; everything of it scaled alike.
def _scales(n):
    return [1.0] * (n - 1) + [2e-3]


def _random_grads(params, events, prev, gen):
    """Gradients for one step: "huge" (x300: float16 norms overflow to inf), "tiny" (x1e-3: α
    beyond 1 for small drifts), "same" (‖g − g_prev‖₁ = 0), "zero", "none" (p.grad None)."""
    out = []
    for p, ev, pr, sc in zip(params, events, prev, _scales(len(params))):
        g = torch.randn(p.shape, generator=gen) * 0.3 * sc
        if ev == "none":
            out.append(None)
            continue
        if ev == "same" and pr is not None:
            out.append(pr.clone())
            continue
        g = g * {"zero": 0.0, "huge": 300.0, "tiny": 1e-3}.get(ev, 1.0)
        out.append(g.to(p.dtype))
    return out


def random_steps(shapes, seed, steps):
    """(θ_0, steps): per step (drift per tensor or None, gradient per tensor), random."""
    gen = torch.Generator().manual_seed(seed)
    scales = _scales(len(shapes))
    theta0 = [torch.randn(s, generator=gen) * sc for s, sc in zip(shapes, scales)]
    plan, prev = [], [None] * len(shapes)
    for events in _events(seed, len(shapes), steps):
        drift = [torch.randn(s, generator=gen) * (1e-3 if ev == "tiny" else 0.05) * sc
                 for s, ev, sc in zip(shapes, events, scales)]
        grads = _random_grads(theta0, events, prev, gen)
        plan.append((drift, grads))
        prev = grads
    return theta0, plan


def boundary_steps(dtype):
    """One tensor whose ‖g‖₁ at step 2 lies just above a midpoint of `dtype` (64 + half a unit
    + a tiny element): rounded once it goes up, through float32 it would land on the midpoint
    and go to even. (θ_0, steps) as random_steps."""
    half = {torch.bfloat16: 0.25, torch.float16: 2.0**-5}[dtype]
    g1 = torch.tensor([3.0, -1.0, 0.5])
    g2 = torch.tensor([64.0, half, 2.0**-20])
    drift = [torch.tensor([0.5, -0.25, 2.0])]
    return [torch.tensor([1.0, 2.0, -3.0])], [(drift, [g1]), (drift, [g2]), (drift, [g1])]


def _config(backend, formula, **kw):
    return DEMAConfig(formula=formula, ema_dtype="param", backend=backend, scale=2.0, fallback=0.01, **kw)


def _oracle(cfg):
    return OfficialEMA(cfg.formula, cfg.scale, cfg.fallback, fixed_alpha(cfg))


def _alpha_bits(alphas):
    return torch.tensor(alphas, dtype=torch.float32)


def _assert_bits(got_ema, want_ema, got_alpha, want_alpha, where):
    assert torch.equal(got_alpha.cpu(), _alpha_bits(want_alpha)), f"{where}: α {got_alpha.tolist()} vs {want_alpha}"
    for i, (g, w) in enumerate(zip(got_ema, want_ema)):
        assert g.dtype == w.dtype, (where, i)
        diff = int((g.view(-1) != w.view(-1)).sum())
        assert torch.equal(g, w.view(g.shape)), f"{where}, tensor {i}: {diff} elements differ"


def two_pass(backend, dtype, formula, theta0, plan):
    """One engine update per step on drifting parameters; bits checked after every step.
    Returns the α record (to see which branches ran)."""
    params = [t.to(dtype) for t in theta0]
    cfg = _config(backend, formula)
    engine, oracle, seen = DEMA(params, cfg), _oracle(cfg), []
    for t, (drift, grads) in enumerate(plan):
        grads = [None if g is None else g.to(dtype) for g in grads]
        for p, dr, g in zip(params, drift, grads):
            p.add_(dr.to(dtype))
            p.grad = g
        engine.update()
        want = oracle.update(params, grads)
        _assert_bits(engine.ema_tensors(), oracle.ema_tensors(), engine.stats.alpha, want,
                     f"{backend} {dtype} {formula} step {t}")
        seen += want
    return seen


def fused(backend, dtype, formula, theta0, plan):
    """DEMAOptimizer(SGD) with the one-pass step (the optimizer moves θ; `drift` unused): α
    read every step from the pending decision (no flush), θ* at a few steps (a read
    flushes) and at the end."""
    params = [torch.nn.Parameter(t.to(dtype)) for t in theta0]
    cfg = _config(backend, formula)
    opt = DEMAOptimizer(torch.optim.SGD(params, lr=0.1), cfg, fused=True)
    oracle, seen = _oracle(cfg), []
    for t, (_, grads) in enumerate(plan):
        grads = [None if g is None else g.to(dtype) for g in grads]
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        want = oracle.update(params, grads)
        where = f"fused {backend} {dtype} {formula} step {t}"
        assert torch.equal(opt.engine.stats.alpha.cpu(), _alpha_bits(want)), f"{where}: α"
        if t % 3 == 2 or t == len(plan) - 1:
            _assert_bits(opt.engine.ema_tensors(), oracle.ema_tensors(), opt.engine.stats.alpha, want, where)
        seen += want
    assert opt.fused and opt._fused.generic_steps == 0  # the one-pass kernel ran every step
    return seen


def _run(kind, backend, dtype, formula, theta0, plan, monkeypatch):
    if kind == "fused":
        if backend == "triton":
            from cl_core.kernels import triton_fused

            # tiles of 1,024 elements (read when the driver builds its tables): several per tensor
            monkeypatch.setattr(triton_fused, "TILE", 1024)
        return fused(backend, dtype, formula, theta0, plan)
    return two_pass(_backend(backend, monkeypatch), dtype, formula, theta0, plan)


def _both_branches(alphas, fallback=0.01):
    fb = float(_alpha_bits([fallback]))
    values = _alpha_bits(alphas)
    assert bool((values == fb).any()) and bool((values != fb).any()), "the sequences must hit both branches"


RUNS = [("two_pass", b) for b in ("reference", "torch", "torch-pure", "triton")] + [("fused", "torch"), ("fused", "triton")]
RUN_IDS = [f"{k}-{b}" for k, b in RUNS]


def _slow_on_triton(runs):
    # the Triton interpreter runs ~0.3 s per update of these tensors
    return [pytest.param(k, b, marks=pytest.mark.slow) if b == "triton" else (k, b) for k, b in runs]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind,backend", _slow_on_triton(RUNS), ids=RUN_IDS)
def test_official_formula_gives_the_official_bits(kind, backend, dtype, monkeypatch):
    seen = []
    if backend == "triton":  # fewer sequences under the interpreter: the general and the ALIGNED kernels
        for shapes, seed, steps in ((SHAPES, 0, 5), (ALIGNED, 7, 3)):
            seen += _run(kind, backend, dtype, "official", *random_steps(shapes, seed, steps), monkeypatch)
    else:
        for seed in range(6):
            seen += _run(kind, backend, dtype, "official", *random_steps(SHAPES, seed, 8), monkeypatch)
    fb = float(_alpha_bits([0.01]))
    values = _alpha_bits(seen)
    assert bool((values == fb).any()) and bool((values != fb).any()), "the sequences must hit both branches"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind,backend", RUNS, ids=RUN_IDS)
def test_a_norm_just_above_a_midpoint_is_rounded_once(kind, backend, dtype, monkeypatch):
    theta0, plan = boundary_steps(dtype)
    seen = _run(kind, backend, dtype, "official", theta0, plan, monkeypatch)
    assert 0 < seen[1] < 1  # the dynamic α, from the rounded-up ‖g‖₁
    # the case discriminates: the oracle with its norms rounded through float32 gets another α
    import tests.official_oracle as oracle_module

    monkeypatch.setattr(oracle_module, "round_once", lambda x, dt: x.float().to(dt))
    twice = fused if kind == "fused" else two_pass
    with pytest.raises(AssertionError, match="step 1: α"):
        twice("reference" if kind == "two_pass" else backend, dtype, "official", theta0, plan)


@pytest.mark.parametrize("formula", ["paper", "fixed"])
@pytest.mark.parametrize("kind,backend", _slow_on_triton(RUNS), ids=RUN_IDS)
def test_paper_and_fixed_share_the_arithmetic(kind, backend, formula, monkeypatch):
    # under the interpreter one dtype per formula (bf16 for "paper", fp16 for "fixed")
    dtypes = DTYPES if backend != "triton" else [DTYPES[formula == "fixed"]]
    for dtype in dtypes:
        _run(kind, backend, dtype, formula, *random_steps(SHAPES, 11, 4 if backend == "triton" else 6), monkeypatch)


@pytest.mark.parametrize("fallback", [0.01, 0.001, 0.005, 0.02, 0.05, 0.1])
def test_float32_fallback_weights_equal_the_official_constants(fallback):
    """The kernels take the fallback as a float32 α and form 1 − α in float32; the official
    code multiplies by the doubles 1 − 0.01 (0.99 in its except branch) and 0.01, which torch
    rounds to float32: the same two weights for these fallbacks (docs/fidelity.md)."""
    from cl_core.dema.state import f32, fallback_alpha

    cfg = DEMAConfig(fallback=fallback)
    alpha = fallback_alpha(cfg)
    assert f32(1.0 - alpha) == f32(1.0 - fallback) and alpha == f32(fallback)
    assert f32(0.99) == f32(1.0 - f32(0.01))


@pytest.mark.parametrize("dtype", DTYPES)
def test_round_once_is_a_single_correct_rounding(dtype):
    """The oracle's rounding: against numpy's direct float64 -> float16 rounding, and on
    values just above a 16-bit midpoint, where the float32 route rounds twice."""
    import numpy as np

    gen = torch.Generator().manual_seed(0)
    x = torch.rand(20000, generator=gen, dtype=torch.float64) * torch.logspace(-6, 4, 20000, dtype=torch.float64)
    got = round_once(x, dtype)
    if dtype == torch.float16:
        assert torch.equal(got, torch.from_numpy(x.numpy().astype(np.float16)))
    one = torch.tensor(1.0, dtype=torch.float64)
    ulp = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}[dtype]
    above_mid = one + ulp / 2 + 2.0**-40  # rounds up; float32 first lands on the midpoint, then to even
    assert float(round_once(above_mid, dtype)) == 1 + ulp
    assert float(above_mid.float().to(dtype)) == 1.0  # the double rounding the oracle avoids
    assert float(round_once(one + ulp / 2, dtype)) == 1.0  # an exact tie: to even
    from cl_core.dema.state import round_sum

    assert torch.equal(round_sum(x, dtype), got.float())  # the engine's rule gives the same
    assert float(round_sum(above_mid, dtype)) == 1 + ulp
