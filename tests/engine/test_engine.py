"""DEMA engine: every backend against the reference, plus the edge cases of docs/design.md §2.

Tolerances (fp32 statistics, different summation orders): EMA rtol 1e-5 / atol 1e-6,
α atol 1e-5, d rtol 1e-4 (d is a large sum of small differences).
"""
from __future__ import annotations

import io

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cl_core.kernels.native
from cl_core import DEMA, DEMAConfig
from tests.dema_sequences import EVENTS, make_script, official_replica, play

FAST = ["torch", "torch-pure", "triton"]
SHAPES = [(3, 5), (1,), (1023,), (7, 3, 2), (1025,), (2, 1024)]


def _backend(name, monkeypatch):
    """'torch-pure' is the torch backend with the native CPU kernels switched off."""
    if name == "torch-pure":
        monkeypatch.setattr(cl_core.kernels.native, "function_for", lambda dtype: None)
        return "torch"
    return name


def assert_same(engine, ref, ema_rtol=1e-5, ema_atol=1e-6):
    for i, (a, b) in enumerate(zip(engine.ema_tensors(), ref.ema_tensors())):
        torch.testing.assert_close(a, b, rtol=ema_rtol, atol=ema_atol, msg=f"EMA of tensor {i}")
    s, r = engine.stats, ref.stats
    torch.testing.assert_close(s.alpha.cpu(), r.alpha.cpu(), rtol=0, atol=1e-5)
    assert s.nonfinite_skips.tolist() == r.nonfinite_skips.tolist()
    sd, rd = engine.state_dict(), ref.state_dict()
    assert sd["started"].tolist() == rd["started"].tolist()
    assert sd["has_prev"].tolist() == rd["has_prev"].tolist()
    torch.testing.assert_close(sd["d"], rd["d"], rtol=1e-4, atol=1e-5)
    for a, b in zip(sd["grad_prev"], rd["grad_prev"]):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("formula", ["official", "paper", "fixed"])
@pytest.mark.slow
def test_backends_match_reference_all_events(backend, formula, monkeypatch):
    script = make_script(seed=3, n_tensors=len(SHAPES), steps=9, events=EVENTS)
    script[0] = ["grad"] * len(SHAPES)
    ref, _ = play("reference", SHAPES, script, formula=formula)
    eng, _ = play(_backend(backend, monkeypatch), SHAPES, script, formula=formula)
    assert_same(eng, ref)
    assert sum(ref.stats.nonfinite_skips.tolist()) > 0  # the script did hit the guard


@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(
    sizes=st.lists(st.integers(1, 1100), min_size=1, max_size=5),
    steps=st.integers(1, 7),
    seed=st.integers(0, 10_000),
    formula=st.sampled_from(["official", "paper", "fixed"]),
    scale=st.sampled_from([2.0, 0.01, 500.0]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
)
@pytest.mark.slow
def test_random_sequences_match_reference(sizes, steps, seed, formula, scale, dtype):
    shapes = [(n,) for n in sizes]
    script = make_script(seed, len(shapes), steps, events=EVENTS)
    ref, _ = play("reference", shapes, script, formula=formula, dtypes=dtype, seed=seed, scale=scale)
    for backend in ("torch", "triton"):
        eng, _ = play(backend, shapes, script, formula=formula, dtypes=dtype, seed=seed, scale=scale)
        assert_same(eng, ref)


@pytest.mark.slow
def test_mixed_dtypes_in_one_list(monkeypatch):
    shapes = [(5, 4), (33,), (2, 2), (17,)]
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float32]
    script = make_script(7, len(shapes), 6, events=("grad", "none", "same"))
    ref, _ = play("reference", shapes, script, dtypes=dtypes)
    for backend in FAST:
        eng, params = play(_backend(backend, monkeypatch), shapes, script, dtypes=dtypes)
        assert len(eng.groups) == 3
        assert [e.dtype for e in eng.ema_tensors()] == [torch.float32] * 4
        assert_same(eng, ref)


