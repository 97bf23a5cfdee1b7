"""The CPU fused driver (cl_core/kernels/cpu_fused.py, csrc/fused_cpu.c): never the wrong memory,
named layouts shared with Python, pending statistics, tables built once.

Tolerances: fp32 runs compare with rtol 1e-5 / atol 1e-6 (one kernel against torch's
separate ops, a few ulps per step; as tests/fused/test_fused.py). bf16/fp16 parameters: within
2 ulps of the storage dtype per step (torch rounds some scalars to the storage dtype, the
kernel keeps them in fp32). The pending-statistics checks are exact: the same C rule
decides both.
"""
from __future__ import annotations

import copy

import pytest
import torch

from cl_core import DEMAConfig, DEMAOptimizer
from cl_core.kernels import layouts as L
from cl_core.kernels import native
from cl_core.kernels import cpu_fused
from cl_core.dema.onepass.cpu_driver import CpuFusedDriver
from tests.helpers import ULP, engine_snapshot

pytestmark = pytest.mark.skipif(native.load("fused") is None, reason="no C compiler: no native fused kernels")


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def _train(model, opt, steps, *, dtype=torch.float32, seed=1, before_step=None):
    gen = torch.Generator().manual_seed(seed)
    for t in range(steps):
        x = torch.randn(4, 6, generator=gen).to(dtype)
        model(x).pow(2).sum().backward()
        if before_step is not None:
            before_step(t)
        opt.step()
        opt.zero_grad()


def _drivers(opt):
    return opt._fused._drivers


def _close(a_list, b_list, tol):
    for i, (a, b) in enumerate(zip(a_list, b_list)):
        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol, msg=f"tensor {i}")


# ---------------------------------------------------------------------- named layouts
def test_layout_of_the_c_library_equals_python():
    lib = native.load("fused")
    table = cpu_fused.native_layout(lib)
    # the names the kernel decodes, each under its layouts.py name, one number each
    for name in ("H_LR", "H_WEIGHT_DECAY", "H_BETA1", "H_BETA2", "H_EPS", "H_MOMENTUM", "H_DAMPENING",
                 "H_NESTEROV", "S_PARAM", "S_EXP_AVG", "S_EXP_AVG_SQ", "S_EMA", "S_GRAD_PREV", "S_NUMEL",
                 "S_GROUP", "D_GRAD", "D_STEP", "D_FLAGS", "DF_HAS_GRAD", "DF_FIRST", "DS_A", "DS_B", "DS_C",
                 "DS_NONFINITE", "DS_D", "KIND_ADAM", "KIND_ADAMW", "KIND_SGD", "FORMULA_FIXED", "PEND_EMA"):
        assert table[name] == getattr(L, name), name
    assert table["N_CS"] == cpu_fused.N_CS
    assert sorted(v for k, v in table.items() if k.startswith("CS_")) == list(range(cpu_fused.N_CS))
    assert cpu_fused.layout_mismatches(lib) == []


def test_layout_check_catches_a_drift(monkeypatch):
    monkeypatch.setattr(L, "H_BETA2", 5)
    monkeypatch.setattr(cpu_fused, "CS_SKIPS", 7)
    bad = cpu_fused.layout_mismatches(native.load("fused"))
    assert any(b.startswith("H_BETA2: C 3, Python 5") for b in bad), bad
    assert any(b.startswith("CS_SKIPS: C 4, Python 7") for b in bad), bad


# ---------------------------------------------------------------------- never the wrong memory
def test_cpu_groups_run_the_cpu_fused_driver():
    model = _model()
    opt = DEMAOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2))
    _train(model, opt, 1)
    assert all(isinstance(d, CpuFusedDriver) for d in _drivers(opt))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("opt_name", ["adamw", "sgd"])
def test_dtype_changed_after_the_optimizer_was_built(dtype, opt_name):
    """DEMAOptimizer(AdamW(model.parameters())), then model.to(bf16), then training: the
    kernel runs for the new dtype and equals the generic path of a model converted first
    (this used to read bf16 storage as fp32 and corrupt the heap)."""
    make = {"adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
            "sgd": lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9)}[opt_name]
    steps = 6
    late = _model()
    opt = DEMAOptimizer(make(late.parameters()), fused=True)
    late.to(dtype)
    _train(late, opt, steps, dtype=dtype)
    assert opt._fused.generic_steps == 0  # rebuilt for the new dtype, still one pass
    early = _model().to(dtype)
    ref = DEMAOptimizer(make(early.parameters()), fused=False)
    _train(early, ref, steps, dtype=dtype)
    tol = 2 * steps * ULP[dtype]
    _close(list(late.parameters()), list(early.parameters()), tol)
    _close(opt.engine.ema_tensors(), ref.engine.ema_tensors(), tol)
    assert torch.equal(opt.engine.stats.nonfinite_skips, ref.engine.stats.nonfinite_skips)


