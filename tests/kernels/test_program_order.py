"""No race between the programs of one launch: every Triton kernel gives
bit-identical results whatever order its programs run in.

On a GPU the programs of a launch run in any order and concurrently; the kernels are
written so that no program reads what another program of the same launch writes
(per-tensor flags and totals are double-buffered by step parity), except the fused step's
partials, which the program that takes its tensor's last ticket sums in a fixed order
(so a reordered launch only changes which program sums them, not the bits). The Triton
interpreter runs programs one by one in grid order; here its grid loop is patched to
run them reversed and shuffled, and every result (parameters, optimizer state, EMA,
α, skip counts, d, flags) must equal the in-order run exactly.
"""
from __future__ import annotations

import random
import sys

import pytest
import torch

from cl_core import DEMA, DEMAConfig, DEMAOptimizer
from tests.helpers import engine_snapshot, make_params, optimizer_table, state_tensors

ORDERS = ("reversed", "shuffled")


@pytest.fixture
def program_order(monkeypatch):
    """Set `program_order["mode"]` to "reversed" or "shuffled" to reorder the grid loop
    of every interpreted launch (only that loop: the interpreter's other loops keep `range`)."""
    from triton.runtime import interpreter

    grid_loop = interpreter.GridExecutor.__call__.__code__
    builtin_range = range
    state = {"mode": None, "rng": random.Random(1234)}

    def grid_range(*args):
        r = builtin_range(*args)
        if state["mode"] is None or sys._getframe(1).f_code is not grid_loop or len(r) < 2:
            return r
        order = list(r)
        if state["mode"] == "reversed":
            order.reverse()
        else:
            state["rng"].shuffle(order)
        return order

    monkeypatch.setattr(interpreter, "range", grid_range, raising=False)
    return state


def test_the_order_patch_reorders_programs(program_order):
    """The check can fail: programs record the order they ran in."""
    import triton
    import triton.language as tl

    @triton.jit
    def record(counter, out):
        tl.store(out + tl.program_id(0), tl.atomic_add(counter, 1))

    seen = {}
    for mode in (None, "reversed", "shuffled"):
        program_order["mode"] = mode
        counter, out = torch.zeros(1, dtype=torch.int32), torch.zeros(8, dtype=torch.int32)
        record[(8,)](counter, out)
        seen[mode] = out.tolist()
    assert seen[None] == list(range(8))
    assert seen["reversed"] == list(range(7, -1, -1))
    assert seen["shuffled"] != seen[None] and sorted(seen["shuffled"]) == list(range(8))


def _snapshot(engine, params, opt=None) -> list[torch.Tensor]:
    engine.ema_tensors()  # an EMA read: the flush and fold (canonicalize) kernels run too
    return state_tensors(engine, params, opt)


def _assert_identical(a, b, what):
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        # bit patterns, so that NaN == NaN and -0.0 != 0.0
        assert x.dtype == y.dtype and torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)), (what, i)


# Several blocks per tensor (DEMA blocks are 512 fp32 / 1,024 16-bit elements) and, for
# the fused kernels, more than one tile (16,384 elements) for the first tensor: programs
# of one tensor share its per-tensor state. Small otherwise: the interpreter is slow.
DEMA_GENERAL = [(3, 344), (1030,), (2, 3), (5,)]
DEMA_ALIGNED = [(3, 344), (1032,), (2, 4), (8,)]  # numels multiple of 8: the ALIGNED sweeps
# Fused tiles shrink to 1,024 elements here (monkeypatched TILE: the same code with more
# tiles per tensor and several loop iterations per tile, at interpreter speed).
SMALL_TILE = 1024
ALIGNED_SHAPES = [(2, 1032), (4, 8), (16,), (8,)]  # every numel a multiple of 8: the ALIGNED kernels
GENERAL_SHAPES = [(2, 1030), (3, 5), (7,), (5,)]


