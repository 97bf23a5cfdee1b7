"""Every pointer a Triton launcher really passes is 16-byte aligned, as the compile tests
assume (tests/kernels/test_triton_compile.py marks every pointer argument of every
specialisation `tt.divisibility 16`, which is what Triton specialises a launch with when
the address is a multiple of 16; a launch with an unaligned table would run a kernel
that was never compiled or checked).

The launcher functions of kernels/triton_fused.py and kernels/triton_dema.py are wrapped
(the real launchers and kernels still run, under the interpreter): each call's arguments
are bound to the launcher's parameter names, and every argument the kernel's compile
signature (`compile_specs()`) types as a pointer must be a tensor whose data_ptr() is a
multiple of 16. Odd tensor counts (1, 3, 5, 7) are the sizes at which a plain
[2, rows, T] table puts its second half (flags[1], dcarry[1]) or the hyper-parameter rows
after a [3, T] int64 table at an address that is not.
"""
from __future__ import annotations

import inspect

import pytest
import torch

from cl_core import DEMA, DEMAConfig, DEMAOptimizer
from cl_core.kernels import layouts as L
from cl_core.kernels import triton_dema, triton_fused
from tests.kernels.test_triton_compile import aligned_pointer_args

# launcher -> the kernel it launches (whose compile signature says which arguments are pointers)
LAUNCHERS = {
    (triton_fused, "step"): triton_fused._fused_step_kernel,
    (triton_fused, "flush"): triton_fused._fused_flush_kernel,
    (triton_fused, "pending"): triton_fused._fused_pending_kernel,
    (triton_dema, "dema_stats"): triton_dema._dema_stats_kernel,
    (triton_dema, "dema_decide"): triton_dema._dema_decide_kernel,
    (triton_dema, "dema_apply"): triton_dema._dema_apply_kernel,
}


def _pointer_args():
    """{kernel: the argument names the compile test marks 16-byte aligned}, from the
    compile specs; one signature per kernel."""
    out = {}
    for _name, kernel, sig, *_ in triton_dema.compile_specs() + triton_fused.compile_specs(every=False):
        names = aligned_pointer_args(sig)
        assert out.setdefault(kernel, names) == names
    return out


@pytest.fixture
def passed(monkeypatch):
    """{launcher name: [(argument, data_ptr % 16), ...]} of every launch made."""
    pointers = _pointer_args()
    seen = {}
    for (module, name), kernel in LAUNCHERS.items():
        real = getattr(module, name)
        sig = inspect.signature(real)
        names = pointers[kernel]
        assert names <= set(sig.parameters), (name, names - set(sig.parameters))

        def wrapper(*args, _real=real, _sig=sig, _names=names, _name=name, **kwargs):
            bound = _sig.bind(*args, **kwargs)
            rec = seen.setdefault(_name, [])
            for arg in sorted(_names):
                x = bound.arguments[arg]
                assert isinstance(x, torch.Tensor), (_name, arg, type(x))
                rec.append((arg, x.data_ptr() % L.ALIGN_BYTES))
            return _real(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapper)
    return seen


def _unaligned(seen):
    return sorted({(name, arg, rem) for name, rec in seen.items() for arg, rem in rec if rem})


def test_the_alignment_check_can_fail(passed):
    """A table the launchers would get from a plain [2, 6, T] int32 allocation at T = 3."""
    flags = torch.zeros(2, L.N_FLAGS, 3, dtype=torch.int32)
    assert flags[1].data_ptr() % 16 == 8
    triton_fused.pending(torch.zeros(3, L.N_PART), flags[1], torch.zeros(3), torch.zeros(3),
                         torch.zeros(3, dtype=torch.int64), torch.zeros(3), torch.zeros(3, dtype=torch.int64), 3,
                         L.FORMULA_FIXED, 1.0, 0.5, 0.9, ema_dtype=torch.float32)
    assert _unaligned(passed) == [("pending", "flags_r", 8)]


@pytest.mark.parametrize("n", [1, 3, 5, 7])
def test_every_pointer_the_launchers_pass_is_16_byte_aligned(passed, monkeypatch, n):
    monkeypatch.setattr(triton_fused, "TILE", 1024)
    gen = torch.Generator().manual_seed(n)
    shapes = [(3 + k, 8) for k in range(n)]  # numels multiples of 8 (the ALIGNED kernels) ...
    shapes[-1] = (5,) if n > 1 else shapes[-1]  # ... and one odd one (the general path)
    # the fused step, its pending decision and its flush (with the fold through decide)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    opt = DEMAOptimizer(torch.optim.AdamW([{"params": params[:1]}, {"params": params[1:], "lr": 3e-3}], lr=1e-2),
                        DEMAConfig(backend="triton", formula="paper"), fused=True)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    opt._fused.pending_stats()
    opt.engine.ema_tensors()
    # the DEMA backend, with a reduce_stats hook (decide split in two) and a canonicalize
    thetas = [torch.randn(s, generator=gen) for s in shapes]
    engine = DEMA(thetas, DEMAConfig(backend="triton", formula="paper"), reduce_stats=lambda stats: None)
    for _ in range(2):
        for x in thetas:
            x.grad = torch.randn(x.shape, generator=gen)
        engine.update()
    engine.state_dict()
    assert set(passed) == {name for _, name in LAUNCHERS}
    assert _unaligned(passed) == []