def test_dtype_without_a_kernel_takes_the_generic_path(caplog):
    """model.to(float64) after the optimizer was built: no fused kernel for float64, so
    every step takes the generic path (logged once) and equals a model converted first."""
    late = _model()
    opt = DEMAOptimizer(torch.optim.AdamW(late.parameters(), lr=1e-2), fused=True)
    late.to(torch.float64)
    with caplog.at_level("WARNING", logger="cl_core.dema.onepass.step"):
        _train(late, opt, 4, dtype=torch.float64)
    assert opt._fused.generic_steps == 4
    fused_logs = [r.getMessage() for r in caplog.records if r.name == "cl_core.dema.onepass.step"]
    assert len(fused_logs) == 1 and "float64" in fused_logs[0]
    early = _model().to(torch.float64)
    ref = DEMAOptimizer(torch.optim.AdamW(early.parameters(), lr=1e-2), fused=False)
    _train(early, ref, 4, dtype=torch.float64)
    _close(list(late.parameters()), list(early.parameters()), 1e-12)
    _close(opt.engine.ema_tensors(), ref.engine.ema_tensors(), 1e-6)


def test_dtype_changed_mid_run_never_sweeps_the_old_layout():
    """After fused steps, model.to(bf16): torch's own AdamW state stays fp32, so the
    generic path raises torch's error; the fused path must not hand the kernel the fp32
    state as bf16: it takes the generic path and raises the same error."""
    errors = []
    emas = []
    for fused in (True, False):
        model = _model()
        opt = DEMAOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), fused=fused)
        _train(model, opt, 3)
        model.to(torch.bfloat16)
        with pytest.raises(RuntimeError) as err:
            _train(model, opt, 1, dtype=torch.bfloat16)
        errors.append(str(err.value))
        emas.append(opt.engine.ema_tensors())
    assert errors[0] == errors[1]
    # the fused path finished its pending EMA update from the bf16 parameters (exact in
    # fp32): at most α·(bf16 rounding of θ) ≈ 0.01·2^-8·|θ| away from the generic EMA
    _close(emas[0], emas[1], 1e-4)


def test_sgd_without_state_continues_fused_after_a_dtype_change():
    steps = 6
    runs = []
    for fused in (True, False):
        model = _model()
        opt = DEMAOptimizer(torch.optim.SGD(model.parameters(), lr=1e-2), fused=fused)
        _train(model, opt, 3)
        model.to(torch.bfloat16)
        _train(model, opt, steps - 3, dtype=torch.bfloat16, seed=2)
        runs.append((model, opt))
    (fm, fo), (gm, go) = runs
    assert fo._fused.generic_steps == 0
    tol = 2 * steps * ULP[torch.bfloat16]
    _close(list(fm.parameters()), list(gm.parameters()), tol)
    _close(fo.engine.ema_tensors(), go.engine.ema_tensors(), tol)


@pytest.mark.parametrize("when", ["between steps", "before an EMA read"])
def test_storage_replaced_mid_run(when):
    """`p.data = p.data.clone()` gives every parameter new storage: the tables are
    rewritten (the kernel never touches the freed storage) and results equal the generic path."""
    runs = []
    for fused in (True, False):
        model = _model()
        opt = DEMAOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1), fused=fused)
        reads = []

        def replace(t, model=model, opt=opt, reads=reads):
            if t in (2, 4):
                for p in model.parameters():
                    p.data = p.data.clone()
                if when == "before an EMA read":
                    reads.append([e.clone() for e in opt.engine.ema_tensors()])

        _train(model, opt, 6, before_step=replace)
        runs.append((model, opt, reads))
    (fm, fo, fr), (gm, go, gr) = runs
    assert fo._fused.generic_steps == 0
    _close(list(fm.parameters()), list(gm.parameters()), 1e-5)
    _close(fo.engine.ema_tensors(), go.engine.ema_tensors(), 1e-5)
    for a, b in zip(fr, gr):
        _close(a, b, 1e-5)


def test_model_moved_to_meta():
    """model.to("meta") cannot give the optimizer's Parameters meta storage (torch gives
    the module new Parameter objects): the optimizer and the EMA keep the CPU tensors,
    and fused and generic paths agree on the steps that follow."""
    runs = []
    for fused in (True, False):
        model = _model()
        params = list(model.parameters())
        opt = DEMAOptimizer(torch.optim.AdamW(params, lr=1e-2), fused=fused)
        _train(model, opt, 3)
        model.to("meta")
        assert all(p.device.type == "meta" for p in model.parameters())
        assert all(p.device.type == "cpu" for p in params)
        reads = [e.clone() for e in opt.engine.ema_tensors()]
        opt.step()  # no gradient on the optimizer's tensors any more: EMA only
        runs.append((params, opt, reads))
    (fp, fo, fr), (gp, go, gr) = runs
    assert fo._fused.generic_steps == 0
    _close(fr, gr, 1e-5)
    _close(fp, gp, 1e-5)
    _close(fo.engine.ema_tensors(), go.engine.ema_tensors(), 1e-5)


