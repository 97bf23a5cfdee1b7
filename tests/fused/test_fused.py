"""The one-pass fused optimizer + DEMA step equals the inner step + the generic DEMA.

fp32 tolerances: parameters and EMA rtol 1e-5 / atol 1e-6 (one kernel instead of
torch's separate ops: at most a few ulps per step); α rtol 2e-3 / atol 1e-5, because
late in the LR schedule a and d are sums of |θ − θ*| ≈ 1e-4 on θ ≈ 1, so a 1-ulp
difference in θ moves α by up to ~1e-3 relative (conditioning, not drift). bf16 parameters:
within 2 bf16 ulps per step (torch rounds some scalars to bf16, the kernels do not).
The Triton interpreter truncates instead of rounding on bf16 stores, so its bf16 check
runs 3 steps with a tolerance for that.
"""
from __future__ import annotations

import logging

import pytest
import torch

import cl_core.dema.regime as regime
from cl_core import DEMAConfig, DEMAOptimizer
from tests.helpers import ULP, engine_snapshot, make_params, optimizer_table
from tests.kernels.test_launches_and_syncs import CountSyncs

OPTIMIZERS = optimizer_table(["adamw", "adam-l2", "adam", "sgd-nesterov", "sgd-dampening", "sgd"])
SHAPES = [(3, 5), (1,), (1030,), (40, 8), (7,)]


def _run(fused, opt_name, *, formula="official", backend="torch", steps=20, dtype=torch.float32,
         nan_at=None, read_at=(7,), shapes=SHAPES):
    params = make_params(shapes, dtype)
    # two param groups with their own hyper-parameters
    groups = [{"params": params[:2], "lr": 5e-3}, {"params": params[2:]}]
    opt = DEMAOptimizer(OPTIMIZERS[opt_name](groups), DEMAConfig(formula=formula, backend=backend), fused=fused)
    assert opt.fused == fused
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    gen = torch.Generator().manual_seed(1)
    reads = []
    for t in range(steps):
        for i, p in enumerate(params):
            p.grad = None if (t % 5 == 4 and i == 1) else (torch.randn(p.shape, generator=gen) * 0.5).to(dtype)
        if nan_at is not None and t == nan_at:
            params[3].grad[0, 0] = float("nan")
        opt.step()
        sched.step()
        if t in read_at:  # an EMA read in the middle flushes the pending update
            reads.append([e.clone() for e in opt.engine.ema_tensors()])
    return opt, params, reads


def _close(a_list, b_list, rtol, atol):
    for i, (a, b) in enumerate(zip(a_list, b_list)):
        torch.testing.assert_close(a.float(), b.float(), rtol=rtol, atol=atol, equal_nan=True, msg=f"tensor {i}")


def _compare(fused, generic, rtol=1e-5, atol=1e-6, alpha_rtol=2e-3, alpha_atol=1e-5):
    (fo, fp, fr), (go, gp, gr) = fused, generic
    _close(fp, gp, rtol, atol)
    _close(fo.engine.ema_tensors(), go.engine.ema_tensors(), rtol, atol)
    for a, b in zip(fr, gr):
        _close(a, b, rtol, atol)
    torch.testing.assert_close(fo.engine.stats.alpha, go.engine.stats.alpha, rtol=alpha_rtol, atol=alpha_atol)
    assert fo.engine.stats.nonfinite_skips.tolist() == go.engine.stats.nonfinite_skips.tolist()
    fs, gs = fo.engine.state_dict(), go.engine.state_dict()
    for key in ("started", "has_prev"):
        assert fs[key].tolist() == gs[key].tolist(), key
    torch.testing.assert_close(fs["d"], gs["d"], rtol=1e-4, atol=1e-4)
    # the optimizer state is torch's own and agrees too
    for p_f, p_g in zip(fp, gp):
        for k, v in go.inner.state[p_g].items():
            if isinstance(v, torch.Tensor) and v.numel() > 1:
                torch.testing.assert_close(fo.inner.state[p_f][k].float(), v.float(), rtol=rtol, atol=atol, equal_nan=True)


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("formula", ["official", "paper", "fixed"])
def test_native_fused_equals_generic(opt_name, formula):
    _compare(_run(True, opt_name, formula=formula), _run(False, opt_name, formula=formula))