def _grads(params, gen, t):
    for i, p in enumerate(params):
        p.grad = None if (t == 2 and i == 2) else (torch.randn(p.shape, generator=gen) * 0.5).to(p.dtype)
    if t == 1:
        params[1].grad.view(-1)[0] = float("nan")  # a skipped tensor must stay skipped in any order


def _ema_buffer_dtype(dtype, ema_dtype):
    return dtype if ema_dtype == "param" else torch.float32


def _dema_run(dtype, formula, hook, shapes, ema_dtype="float32"):
    params = make_params(shapes, dtype)
    engine = DEMA(params, DEMAConfig(backend="triton", formula=formula, ema_dtype=ema_dtype), reduce_stats=hook)
    gen = torch.Generator().manual_seed(1)
    for t in range(3):
        with torch.no_grad():
            for p in params:
                p.add_((torch.randn(p.shape, generator=gen) * 0.1).to(dtype))
        _grads(params, gen, t)
        engine.update()
    assert engine_snapshot(engine)["ema"].dtype == _ema_buffer_dtype(dtype, ema_dtype)
    return _snapshot(engine, params), engine.groups[0].backend._aligned


@pytest.mark.parametrize("dtype,formula,hook,shapes", [
    (torch.float32, "paper", None, DEMA_ALIGNED),
    (torch.bfloat16, "official", lambda stats: None, DEMA_GENERAL),  # decide split around a hook
])
@pytest.mark.slow
def test_dema_kernels_do_not_depend_on_program_order(program_order, dtype, formula, hook, shapes):
    ref, aligned = _dema_run(dtype, formula, hook, shapes)
    assert aligned == (shapes is DEMA_ALIGNED)
    for mode in ORDERS:
        program_order["mode"] = mode
        _assert_identical(_dema_run(dtype, formula, hook, shapes)[0], ref, mode)


# AdamW with two parameter groups of their own learning rates
OPTIMIZERS = optimizer_table(["adamw", "adam-l2", "sgd-nesterov"], split_lr={"adamw": 5e-3},
                             changes={"adam-l2": {"lr": 3e-3}})


def _fused_run(opt_name, dtype, formula, shapes, ema_dtype="float32"):
    params = make_params(shapes, dtype)
    opt = DEMAOptimizer(OPTIMIZERS[opt_name](params), DEMAConfig(backend="triton", formula=formula,
                                                                  ema_dtype=ema_dtype), fused=True)
    gen = torch.Generator().manual_seed(1)
    pending = []
    for t in range(3):
        _grads(params, gen, t)
        opt.step()
        if t == 1:  # the on-device decision of the pending step, without a flush
            pending += [x.clone() for x in opt._fused.pending_stats()[0]]
    aligned = [drv._static_aligned for drv in opt._fused._drivers]
    assert opt._fused.generic_steps == 0       # every step ran the fused kernel
    assert engine_snapshot(opt.engine)["ema"].dtype == _ema_buffer_dtype(dtype, ema_dtype)
    return _snapshot(opt.engine, params, opt.inner) + pending, aligned


@pytest.mark.parametrize("opt_name,dtype,formula,shapes", [
    ("adamw", torch.float32, "paper", ALIGNED_SHAPES),
    ("adam-l2", torch.float16, "official", ALIGNED_SHAPES),
    ("sgd-nesterov", torch.bfloat16, "fixed", GENERAL_SHAPES),
])
@pytest.mark.slow
def test_fused_kernels_do_not_depend_on_program_order(program_order, monkeypatch, opt_name, dtype, formula, shapes):
    from cl_core.kernels import triton_fused

    monkeypatch.setattr(triton_fused, "TILE", SMALL_TILE)
    ref, aligned = _fused_run(opt_name, dtype, formula, shapes)
    assert aligned == [shapes is ALIGNED_SHAPES]
    for mode in ORDERS:
        program_order["mode"] = mode
        _assert_identical(_fused_run(opt_name, dtype, formula, shapes)[0], ref, mode)