def test_prepare_refuses_resized_parameters_and_gradients():
    """A parameter given smaller storage (or a stale gradient of another size) would be
    swept past its end: prepare says why instead of running the kernel."""
    from cl_core.dema.onepass.step import StepBatch

    params = [torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(3, 2))]
    opt = DEMAOptimizer(torch.optim.AdamW(params, lr=1e-2), fused=True)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    drv = _drivers(opt)[0]
    hyper = torch.zeros(1, L.N_HYPER, dtype=torch.float64)
    consts = opt.engine.config.kernel_scalars()

    def prepare(grads):
        return drv.prepare(StepBatch(L.KIND_ADAMW, consts, hyper, grads, all(g is not None for g in grads)))

    assert prepare([torch.randn(5), torch.randn(3, 2)]) is None
    assert "size" in prepare([torch.randn(4), torch.randn(3, 2)])
    params[0].data = params[0].data[:4]
    assert "changed size" in prepare([torch.randn(4), torch.randn(3, 2)])
    params[0].data = torch.randn(5)
    params[1].data = params[1].data.t()
    assert "contiguous" in prepare([torch.randn(5), torch.randn(3, 2)])
    # the EMA update left pending by the step needs θ: a resized parameter is refused
    # with a sentence, the pending update kept for a later flush
    params[0].data = params[0].data[:4]
    with pytest.raises(RuntimeError, match="now has 4 elements"):
        drv.flush()
    assert drv.pending_stats() is not None
    params[0].data = torch.randn(5)
    drv.flush()
    assert drv.pending_stats() is None


def test_tables_are_built_once_and_rewritten_only_on_change(monkeypatch):
    model = _model()
    opt = DEMAOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), fused=True)
    builds = []
    orig = CpuFusedDriver._build

    def counting(self, ptrs, dtype):
        builds.append(dtype)
        return orig(self, ptrs, dtype)

    monkeypatch.setattr(CpuFusedDriver, "_build", counting)
    _train(model, opt, 1)
    first = len(builds)  # the first step builds (and again once torch's state exists)
    _train(model, opt, 4, seed=3)
    assert len(builds) == first
    for p in model.parameters():
        p.data = p.data.clone()
    _train(model, opt, 2, seed=4)
    assert len(builds) == first + 1


# ---------------------------------------------------------------------- pending statistics
@pytest.mark.parametrize("formula", ["official", "paper", "fixed"])
def test_pending_stats_equal_what_the_flush_records(formula):
    """After every fused step, pending_stats() (no EMA touched) gives the α and skip counts
    that the flush then records, bit for bit; with missing gradients and a NaN step."""
    params = [torch.nn.Parameter(torch.randn(s)) for s in [(5, 3), (4,), (1030,), (2, 2)]]
    opt = DEMAOptimizer(torch.optim.AdamW(params, lr=1e-2), DEMAConfig(formula=formula), fused=True)
    gen = torch.Generator().manual_seed(0)
    for t in range(8):
        for i, p in enumerate(params):
            p.grad = None if (t == 4 and i == 1) else torch.randn(p.shape, generator=gen)
        if t == 5:
            params[3].grad[0, 0] = float("nan")
        opt.step()
        drv = _drivers(opt)[0]
        before = engine_snapshot(opt.engine)
        pend = drv.pending_stats()
        again = drv.pending_stats()
        assert torch.equal(engine_snapshot(opt.engine)["ema"], before["ema"])  # nothing finished, nothing changed
        assert torch.equal(pend[0], again[0]) and torch.equal(pend[1], again[1])
        opt.engine.flush()
        state = engine_snapshot(opt.engine)
        assert torch.equal(pend[0], state["alpha"]), (t, pend[0], state["alpha"])
        assert torch.equal(pend[1], state["skips"]), t
        assert drv.pending_stats() is None  # flushed: nothing pending
    assert state["skips"][3] >= 1  # the NaN step was counted