@pytest.mark.parametrize("opt_name", ["adamw", "adam-l2", "sgd-nesterov"])
@pytest.mark.parametrize("formula", ["official", "paper"])
@pytest.mark.slow
def test_triton_fused_equals_generic(opt_name, formula):
    kw = dict(formula=formula, steps=9, read_at=(4,))
    _compare(_run(True, opt_name, backend="triton", **kw), _run(False, opt_name, backend="triton", **kw))


@pytest.mark.parametrize("opt_name,dtype", [("adamw", torch.float32), ("sgd-nesterov", torch.float32),
                                            ("adam", torch.float16)])
@pytest.mark.slow
def test_triton_fused_aligned_kernels_equal_generic(opt_name, dtype):
    """Every numel a multiple of 8 and every address 16-byte aligned: the ALIGNED kernels
    (128-bit accesses on a GPU) run, and equal the generic path."""
    shapes = [(3, 8), (16,), (4, 40), (8,)]
    kw = dict(backend="triton", steps=5, read_at=(2,), shapes=shapes, dtype=dtype)
    fused, generic = _run(True, opt_name, **kw), _run(False, opt_name, **kw)
    drv = fused[0]._fused._drivers[0]
    assert drv._static_aligned and drv.unaligned_steps == 0
    if dtype == torch.float32:
        _compare(fused, generic)
    else:  # fp16: a few ulps (the interpreter truncates 16-bit stores; see the module docstring)
        _close(fused[1], generic[1], rtol=8 * ULP[torch.float16], atol=8 * ULP[torch.float16])


@pytest.mark.parametrize("opt_name", ["adamw", "sgd-nesterov"])
@pytest.mark.slow
def test_bf16_parameters_fused_equal_generic_within_2_ulps_per_step(opt_name):
    steps = 10
    ulp = ULP[torch.bfloat16]
    fused, generic = _run(True, opt_name, dtype=torch.bfloat16, steps=steps), _run(False, opt_name, dtype=torch.bfloat16, steps=steps)
    _close(fused[1], generic[1], rtol=2 * steps * ulp, atol=2 * steps * ulp)
    _close(fused[0].engine.ema_tensors(), generic[0].engine.ema_tensors(), rtol=2 * steps * ulp, atol=2 * steps * ulp)
    tri = _run(True, opt_name, backend="triton", dtype=torch.bfloat16, steps=3, read_at=())
    ref = _run(False, opt_name, backend="triton", dtype=torch.bfloat16, steps=3, read_at=())
    _close(tri[1], ref[1], rtol=8 * ulp, atol=8 * ulp)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.slow
def test_nan_gradient_freezes_the_same_way(backend):
    kw = dict(backend=backend, steps=8, nan_at=3, read_at=())
    fused, generic = _run(True, "adamw", **kw), _run(False, "adamw", **kw)
    assert torch.isnan(fused[1][3]).any()  # AdamW itself carries the NaN on
    assert generic[0].engine.stats.nonfinite_skips[3] == 5
    _compare(fused, generic)


def test_checkpoint_mid_run_moves_to_the_generic_path():
    fused_opt, params, _ = _run(True, "adamw", steps=6, read_at=())
    sd = fused_opt.state_dict()  # flushes: the EMA in the checkpoint is current
    generic_opt, gparams, _ = _run(False, "adamw", steps=6, read_at=())
    _close(sd["dema"]["ema"], generic_opt.state_dict()["dema"]["ema"], 1e-5, 1e-6)
    # a fresh fused optimizer resumes from it and keeps matching the generic run
    resumed = DEMAOptimizer(torch.optim.AdamW([{"params": params[:2], "lr": 5e-3}, {"params": params[2:]}]), DEMAConfig())
    resumed.load_state_dict(sd)
    gen = torch.Generator().manual_seed(9)
    for _ in range(4):
        for p, q in zip(params, gparams):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.clone()
        resumed.step()
        generic_opt.step()
    _close(params, gparams, 1e-5, 1e-6)
    _close(resumed.engine.ema_tensors(), generic_opt.engine.ema_tensors(), 1e-5, 1e-6)


