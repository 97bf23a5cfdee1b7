"""The regime counters (cl_core/dema/regime.py): each tensor-update's category and α, checked
against a plain per-tensor reference computed by hand before every update of the reference
backend; every backend and both one-pass paths count the same; no host sync; windows, lag,
verdict and advice."""
from __future__ import annotations

import copy
import json
import math
import pickle

import pytest
import torch

import cl_core.dema.regime as R
import cl_core.kernels.native
from cl_core import DEMA, DEMAConfig, DEMAOptimizer
from cl_core.dema.state import dynamic_alpha, fallback_alpha, fixed_alpha, round_sum
from tests.dema_sequences import drive, make_script
from tests.helpers import engine_snapshot
from tests.kernels.test_launches_and_syncs import CountSyncs

SHAPES = [(16, 8), (8, 16), (40,), (5, 5), (200,)]
EVENTS = ("grad", "grad", "grad", "none", "same", "nan_grad", "zero", "nan_param")
# scale 0.05 puts the official α on both sides of 1 at these sizes (every category occurs)
CASES = [(f, e) for f in ("official", "paper", "fixed") for e in ("float32", "param")]
# the Triton interpreter takes seconds per update: two cases cover both EMA dtypes and the
# formula with every fallback cause (the formula is a scalar of the same kernels)
TRITON_CASES = [("paper", "float32"), ("official", "param")]
slow = pytest.mark.slow


def _cases(backends):
    """(backend, formula, ema_dtype) params; the Triton ones fewer and marked slow."""
    out = []
    for b in backends:
        for f, e in (TRITON_CASES if b == "triton" else CASES):
            out.append(pytest.param(b, f, e, marks=[slow] if b == "triton" else [], id=f"{b}-{f}-{e}"))
    return out


def _config(formula, ema_dtype, backend="reference"):
    return DEMAConfig(formula=formula, ema_dtype=ema_dtype, backend=backend, scale=0.05)


def _dtype(ema_dtype):
    return torch.bfloat16 if ema_dtype == "param" else torch.float32


def _norm(x: torch.Tensor, low: bool) -> float:
    """‖x‖₁ as the update uses it: float32 of a float64 sum, or (16-bit EMA) the float64 sum
    of the 16-bit |x| rounded once to that dtype."""
    s = x.double().abs().sum()
    return float(round_sum(s, x.dtype)) if low else float(s.float())


def _hand_category(config, snap, span, k, theta, grad):
    """(category, α the formula set or None) of tensor k's coming update, by hand from the
    engine's state before it (`engine_snapshot`; tensor k at `span` of its flat buffers)."""
    low = config.ema_dtype == "param"
    # a fixed EMA reads no gradient (docs/design.md §2): only a non-finite θ skips it
    bad_grad = config.formula != "fixed" and grad is not None and not bool(torch.isfinite(grad).all())
    if not bool(torch.isfinite(theta).all()) or bad_grad:
        return R.CAT_SKIP, None
    started = len(snap["started"]) > 0 and bool(snap["started"][k])
    if config.formula == "fixed":
        if not started:
            return R.CAT_START, None
        alpha = fixed_alpha(config)
        return (R.CAT_JUMP if alpha > R.JUMP else R.CAT_DYN), alpha
    if not started or grad is None or not bool(snap["has_prev"][k]):
        return R.CAT_START, None
    wd = snap["ema"].dtype
    th, g = theta.reshape(-1).to(wd), grad.reshape(-1).to(wd)
    a = _norm(th - snap["ema"][span], low)
    b = _norm(g, low)
    c = _norm(g - snap["g_prev"][span], low)
    d = float(snap["d"][k])
    t = torch.tensor([a, b, c, d], dtype=torch.float32)
    raw = float(dynamic_alpha(t[0], t[1], t[2], t[3], config, wd))
    if raw >= 1:
        return R.CAT_GE1, None
    if raw <= 0:
        return R.CAT_LE0, None
    if math.isnan(raw):
        return R.CAT_NAN, None
    return (R.CAT_JUMP if raw > R.JUMP else R.CAT_DYN), raw


def _bin(alpha: float) -> int:
    return min(R.N_BINS - 1, max(0, math.floor((math.log10(alpha) + R.DECADES) * R.BINS_PER_DECADE)))