def test_ema_in_the_parameter_dtype_is_never_swept_as_fp32():
    """DEMAConfig(ema_dtype="param") keeps θ* and g_prev in the parameter dtype; the CPU
    fused kernel sweeps them as that dtype (cpu_fused_*_param_*), never as fp32 (which
    would read garbage): the steps run fused, the buffers stay bf16, and the run equals
    fused=False within the bf16 tolerance of this module (tests/fused/test_cpu_fused_param.py
    checks the DEMA half bit for bit)."""
    config = DEMAConfig(ema_dtype="param")
    runs = []
    for fused in ("auto", False):
        model = _model().to(torch.bfloat16)
        opt = DEMAOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), config, fused=fused)
        _train(model, opt, 4, dtype=torch.bfloat16)
        runs.append((model, opt))
    (fm, fo), (gm, go) = runs
    assert fo.fused and fo._fused.generic_steps == 0
    assert _drivers(fo)[0]._fns[0].__name__ == "cpu_fused_step_param_bf16"
    assert engine_snapshot(fo.engine)["ema"].dtype == torch.bfloat16
    tol = 2 * 4 * ULP[torch.bfloat16]
    _close(list(fm.parameters()), list(gm.parameters()), tol)
    _close(fo.engine.ema_tensors(), go.engine.ema_tensors(), tol)


def test_optimizer_state_loaded_mid_run_is_followed():
    """opt.load_state_dict(...) replaces torch's exp_avg/exp_avg_sq tensors: the kernel
    must update the new ones (the old ones are freed), like the generic path."""
    runs = []
    for fused in (True, False):
        model = _model()
        opt = DEMAOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1), fused=fused)
        _train(model, opt, 3)
        old_state = [dict(st) for st in opt.state.values()]  # alive: the new tensors get new addresses
        opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # new state tensors, same values
        _train(model, opt, 3, seed=2)
        runs.append((model, opt))
        del old_state
    (fm, fo), (gm, go) = runs
    assert fo._fused.generic_steps == 0
    _close(list(fm.parameters()), list(gm.parameters()), 1e-5)
    _close(fo.engine.ema_tensors(), go.engine.ema_tensors(), 1e-5)
    for pf, pg in zip(fm.parameters(), gm.parameters()):
        _close([fo.state[pf]["exp_avg"], fo.state[pf]["exp_avg_sq"]], [go.state[pg]["exp_avg"], go.state[pg]["exp_avg_sq"]], 1e-5)


def test_tensors_split_over_threads_equal_one_thread(monkeypatch):
    """The runner hands each thread its own tensors (per-tensor state only): the same
    numbers as the generic path when the step is split over 3 threads."""
    monkeypatch.setattr(native.ShardedRunner, "MIN_PER_THREAD", 1)
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        runs = []
        for fused in (True, False):
            model = _model()
            opt = DEMAOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), DEMAConfig(formula="paper"), fused=fused)
            _train(model, opt, 5)
            runs.append((model, opt))
    finally:
        torch.set_num_threads(threads)
    (fm, fo), (gm, go) = runs
    assert len(_drivers(fo)[0].runner.shards) == 3
    _close(list(fm.parameters()), list(gm.parameters()), 1e-5)
    _close(fo.engine.ema_tensors(), go.engine.ema_tensors(), 1e-5)
    torch.testing.assert_close(fo.engine.stats.alpha, go.engine.stats.alpha, rtol=2e-3, atol=1e-5)



# ---------------------------------------------------------------------- betas that torch accepts, 0 included
@pytest.mark.parametrize("betas", [(0.0, 0.999), (0.9, 0.0), (0.0, 0.0), (0.5, 0.5), (0.9, 0.999)])
@pytest.mark.parametrize("opt_name", ["adamw", "adam"])
def test_fused_adam_with_zero_betas_equals_torch(opt_name, betas):
    """β1 = 0 or β2 = 0 (no moment averaging, bias correction 1) is valid for torch: the
    fused CPU step runs (no fallback) and its parameters and moments equal torch's own
    AdamW/Adam step; the EMA equals the generic path (torch's step, then a DEMA pass).
    The gradients are given, not computed from the parameters: with β2 = 0 the update is
    m / |g|, and a feedback through the model would amplify one ulp into any difference."""
    cls = torch.optim.AdamW if opt_name == "adamw" else torch.optim.Adam
    gen = torch.Generator().manual_seed(5)
    shapes = [(8, 6), (8,), (3, 8), (3,)]
    start = [torch.randn(s, generator=gen) for s in shapes]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(6)]

    def run(fused):
        params = [torch.nn.Parameter(x.clone()) for x in start]
        inner = cls(params, lr=1e-2, betas=betas, weight_decay=0.1)
        opt = inner if fused is None else DEMAOptimizer(inner, fused=fused)
        for step in grads:
            for p, g in zip(params, step):
                p.grad = g.clone()
            opt.step()
        return opt, params

    (fo, fp), (go, gp), (to, tp) = run(True), run(False), run(None)
    assert fo.fused and fo._fused.generic_steps == 0
    _close(fp, tp, 1e-5)
    for pf, pt in zip(fp, tp):
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(fo.state[pf][key], to.state[pt][key], rtol=1e-5, atol=1e-6, msg=key)
        assert float(fo.state[pf]["step"]) == float(to.state[pt]["step"]) == len(grads)
    _close(fo.engine.ema_tensors(), go.engine.ema_tensors(), 1e-5)