def test_reference_equals_official_loop():
    """The reference is the official ICML update rule (finite inputs)."""
    gen = torch.Generator().manual_seed(11)
    params = [torch.randn(6, 4, generator=gen), torch.randn(9, generator=gen)]
    engine = DEMA(params, DEMAConfig(backend="reference"))
    seq_p, seq_g = [], []
    for t in range(8):
        for i, p in enumerate(params):
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
            p.grad = None if (t == 3 and i == 0) else torch.randn(p.shape, generator=gen) * (0.3 if t % 2 else 30)
        seq_p.append([p.clone() for p in params])
        seq_g.append([None if p.grad is None else p.grad.clone() for p in params])
        engine.update()
    expected = official_replica(seq_p, seq_g)
    for a, b in zip(engine.ema_tensors(), expected):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    # Several steps used the dynamic α (not only the fallback), so the test has teeth.
    assert engine.stats.alpha.tolist() != [0.01, 0.01]


def test_edge_cases_by_hand():
    p = torch.tensor([1.0, -2.0, 3.0])
    e = DEMA([p], DEMAConfig(backend="torch"))
    assert e.ema_tensors()[0].tolist() == p.tolist()  # before the first update: the params
    p.grad = torch.tensor([0.5, 0.5, 0.5])
    e.update()  # lazy start: θ* = θ, fallback α recorded
    assert e.ema_tensors()[0].tolist() == [1.0, -2.0, 3.0]
    assert e.stats.alpha.tolist() == pytest.approx([0.01])
    p.add_(1.0)
    e.update()  # same gradient again: c = 0, division by zero -> fallback
    assert e.stats.alpha.tolist() == pytest.approx([0.01])
    torch.testing.assert_close(e.ema_tensors()[0], torch.tensor([1.01, -1.99, 3.01]))
    p.grad = torch.tensor([0.0, 0.0, 1.0])
    p.add_(1.0)
    before = e.ema_tensors()[0].clone()
    e.update()  # a = 5.97, b = 1, c = 1.5: α = 2·2/(5.97·1.5)
    alpha = 2 * 2 / (float(torch.norm(p - before, p=1)) * 1.5)
    assert e.stats.alpha.tolist() == pytest.approx([alpha], rel=1e-6)
    torch.testing.assert_close(e.ema_tensors()[0], before * (1 - alpha) + p * alpha)
    p.grad = None
    e.update()  # no gradient: fallback, and no previous gradient afterwards
    assert e.stats.alpha.tolist() == pytest.approx([0.01])
    assert e.state_dict()["has_prev"].tolist() == [0]
    p.grad = torch.tensor([float("nan"), 0.0, 0.0])
    before = e.ema_tensors()[0].clone()
    e.update()  # non-finite: untouched and counted
    assert torch.equal(e.ema_tensors()[0], before)
    assert e.stats.nonfinite_skips.tolist() == [1] and e.stats.alpha.tolist() == [0.0]


@pytest.mark.parametrize("backend", ["reference", *FAST])
def test_nan_at_first_update_starts_later(backend, monkeypatch):
    p = torch.tensor([1.0, 2.0])
    e = DEMA([p], DEMAConfig(backend=_backend(backend, monkeypatch)))
    p.grad = torch.tensor([float("inf"), 0.0])
    e.update()
    assert e.state_dict()["started"].tolist() == [0]
    p.grad = torch.tensor([1.0, 1.0])
    p.add_(1.0)
    e.update()
    assert e.ema_tensors()[0].tolist() == [2.0, 3.0]
    assert e.stats.nonfinite_skips.tolist() == [1]


@pytest.mark.parametrize("backend", ["reference", *FAST])
def test_empty_list_and_empty_tensor(backend, monkeypatch):
    e = DEMA([], DEMAConfig(backend=_backend(backend, monkeypatch)))
    e.update()
    assert e.ema_tensors() == [] and e.num_updates == 1
    e2 = DEMA([], DEMAConfig())
    e2.load_state_dict(e.state_dict())
    z = torch.zeros(0)
    z.grad = torch.zeros(0)
    e3 = DEMA([z, torch.ones(3)], DEMAConfig(backend=_backend(backend, monkeypatch)))
    e3.update()
    e3.update()
    assert e3.ema_tensors()[1].tolist() == [1.0, 1.0, 1.0]