def _hand_run(formula, ema_dtype, steps=40, seed=0):
    """Drive the reference backend; by hand before each update, the category of every
    tensor-update; after it, the α applied must be the hand α (or the fallback)."""
    config = _config(formula, ema_dtype)
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen).to(_dtype(ema_dtype)) for s in SHAPES]
    engine = DEMA(params, config)
    counts, hist = [0] * R.N_CAT, [0] * R.N_BINS
    real_update = engine.update

    offsets = [0]
    for p in params:
        offsets.append(offsets[-1] + p.numel())
    spans = [slice(a, b) for a, b in zip(offsets[:-1], offsets[1:])]

    def update():
        snap = engine_snapshot(engine)  # one group (one dtype): its flat buffers in parameter order
        hand = [_hand_category(config, snap, spans[k], k, p, p.grad) for k, p in enumerate(params)]
        real_update()
        applied = engine.stats.alpha.tolist()
        for k, (cat, alpha) in enumerate(hand):
            counts[cat] += 1
            if alpha is not None:
                hist[_bin(alpha)] += 1
                assert applied[k] == alpha, (k, cat, alpha, applied[k])
            elif cat == R.CAT_SKIP:
                assert applied[k] == 0.0
            elif formula != "fixed":
                assert applied[k] == fallback_alpha(config)

    engine.update = update
    drive(engine, params, make_script(seed, len(SHAPES), steps, EVENTS), gen)
    return engine, counts, hist


@pytest.mark.parametrize("formula, ema_dtype", CASES)
def test_counts_equal_a_reference_by_hand(formula, ema_dtype):
    engine, counts, hist = _hand_run(formula, ema_dtype)
    report = engine.regime.read_total()
    assert report.counts == counts
    assert report.histogram == hist
    assert report.updates == 40 and report.tensor_updates == 40 * len(SHAPES)
    # the sequence reaches the categories this formula can produce
    assert counts[R.CAT_SKIP] and counts[R.CAT_START] and counts[R.CAT_DYN] + counts[R.CAT_JUMP]
    if formula == "official":
        assert counts[R.CAT_GE1] and counts[R.CAT_DYN]
    if formula == "paper":
        assert counts[R.CAT_LE0] and counts[R.CAT_JUMP]  # d = 0 right after a start; large jumps


@pytest.fixture
def backend_name(request, monkeypatch):
    name = request.param
    if name == "torch-pure":
        monkeypatch.setattr(cl_core.kernels.native, "function_for", lambda dtype: None)
        return "torch"
    return name


@pytest.mark.parametrize("backend_name, formula, ema_dtype", _cases(["torch", "torch-pure", "triton"]),
                         indirect=["backend_name"])
def test_every_backend_counts_as_the_reference(backend_name, formula, ema_dtype, monkeypatch):
    monkeypatch.setattr(R, "MAX_RING", 4)  # several folds of the ring
    steps = 12 if backend_name == "triton" else 40
    results = []
    for backend in ("reference", backend_name):
        gen = torch.Generator().manual_seed(1)
        params = [torch.randn(s, generator=gen).to(_dtype(ema_dtype)) for s in SHAPES]
        engine = DEMA(params, _config(formula, ema_dtype, backend))
        drive(engine, params, make_script(1, len(SHAPES), steps, EVENTS), gen)
        r = engine.regime.read_total()
        results.append((r.counts, r.histogram))
    assert results[0] == results[1]


def _optimizer_run(formula, ema_dtype, backend, fused, steps=20, after_step=None):
    """DEMAOptimizer(SGD) through gradients that come and go, repeat, vanish, or hold NaN."""
    gen = torch.Generator().manual_seed(2)
    dt = _dtype(ema_dtype)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dt)) for s in SHAPES]
    opt = DEMAOptimizer(torch.optim.SGD(params, lr=0.05, momentum=0.9), _config(formula, ema_dtype, backend),
                        fused=fused)
    prev = [None] * len(params)
    for events in make_script(2, len(SHAPES), steps, ("grad", "grad", "grad", "none", "same", "zero", "nan_grad")):
        for k, (p, ev) in enumerate(zip(params, events)):
            fresh = (torch.randn(p.shape, generator=gen) * 0.3).to(dt)
            p.grad = {"none": None, "zero": torch.zeros_like(p)}.get(ev, fresh)
            if ev == "same" and prev[k] is not None:
                p.grad = prev[k].clone()
            if ev == "nan_grad":  # a NaN gradient would poison the parameter through SGD: the EMA skips it
                p.grad = fresh.clone()
                p.grad.view(-1)[0] = float("nan")
            prev[k] = None if p.grad is None else p.grad.clone()
        opt.step()
        if after_step is not None:
            after_step(opt)
        with torch.no_grad():  # keep the parameters finite for the next step
            for p in params:
                p.nan_to_num_(0.0)
        opt.zero_grad(set_to_none=False)
    return opt