def test_unsupported_options_fall_back_with_a_reason(caplog):
    params = make_params(SHAPES)
    with caplog.at_level(logging.INFO, logger="cl_core.dema.onepass.step"):
        opt = DEMAOptimizer(torch.optim.AdamW(params, amsgrad=True))
    assert not opt.fused
    assert "amsgrad" in caplog.text
    with pytest.raises(ValueError, match="amsgrad"):
        DEMAOptimizer(torch.optim.AdamW(params, amsgrad=True), fused=True)
    assert not DEMAOptimizer(torch.optim.RMSprop(params)).fused
    mixed = torch.optim.Adam([{"params": params[:2], "decoupled_weight_decay": True}, {"params": params[2:]}],
                             weight_decay=0.1)
    with pytest.raises(ValueError, match="mix Adam's L2 and AdamW's decoupled"):
        DEMAOptimizer(mixed, fused=True)
    assert not DEMAOptimizer(torch.optim.AdamW(params), DEMAConfig(backend="reference")).fused
    assert DEMAOptimizer(torch.optim.AdamW(params)).fused


@pytest.mark.slow
def test_triton_fused_is_one_launch_per_step(launches):
    for n in (2, 64):
        params = [torch.nn.Parameter(torch.randn(4 + i % 3, 5)) for i in range(n)]
        opt = DEMAOptimizer(torch.optim.AdamW(params, lr=1e-3), DEMAConfig(backend="triton"))
        counts = []
        for _ in range(3):
            for p in params:
                p.grad = torch.randn_like(p)
            before = launches["n"]
            opt.step()
            counts.append(launches["n"] - before)
        assert counts == [1, 1, 1], (n, counts)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.slow
def test_fused_step_makes_no_host_sync(backend, monkeypatch):
    monkeypatch.setattr(regime, "MAX_RING", 2)  # the regime counters fold their ring every
    monkeypatch.setattr(regime, "MIN_RING", 2)  # second step: the fold must not sync either
    params = make_params([(6, 4)] * 12)
    opt = DEMAOptimizer(torch.optim.AdamW(params, lr=1e-3), DEMAConfig(backend=backend, formula="paper"))
    gen = torch.Generator().manual_seed(0)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    opt.step()  # the first step reads torch's CPU step counters once
    with CountSyncs() as mode:
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
    assert mode.syncs == []


@pytest.mark.slow
def test_triton_pending_stats_equal_the_flushed_decision():
    """After a fused step, the pending step's α and skip counts, decided on the device
    without finishing the EMA (so a read of the stats needs no flush), equal what the
    flush then records."""
    params = make_params(SHAPES)
    opt = DEMAOptimizer(OPTIMIZERS["adamw"](params), DEMAConfig(backend="triton", formula="paper"), fused=True)
    gen = torch.Generator().manual_seed(2)
    for t in range(5):
        for i, p in enumerate(params):
            p.grad = None if (t == 3 and i == 2) else torch.randn(p.shape, generator=gen)
        if t == 2:
            params[4].grad[0] = float("inf")
        opt.step()
        (alpha, skips), = opt._fused.pending_stats()
        ema_before = engine_snapshot(opt.engine)["ema"]
        assert torch.equal(engine_snapshot(opt.engine)["ema"], ema_before)  # nothing finished
        opt.engine.flush()
        stats = opt.engine.stats
        assert torch.equal(alpha, stats.alpha), t
        assert torch.equal(skips, stats.nonfinite_skips), t
    # the inf gradient makes AdamW write NaN into tensor 4: skipped at steps 2, 3 and 4
    assert stats.nonfinite_skips.tolist() == [0, 0, 0, 0, 3]
    assert opt._fused.pending_stats() == [None]  # nothing pending after a flush


# ---------------------------------------------------------------------- never the wrong memory
def _steps(opt, params, gen, n, change=None, at=None):
    for t in range(n):
        if change is not None and t == at:
            change(params)
        for p in params:
            p.grad = (torch.randn(p.shape, generator=gen) * 0.5).to(p.dtype)
        opt.step()