def test_non_contiguous_parameter_takes_the_generic_path():
    base = torch.randn(6, 4)
    params = [base.t(), torch.randn(5)]  # a transposed view is not contiguous
    ref_params = [p.clone() for p in params]
    e, r = DEMA(params, DEMAConfig(backend="torch")), DEMA(ref_params, DEMAConfig(backend="reference"))
    gen = torch.Generator().manual_seed(0)
    for _ in range(4):
        for p, q in zip(params, ref_params):
            step = torch.randn(p.shape, generator=gen)
            p.add_(step * 0.1), q.add_(step * 0.1)
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.clone()
        e.update(), r.update()
    assert_same(e, r)


@pytest.mark.parametrize("backend", ["reference", *FAST])
def test_swap_and_copy_to_params(backend, monkeypatch):
    shapes = [(4, 3), (5,)]
    eng, params = play(_backend(backend, monkeypatch), shapes, make_script(1, 2, 4), dtypes=[torch.float32, torch.bfloat16])
    live = [p.clone() for p in params]
    emas = [e.clone() for e in eng.ema_tensors()]
    with eng.swap():
        for p, e in zip(params, emas):
            assert torch.equal(p, e.to(p.dtype))
    for p, l in zip(params, live):
        assert torch.equal(p, l)
    eng.copy_to_params()
    for p, e in zip(params, emas):
        assert torch.equal(p, e.to(p.dtype))


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.slow
def test_state_dict_round_trip_continues_exactly(backend, monkeypatch):
    backend = _backend(backend, monkeypatch)
    shapes = [(3, 7), (1,), (1030,)]
    script = make_script(5, 3, 10, events=("grad", "none", "same", "nan_grad"))
    full, _ = play(backend, shapes, script, formula="paper")

    def checkpoint_and_resume(t, engine):
        if t != 4:
            return engine
        buf = io.BytesIO()
        torch.save(engine.state_dict(), buf)
        buf.seek(0)
        fresh = DEMA(engine.params, DEMAConfig(formula="paper", backend=backend))
        fresh.load_state_dict(torch.load(buf))
        return fresh

    resumed, _ = play(backend, shapes, script, formula="paper", between=checkpoint_and_resume)
    assert resumed is not full
    for a, b in zip(resumed.ema_tensors(), full.ema_tensors()):
        assert torch.equal(a, b)
    assert resumed.num_updates == full.num_updates == 10


def test_state_moves_between_backends(monkeypatch):
    shapes = [(9,), (4, 4)]
    script = make_script(2, 2, 5, events=("grad", "none"))
    src, params = play("torch", shapes, script)
    dst = DEMA(params, DEMAConfig(backend="triton"))
    dst.load_state_dict(src.state_dict())
    ref = DEMA(params, DEMAConfig(backend="reference"))
    ref.load_state_dict(src.state_dict())
    for p in params:
        p.grad = torch.randn_like(p)
        p.data.add_(0.1)
    dst.update(), ref.update()
    assert_same(dst, ref)


def test_bad_states_are_rejected_and_change_nothing():
    shapes = [(3, 2), (4,)]
    eng, params = play("torch", shapes, make_script(0, 2, 3), engine_kw={"names": ["lora_A", "lora_B"]})
    good = eng.state_dict()
    before = [e.clone() for e in eng.ema_tensors()]

    def broken(**change):
        sd = dict(good)
        sd.update(change)
        return sd

    cases = {
        "3 tensors": broken(shapes=good["shapes"] + [[1]]),
        "lora_B": broken(shapes=[good["shapes"][0], [5]]),
        "bfloat16": broken(dtypes=["float32", "bfloat16"]),
        "float64": broken(ema=[good["ema"][0].double(), good["ema"][1]]),
        "NaN": broken(ema=[torch.full((3, 2), float("nan")), good["ema"][1]]),
        "version": broken(version=99),
        "format": {"foo": 1},
    }
    for needle, sd in cases.items():
        with pytest.raises(ValueError, match=needle):
            eng.load_state_dict(sd)
        for a, b in zip(eng.ema_tensors(), before):
            assert torch.equal(a, b)