@pytest.mark.parametrize("backend, formula, ema_dtype", _cases(["torch", "triton"]))
def test_one_pass_counts_as_two_pass(backend, formula, ema_dtype, monkeypatch):
    """The fused step's counts: each step's categories and α bins against the α it applied
    (engine.stats, read after every step), and the categories against the generic path's
    (the trajectories agree to float tolerance only, so α's bins are not compared across)."""
    monkeypatch.setattr(R, "MAX_RING", 4)
    config = _config(formula, ema_dtype, backend)
    hist = [0] * R.N_BINS

    def check(opt):
        step = opt.engine.regime.read("step")
        alpha = opt.engine.stats.alpha.tolist()
        assert step.counts[R.CAT_SKIP] == alpha.count(0.0)
        if formula != "fixed":
            assert step.fallback == alpha.count(fallback_alpha(config))
        for a in alpha:
            if a != 0.0 and (formula == "fixed" or a != fallback_alpha(config)):
                hist[_bin(a)] += 1
        assert sum(step.counts) == len(SHAPES)

    steps = 8 if backend == "triton" else 20
    fused = _optimizer_run(formula, ema_dtype, backend, fused=True, steps=steps, after_step=check)
    assert fused._fused is not None and fused._fused.generic_steps == 0  # every step ran fused
    total = fused.engine.regime.read_total()
    assert total.histogram == [h - s for h, s in zip(hist, _start_bins(formula, config))]
    generic = _optimizer_run(formula, ema_dtype, backend, fused=False, steps=steps)
    assert total.counts == generic.engine.regime.read_total().counts
    assert total.counts[R.CAT_SKIP] and total.counts[R.CAT_START]


def _start_bins(formula, config):
    """The fixed formula's lazy start applies α = 1 − β without the formula setting it."""
    out = [0] * R.N_BINS
    if formula == "fixed":
        out[_bin(fixed_alpha(config))] = len(SHAPES)
    return out


@pytest.mark.parametrize("backend", ["torch", "torch-pure", pytest.param("triton", marks=slow)])
def test_updates_and_folds_make_no_host_sync(backend, monkeypatch):
    if backend == "torch-pure":
        monkeypatch.setattr(cl_core.kernels.native, "function_for", lambda dtype: None)
        backend = "torch"
    monkeypatch.setattr(R, "MAX_RING", 2)
    monkeypatch.setattr(R, "MIN_RING", 2)  # a fold every second update
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen) for s in SHAPES]
    engine = DEMA(params, DEMAConfig(backend=backend, formula="paper"))
    with CountSyncs() as mode:
        for t in range(5):
            for p in params:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
                p.grad = torch.randn(p.shape, generator=gen)
            params[1].grad = None if t == 2 else params[1].grad
            engine.update()
    assert mode.syncs == []
    assert engine.regime.read_total().tensor_updates == 5 * len(SHAPES)


def test_windows_are_independent_and_add_up():
    engine, _, _ = _hand_run("official", "float32", steps=12)
    first = engine.regime.read("log")
    assert first.tensor_updates == 12 * len(SHAPES) and first.updates == 12
    assert engine.regime.read("log").tensor_updates == 0  # nothing since
    task = engine.regime.read("task")  # another name: its own span, from the start
    assert task.counts == first.counts
    gen = torch.Generator().manual_seed(5)
    drive(engine, engine.params, make_script(5, len(SHAPES), 3), gen)
    later = engine.regime.read("log")
    total = engine.regime.read_total()
    assert later.updates == 3
    assert [x + y for x, y in zip(first.counts, later.counts)] == total.counts
    assert [x + y for x, y in zip(first.histogram, later.histogram)] == total.histogram


def test_copies_keep_counting_and_state_dict_leaves_them_out():
    engine, _, _ = _hand_run("paper", "float32", steps=10)
    del engine.update  # the hand check's wrapper (a local function) is not picklable
    counts = engine.regime.read_total().counts
    for twin in (copy.deepcopy(engine), pickle.loads(pickle.dumps(engine))):
        assert twin.regime.read_total().counts == counts
    assert not any("regime" in k for k in engine.state_dict())


def test_quantiles_within_half_a_bin():
    alphas = torch.tensor([0.003] * 10 + [0.02] * 80 + [0.4] * 10)
    cat = torch.where(alphas > R.JUMP, R.CAT_JUMP, R.CAT_DYN)
    c = R.count(cat, alphas).tolist()
    report = R.RegimeReport("official", c[:R.N_CAT], c[R.N_CAT:R.N_CAT + R.N_BINS], updates=100)
    q10, q50, q90 = report.quantiles()
    half_bin = 10 ** (0.5 / R.BINS_PER_DECADE)
    for got, want in ((q10, 0.003), (q50, 0.02), (q90, 0.02)):
        assert want / half_bin <= got <= want * half_bin
    assert report.jump_share == 0.1 and report.fallback_share == 0.0 and report.in_regime