def _pair(backend, build_opt=lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1)):
    out = []
    for fused in (True, False):
        params = make_params(SHAPES)
        out.append((DEMAOptimizer(build_opt(params), DEMAConfig(backend=backend), fused=fused), params))
    return out


def _to_bf16(params):
    for p in params:
        p.data = p.data.to(torch.bfloat16)  # what model.to(torch.bfloat16) does to each parameter


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.slow
def test_dtype_change_after_construction_equals_the_generic_path(backend):
    """model.to(bf16) after the optimizer was built: the fused kernel must read bf16
    storage as bf16 (it rebuilds its tables or takes the generic path), never as fp32."""
    (fo, fp), (go, gp) = _pair(backend)
    _to_bf16(fp), _to_bf16(gp)
    steps = 3
    _steps(fo, fp, torch.Generator().manual_seed(3), steps)
    _steps(go, gp, torch.Generator().manual_seed(3), steps)
    ulp = ULP[torch.bfloat16]  # the interpreter truncates bf16 stores (see the module docstring)
    _close(fp, gp, rtol=8 * ulp, atol=8 * ulp)
    _close(fo.engine.ema_tensors(), go.engine.ema_tensors(), rtol=8 * ulp, atol=8 * ulp)
    assert all(p.dtype == torch.bfloat16 for p in fp)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.slow
def test_replaced_storage_is_followed(backend):
    """p.data = p.data.clone() between steps (and mid-pending EMA): the tables follow."""
    (fo, fp), (go, gp) = _pair(backend)

    def replace(params):
        for p in params[::2]:
            p.data = p.data.clone()

    _steps(fo, fp, torch.Generator().manual_seed(4), 6, replace, at=3)
    _steps(go, gp, torch.Generator().manual_seed(4), 6, replace, at=3)
    _close(fp, gp, 1e-5, 1e-6)
    _close(fo.engine.ema_tensors(), go.engine.ema_tensors(), 1e-5, 1e-6)
    old = fp[0].data_ptr()
    replace(fp)  # again, right before an EMA read: the flush reads the new storage
    assert fp[0].data_ptr() != old
    _close(fo.engine.ema_tensors(), go.engine.ema_tensors(), 1e-5, 1e-6)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.slow
def test_parameters_moved_to_another_device_are_never_read_at_old_addresses(backend, caplog):
    """Parameters moved (to meta: the other device there is without a GPU) after a fused
    step: the step refuses with a clear error instead of handing the kernels addresses
    of another device, and the pending EMA update is kept, not dropped."""
    (fo, fp), _ = _pair(backend)
    gen = torch.Generator().manual_seed(5)
    _steps(fo, fp, gen, 2)
    saved = [p.detach().clone() for p in fp]
    # what Module.to("meta") does with torch.__future__.set_swap_module_params_on_conversion(True):
    # the same Parameter objects (the optimizer's) now live on another device
    for p in fp:
        p.grad = None
        torch.utils.swap_tensors(p, torch.nn.Parameter(p.detach().to("meta")))
        p.grad = torch.zeros_like(p)
    with caplog.at_level(logging.WARNING, logger="cl_core.dema.onepass.step"):
        with pytest.raises(RuntimeError, match="pending.*parameters"):
            fo.step()
    assert "no longer all on cpu" in caplog.text
    assert fo._fused.generic_steps == 1
    for p, d in zip(fp, saved):  # back on the CPU: the pending update is still there and finishes
        p.grad = None
        torch.utils.swap_tensors(p, torch.nn.Parameter(d))
    (go, gp), = [pair for pair in _pair(backend)[1:]]
    _steps(go, gp, torch.Generator().manual_seed(5), 2)
    _close(fo.engine.ema_tensors(), go.engine.ema_tensors(), 1e-5, 1e-6)


# ---------------------------------------------------------------------- CUDA (make gpu-check)
from tests.kernels.test_launches_and_syncs import CUDA_ALIGNED, CUDA_GENERAL, cuda  # noqa: E402


