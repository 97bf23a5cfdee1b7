"""The cross-tile reduction of the Triton fused step with many tiles per tensor.

Each program of a step stores its tile's partial sums and takes its tensor's ticket
(an atomic counter); the program with the last ticket sums the tensor's partials, in
tile order, into the per-tensor totals the next launch reads (kernels/triton_fused.py,
`_close_tile`). Here, with the tile shrunk to 512 elements (the same kernel, more tiles:
a tensor of 66 tiles, past the 64 rows the reduction takes per iteration, and one of 3):

- the fused step equals the generic path with the reference DEMA backend over steps with
  a skipped (NaN) gradient and the paper formula (whose d comes from the totals);
- the totals are the float64 sums of the partials to float32 precision, and every ticket
  is back at 0 after a launch;
- (tests/kernels/test_program_order.py runs the same kernels with their programs
  reversed and shuffled, so that another program takes each tensor's last ticket, and
  asserts the same bits: the order of the sum does not depend on which program forms it;
  a second interpreted run at this size would double this test's ~12 CPU-s.)
"""
from __future__ import annotations

import pytest
import torch

from cl_core import DEMAConfig, DEMAOptimizer
from cl_core.kernels import layouts as L
from cl_core.kernels import triton_fused

TILE = 512  # fp32 aligned and general blocks are 512 elements: one loop iteration per tile
SHAPES = [(66, 512), (3 * 512 - 4,), (3, 8), (8,)]  # 66 and 3 tiles, then one tile each; all ALIGNED


def _run(fused: bool, backend: str, steps: int = 3):
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]
    opt = DEMAOptimizer(torch.optim.AdamW(params, lr=1e-2), DEMAConfig(backend=backend, formula="paper"), fused=fused)
    for t in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen) * 0.5
        if t == 1:
            # a skip decided from the totals' probe; AdamW then makes θ NaN (as torch does),
            # so the later steps skip it too
            params[3].grad.view(-1)[5] = float("nan")
        opt.step()
    return opt, params


def _outputs(opt, params):
    sd = opt.engine.state_dict()
    out = [p.detach().clone() for p in params] + [e.clone() for e in sd["ema"]]
    for p in params:
        out += [opt.inner.state[p][k].clone() for k in ("exp_avg", "exp_avg_sq")]
    return out + [sd[k].clone() for k in ("started", "has_prev", "d", "alpha", "skips")]


@pytest.fixture
def small_tiles(monkeypatch):
    monkeypatch.setattr(triton_fused, "TILE", TILE)


@pytest.mark.slow
def test_many_tiles_per_tensor_equal_the_reference(small_tiles):
    opt, params = _run(True, "triton")
    drv = opt._fused._drivers[0]
    assert opt._fused.generic_steps == 0 and drv._static_aligned
    assert drv.tile0 == [0, 66, 69, 70] and drv.n_tiles == 71
    # the totals the last step's last programs wrote: the float64 sums of its partials
    w = 1 - drv.parity
    tile = drv.tile0 + [drv.n_tiles]
    parts = drv.part[w].double()
    expect = torch.stack([parts[tile[k]:tile[k + 1]].sum(0) for k in range(len(SHAPES))])
    torch.testing.assert_close(drv.tot[w].double(), expect, rtol=3e-7, atol=1e-30, equal_nan=True)
    assert drv.tot[w, :3].isfinite().all() and drv.tot[w, 3, L.P_B].isnan()  # the probe of the NaN tensor
    assert drv.ticket.tolist() == [0] * len(SHAPES)
    fast = _outputs(opt, params)

    ref_opt, ref_params = _run(False, "reference")
    ref = _outputs(ref_opt, ref_params)
    n = len(SHAPES)
    for a, b in zip(fast[:4 * n], ref[:4 * n]):  # θ, θ*, m, v
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, equal_nan=True)
    started, has_prev, d, alpha, skips = fast[4 * n:]
    assert torch.equal(started, ref[4 * n]) and torch.equal(has_prev, ref[4 * n + 1])
    torch.testing.assert_close(d, ref[4 * n + 2], rtol=1e-5, atol=0)
    torch.testing.assert_close(alpha, ref[4 * n + 3], rtol=2e-3, atol=1e-6)
    assert skips.tolist() == ref[4 * n + 4].tolist() == [0, 0, 0, 2]
    assert (alpha[:3] > 0).all() and (d[:3] > 0).all()  # the dynamic formula ran on the others