def _report(formula, **counts):
    c = [0] * R.N_CAT
    for name, v in counts.items():
        c[R.CATEGORY_NAMES.index(name)] = v
    return R.RegimeReport(formula, c, [0] * R.N_BINS, updates=10)


def test_verdict_and_advice_name_the_cause():
    config = DEMAConfig()
    ge1 = _report("official", raw_ge1=80, start=8, dynamic=12)
    assert ge1.verdict() == "fallback" and ge1.dominant_cause() == R.CAT_GE1
    text = R.regime_advice(ge1, config)
    assert "88% of the updates sat at the fallback" in text and "≥ 1" in text and "formula='paper'" in text
    assert "docs/regime.md" in text
    start = R.regime_advice(_report("official", start=90, dynamic=10), config)
    assert "no previous gradient" in start and "before zero_grad()" in start
    jumps = _report("paper", dynamic=30, jump=60, raw_le0=10)
    assert jumps.verdict() == "jumps" and "jumps" in R.regime_advice(jumps, DEMAConfig(formula="paper"))
    fine = _report("official", dynamic=90, jump=5, raw_ge1=5)
    assert fine.in_regime and R.regime_advice(fine, config) is None
    fixed = _report("fixed", start=90, dynamic=10)  # the lazy start is no fallback
    assert fixed.fallback == 0 and fixed.in_regime and "fallback_start" not in fixed.to_dict()


def test_lag_is_the_ema_distance_over_the_distance_travelled():
    p = torch.nn.Parameter(torch.zeros(4))
    engine = DEMA([p], DEMAConfig(formula="fixed", beta=0.5))
    engine.mark_start()
    assert engine.lag() is None  # θ has not moved
    for step in range(1, 4):
        with torch.no_grad():
            p.fill_(float(step))  # θ = 1, 2, 3
        p.grad = torch.ones(4)
        engine.update()
    # θ* = θ at the first update (1), then 1.5, then 2.25; θ = 3, θ_start = 0
    assert engine.lag() == pytest.approx(0.75 / 3.0)


def test_check_warns_once_over_the_whole_run_whatever_the_window(caplog):
    """Eight small tensors at the official constants: every α at the fallback. Reading the
    log window after every update (logging_steps=1) must not hide it: the judgement is over
    the run so far, once MIN_UPDATES updates and MIN_TENSOR_UPDATES tensor-updates were seen."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(8, 4, generator=gen)) for _ in range(8)]
    opt = DEMAOptimizer(torch.optim.AdamW(params, lr=1e-3), DEMAConfig())
    warned_at = []
    with caplog.at_level("WARNING", logger="cl_core.dema.regime"):
        for step in range(1, 13):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
            window = opt.engine.regime.read("log", check=step % 2 == 0)
            assert window.tensor_updates == 8  # one update of 8 tensors per window
            if step % 2:
                opt.engine.regime.check()
            if caplog.records and not warned_at:
                warned_at.append(step)
    assert warned_at == [R.MIN_UPDATES]
    assert len(caplog.records) == 1
    text = caplog.records[0].getMessage()
    assert "out of its regime" in text and "≥ 1" in text and "docs/regime.md" in text
    d = opt.engine.stats.to_dict()["regime"]
    assert d["fallback_share"] == 1.0 and d["in_regime"] is False and d["updates"] == 12


def test_records_round_trip_and_merge():
    engine, _, _ = _hand_run("paper", "float32", steps=12)
    a = engine.regime.read("task")
    a.lag = 0.25
    gen = torch.Generator().manual_seed(3)
    del engine.update
    drive(engine, engine.params, make_script(3, len(SHAPES), 6, EVENTS), gen)
    b = engine.regime.read("task")
    total = engine.regime.read_total()
    records = [json.loads(json.dumps(r.to_record())) for r in (a, b)]
    merged = R.RegimeReport.from_records(records)
    assert merged.counts == total.counts and merged.histogram == total.histogram and merged.updates == 18
    assert merged.lag == 0.25  # the mean over the records that have one
    assert R.RegimeReport.from_records(records[:1]).to_dict() == a.to_dict()
    with pytest.raises(ValueError, match="several formulas"):
        R.RegimeReport.from_records([records[0], {**records[1], "formula": "fixed"}])
