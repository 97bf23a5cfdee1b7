"""The fixed-β EMA (`formula="fixed"`) on the native CPU kernel (csrc/dema_cpu.c,
fixed_one_sweep_*): one sweep per tensor with a per-chunk finiteness probe and a backup of
θ* for the rare non-finite tensor; it reads no gradient and counts none missing (issue 28).
Checked against the reference backend, bit for bit, on shapes around the 4,096-element
chunk and past the 2^20-element backup limit (that tensor takes the two-sweep path)."""
from __future__ import annotations

import logging

import pytest
import torch

from cl_core import DEMA, DEMAConfig
from cl_core.kernels import native

pytestmark = pytest.mark.skipif(native.load("dema") is None, reason="no C compiler: the native kernels are not built")

SHAPES = [(4096,), (4097,), (3 * 4096 - 1,), (8, 11008), (7,), (0,), ((1 << 20) + 5,)]


def _run(backend, dtype, steps, poison=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g).to(dtype) for s in SHAPES]
    e = DEMA(params, DEMAConfig(formula="fixed", beta=0.9, backend=backend))
    history = []
    for step in range(steps):
        with torch.no_grad():
            for p in params:
                p.add_((0.1 * torch.randn(p.shape, generator=g)).to(dtype))
            if poison is not None and step == poison[0]:
                params[poison[1]].view(-1)[poison[2]] = float("nan")
        e.update()
        history.append([t.clone() for t in e.ema_tensors()])
        if poison is not None and step == poison[0]:
            with torch.no_grad():
                params[poison[1]].view(-1)[poison[2]] = 0.0
    return e, history


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fixed_ema_matches_the_reference(dtype):
    fast, hf = _run("torch", dtype, 4)
    ref, hr = _run("reference", dtype, 4)
    for step, (a, b) in enumerate(zip(hf, hr)):
        for i, (x, y) in enumerate(zip(a, b)):
            # 1 − β: a float32 in the kernel, a double in the reference (one float32 rounding)
            torch.testing.assert_close(x, y, rtol=2e-7, atol=1e-7, msg=f"step {step} tensor {SHAPES[i]}")
    torch.testing.assert_close(fast.stats.alpha, ref.stats.alpha)


@pytest.mark.parametrize("where", [0, 4096 * 2 + 17, 3 * 4096 - 2])
def test_a_non_finite_chunk_leaves_the_whole_tensor_untouched(where):
    """NaN in the first, a middle or the last chunk of a 3-chunk tensor: the chunks already
    updated are put back, bit for bit; the other tensors are updated; one skip is counted."""
    k = SHAPES.index((3 * 4096 - 1,))
    e, hist = _run("torch", torch.float32, 3, poison=(1, k, where))
    assert torch.equal(hist[1][k], hist[0][k])  # untouched at the poisoned step
    assert not torch.equal(hist[2][k], hist[1][k])  # and updated again after
    assert all(not torch.equal(hist[1][i], hist[0][i]) for i in range(len(SHAPES)) if i != k and SHAPES[i] != (0,))
    assert e.stats.nonfinite_skips.tolist() == [int(i == k) for i in range(len(SHAPES))]
    ref, hr = _run("reference", torch.float32, 3, poison=(1, k, where))
    for a, b in zip(hist[-1], hr[-1]):
        torch.testing.assert_close(a, b, rtol=2e-7, atol=1e-7)


def test_fixed_ema_reads_no_gradient_and_counts_none_missing(caplog):
    """A NaN gradient does not skip (1 − β needs none); no gradient at all is not 'missing'."""
    p = torch.randn(64)
    q = torch.randn(64)
    q.grad = torch.full((64,), float("nan"))
    e = DEMA([p, q], DEMAConfig(formula="fixed", beta=0.5))
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            with torch.no_grad():
                p.add_(1.0), q.add_(1.0)
            e.update()
    assert e.stats.missing_grads.tolist() == [0, 0]
    assert e.stats.nonfinite_skips.tolist() == [0, 0]
    assert not [r for r in caplog.records if "no gradient" in r.getMessage()]
    assert torch.isfinite(e.ema_tensors()[1]).all()
