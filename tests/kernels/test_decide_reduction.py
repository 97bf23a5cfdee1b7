"""The reducing half of the Triton DEMA `decide` kernel (kernels/triton_dema.py) on a tensor
with more block partials than one loop iteration takes (CHUNK rows): the per-tensor sums
are the float64 sums of the partials to float32 precision, the NaN/inf probe of a row past
the first chunk is seen, the same bits come out twice, and `d` is read only where the
tensor was skipped (the flush's fold hands an uninitialised `d`: issue 28's initcheck).
Runs the kernel under the Triton interpreter (TRITON_INTERPRET=1, as the suite does)."""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None or os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs triton and TRITON_INTERPRET=1 (the suite's setting)")


def _decide(partials, dpart, blk0, mode, d):
    from cl_core.kernels import layouts as L
    from cl_core.kernels import triton_dema as K

    T = len(blk0) - 1
    stats = torch.full((T, L.N_DSTAT), float("nan"))
    u8 = lambda: torch.zeros(T, dtype=torch.uint8)  # noqa: E731
    K.dema_decide(torch.tensor(blk0, dtype=torch.int32), partials, dpart, stats, mode, u8(), u8(), d,
                  torch.zeros(T), torch.zeros(T, dtype=torch.int64), torch.zeros(3, T, dtype=torch.int64), T, 1,
                  0, 2.0, 0.01, 0.99, *K.DECIDE_REDUCE_ONLY, ema_dtype=torch.float32)
    return stats


def test_decide_sums_many_chunks_in_a_fixed_order():
    from cl_core.kernels import layouts as L
    from cl_core.kernels import triton_dema as K

    g = torch.Generator().manual_seed(0)
    n0 = 2 * K.CHUNK + 77  # three loop iterations, the last one partly masked
    blk0 = [0, n0, n0 + 3, n0 + 3]  # then a tensor of 3 blocks and an empty one
    rows = blk0[-1]
    partials = torch.rand(rows, L.N_STAT, generator=g) * 1000
    partials[:, L.ST_PROBE] = 0.0
    dpart = torch.rand(rows, generator=g)
    mode = torch.full((3,), L.MODE_EMA, dtype=torch.int8)
    d = torch.full((3,), 7.0)
    a = _decide(partials, dpart, blk0, mode, d.clone())
    b = _decide(partials, dpart, blk0, mode, d.clone())
    assert torch.equal(a, b)
    for t in range(3):
        lo, hi = blk0[t], blk0[t + 1]
        exact = partials[lo:hi].double().sum(0)
        for col, ds in ((L.ST_A, L.DS_A), (L.ST_B, L.DS_B), (L.ST_C, L.DS_C)):
            assert float(a[t, ds]) == pytest.approx(float(exact[col]), rel=1e-6, abs=1e-6)
        assert float(a[t, L.DS_D]) == pytest.approx(float(dpart[lo:hi].double().sum()), rel=1e-6, abs=1e-6)
        assert float(a[t, L.DS_NONFINITE]) == 0.0
    # a NaN probe in the third chunk of tensor 0 is seen; tensor 1 stays finite
    partials[2 * K.CHUNK + 5, L.ST_PROBE] = float("nan")
    c = _decide(partials, dpart, blk0, mode, d.clone())
    assert c[:, L.DS_NONFINITE].tolist() == [1.0, 0.0, 0.0]


def test_decide_keeps_d_for_a_skipped_tensor_only():
    from cl_core.kernels import layouts as L

    partials = torch.ones(4, L.N_STAT)
    partials[:, L.ST_PROBE] = 0.0
    dpart = torch.ones(4)
    mode = torch.tensor([L.MODE_SKIP, L.MODE_EMA], dtype=torch.int8)
    d = torch.tensor([5.0, float("nan")])  # the second is "uninitialised": must not be used
    out = _decide(partials, dpart, [0, 2, 4], mode, d)
    assert out[:, L.DS_D].tolist() == [5.0, 2.0]