def test_config_errors_name_field_value_and_range():
    for kwargs, needle in [
        ({"scale": 0}, r"scale=0 .*scale > 0"),
        ({"scale": float("nan")}, r"scale=nan"),
        ({"fallback": 1.0}, r"fallback=1.0 .*0 < fallback < 1"),
        ({"fallback": 0}, r"fallback=0 "),
        ({"beta": 1.5}, r"beta=1.5 .*0 < beta < 1"),
        ({"formula": "nope"}, r"formula='nope'.*official, paper, fixed"),
        ({"backend": "cuda"}, r"backend='cuda'.*auto, triton, torch, reference"),
        ({"scale": "2"}, r"scale='2' must be a number"),
    ]:
        with pytest.raises(ValueError, match=needle):
            DEMAConfig(**kwargs)


def test_triton_backend_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="CUDA tensors"):
        DEMA([torch.ones(2)], DEMAConfig(backend="triton"))
    assert [g.backend_name for g in DEMA([torch.ones(2)], DEMAConfig(backend="auto")).groups] == ["torch"]


def test_params_given_as_named_pairs():
    a, b = torch.ones(2), torch.ones(3)
    e = DEMA([("x.lora_A", a), ("x.lora_B", b)])
    assert e.names == ["x.lora_A", "x.lora_B"]
    with pytest.raises(ValueError, match="same tensor twice"):
        DEMA([a, a])


def test_empty_local_shard_with_a_gradient_is_not_treated_as_missing():
    """An FSDP rank can hold 0 elements of a tensor but still have its (empty) gradient."""
    empty, full = torch.zeros(0), torch.randn(5)
    states = []
    for backend in ("reference", "torch"):
        e = DEMA([empty.clone(), full.clone()], DEMAConfig(backend=backend))
        for t in range(3):
            for p in e.params:
                p.grad = torch.randn(p.shape) if p.numel() else torch.zeros(0)
            e.update()
        states.append(e.state_dict())
    assert states[0]["has_prev"].tolist() == states[1]["has_prev"].tolist() == [1, 1]


def test_native_path_split_over_threads_matches_reference(monkeypatch):
    """The native kernels run tensor shards on several threads (set at engine creation)."""
    monkeypatch.setattr(cl_core.kernels.native.ShardedRunner, "MIN_PER_THREAD", 1)  # shard even tiny lists
    shapes = [(300,), (7, 9), (1,), (2048,), (33,)]
    script = make_script(4, len(shapes), 6, events=EVENTS)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        eng, _ = play("torch", shapes, script)
        assert len(eng.groups[0].backend._runner.shards) == 2
    finally:
        torch.set_num_threads(before)
    ref, _ = play("reference", shapes, script)
    assert_same(eng, ref)


def test_is_at_fallback_is_exact_float32_equality_and_never_for_a_fixed_ema():
    """One rule for "α sat at the fallback" (the log window, the report, the regime figures)."""
    from cl_core.dema.state import fallback_alpha, is_at_fallback

    cfg = DEMAConfig(fallback=0.01)
    fb = fallback_alpha(cfg)
    alpha = torch.tensor([fb, 0.01 * (1 + 1e-6), 0.5, 0.0], dtype=torch.float32)
    assert is_at_fallback(alpha, cfg).tolist() == [True, False, False, False]
    assert is_at_fallback(fb, cfg) and is_at_fallback(0.01, cfg) and not is_at_fallback(0.0100001, cfg)
    fixed = DEMAConfig(formula="fixed")
    assert not is_at_fallback(0.01, fixed) and not is_at_fallback(alpha, fixed).any()