@cuda
@pytest.mark.parametrize("shapes", [CUDA_ALIGNED, CUDA_GENERAL], ids=["aligned", "general"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("opt_name", ["adamw", "adam-l2", "sgd-nesterov", "sgd-dampening"])
def test_cuda_fused_equals_generic(opt_name, dtype, shapes):
    """The compiled fused kernel against torch's optimizer + the generic DEMA, on CUDA.
    fp32: the tolerances of this module; bf16: 2 ulps per step (torch rounds some
    scalars to bf16, the kernel does not)."""
    def run(fused):
        gen = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, generator=gen).to("cuda", dtype)) for s in shapes]
        groups = [{"params": params[:2], "lr": 5e-3}, {"params": params[2:]}]
        opt = DEMAOptimizer(OPTIMIZERS[opt_name](groups), DEMAConfig(backend="triton", formula="paper"), fused=fused)
        for t in range(8):
            for i, p in enumerate(params):
                p.grad = None if (t == 4 and i == 1) else (torch.randn(p.shape, generator=gen) * 0.5).to("cuda", dtype)
            opt.step()
        return opt, params

    (fo, fp), (go, gp) = run(True), run(False)
    assert fo.fused and fo._fused.generic_steps == 0
    if dtype == torch.float32:
        tol = dict(rtol=1e-5, atol=1e-6)
    else:
        tol = dict(rtol=16 * 2.0**-7, atol=16 * 2.0**-7)
    _close(fp, gp, **tol)
    _close(fo.engine.ema_tensors(), go.engine.ema_tensors(), **tol)
    torch.testing.assert_close(fo.engine.stats.alpha, go.engine.stats.alpha, rtol=2e-3 if dtype == torch.float32 else 5e-2, atol=1e-5)


@cuda
def test_cuda_inner_fused_adamw_survives_a_generic_step():
    """AdamW(fused=True) inside (the Trainer's adamw_torch_fused): torch keeps its step
    counters on the GPU; a step that takes the generic path (forced here) hands them
    back there, and the run still equals the generic path."""
    def run(fused):
        gen = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, generator=gen).cuda()) for s in CUDA_ALIGNED]
        inner = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, fused=True)
        opt = DEMAOptimizer(inner, DEMAConfig(backend="triton"), fused=fused)
        for t in range(5):
            for p in params:
                p.grad = (torch.randn(p.shape, generator=gen) * 0.5).cuda()
            if t == 2 and opt.fused:
                opt._step_generic_because("forced by the test")
            else:
                opt.step()
        return opt, params

    (fo, fp), (go, gp) = run("auto"), run(False)
    assert fo._fused.generic_steps == 1
    _close(fp, gp, 1e-5, 1e-6)
    _close(fo.engine.ema_tensors(), go.engine.ema_tensors(), 1e-5, 1e-6)
    assert all(float(fo.inner.state[p]["step"]) == 5 for p in fp)


@pytest.mark.parametrize("formula", ["official", "paper", "fixed"])
def test_stats_are_current_after_each_fused_step_without_a_flush(formula):
    # engine.stats after a fused step shows that step's α and skip counts, decided from
    # the pending state, so a logger reading them costs no flush; the EMA itself stays
    # one step behind.
    def make(fused):
        params = make_params(SHAPES)
        opt = DEMAOptimizer(OPTIMIZERS["adamw"]([{"params": params}]), DEMAConfig(formula=formula), fused=fused)
        return opt, params

    (fo, fp), (go, gp) = make(True), make(False)
    gen = torch.Generator().manual_seed(3)
    for t in range(8):
        grads = [torch.randn(p.shape, generator=gen) for p in fp]
        if t == 5:
            grads[2][0] = float("nan")  # counted as a skip at this very step
        for ps in (fp, gp):
            for p, g in zip(ps, grads):
                p.grad = g.clone()
        fo.step()
        go.step()
        f, g = fo.engine.stats, go.engine.stats
        assert fo.engine.update_pending, "reading stats must not finish the EMA update"
        torch.testing.assert_close(f.alpha, g.alpha, rtol=2e-3, atol=1e-5, msg=f"step {t}")
        assert f.nonfinite_skips.tolist() == g.nonfinite_skips.tolist(), t
