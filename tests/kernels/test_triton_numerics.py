"""What a GPU and the Triton interpreter must agree on, checked under the interpreter:
bfloat16 stores rounded to nearest-even (the interpreter truncates a float32 -> bfloat16
cast, a GPU rounds), and 64-bit tile offsets for tensors of 2^31 elements or more.

The 2^31 case cannot be allocated here, so the kernels get crafted tables: a block table
(DEMA) or first-tile index (fused) that puts this program's block 2^31 elements into its
tensor, and a tensor address moved back by the same amount, so that the block lands on a
small real buffer. With 32-bit offsets the kernel would address 2^32 elements before it
(a crash, or stores before the tensor); each case runs in a subprocess for that reason.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from tests.helpers import ROOT

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")
from cl_core.kernels.triton_dema import to_f32, to_rtne  # noqa: E402  (needs triton)


@triton.jit
def store_bf16(x_ptr, out_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(out_ptr + offs, to_rtne(tl.load(x_ptr + offs), tl.bfloat16))


@triton.jit
def load_bf16(x_ptr, out_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(out_ptr + offs, to_f32(tl.load(x_ptr + offs)))


def test_bf16_loads_are_exact_subnormals_included():
    x = torch.tensor([1e-39, 9.2e-41, -1e-39, 1.0, -2.5, 3e38, float("inf"), 0.0, -0.0] + [2.0 ** -130] * 7
                     ).to(torch.bfloat16)
    out = torch.empty(x.numel())
    load_bf16[(1,)](x, out, N=x.numel())
    assert torch.equal(out.view(torch.int32), x.float().view(torch.int32))


def test_bf16_stores_round_to_nearest_even_as_torch():
    special = [1.999, -1.999, 1.0 + 2.0 ** -8, 1.0 + 3 * 2.0 ** -8, 3.3895314e38, -3.4e38, float("inf"),
               float("-inf"), float("nan"), 0.0, -0.0, 1e-40, -1e-40, 2.0 ** -133]
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([torch.tensor(special), torch.randn(1024 - len(special), generator=gen) * 100])
    out = torch.empty(1024, dtype=torch.bfloat16)
    store_bf16[(1,)](x, out, N=1024)
    want = x.to(torch.bfloat16)
    assert out[0].item() == 2.0 and want[0].item() == 2.0  # the case a truncating cast gets wrong (1.9921875)
    assert torch.equal(out.view(torch.int16)[~x.isnan()], want.view(torch.int16)[~x.isnan()])
    assert out[x.isnan()].isnan().all()


_OFFSET_SCRIPT = r'''
import sys, torch
sys.path.insert(0, ROOT)
import triton.language as tl
from cl_core.kernels import layouts as L

BIG = 2 ** 31  # elements before this program's block
which = sys.argv[1]
if which == "dema":
    from cl_core.kernels.triton_dema import _dema_apply_kernel, launch_shape, SWEEP_LAUNCH
    vec, block = launch_shape(4)
    th = torch.full((block,), 3.0)
    e = torch.full((block,), 1.0)
    g = torch.zeros(block)
    shift = BIG * 4  # bytes
    dyn = torch.tensor([[th.data_ptr() - shift], [g.data_ptr() - shift], [1]], dtype=torch.int64)
    e_tab = torch.tensor([e.data_ptr() - shift], dtype=torch.int64)
    gp = torch.zeros(block)
    gp_tab = torch.tensor([gp.data_ptr() - shift], dtype=torch.int64)
    blk_tensor = torch.zeros(1, dtype=torch.int32)
    blk0 = torch.tensor([-(BIG // block), 1], dtype=torch.int32)  # (pid - blk0) * BLOCK = 2^31
    numel = torch.tensor([BIG + block], dtype=torch.int64)
    mode = torch.tensor([L.MODE_EMA], dtype=torch.int8)
    alpha = torch.tensor([0.25])
    dpart = torch.zeros(1)
    _dema_apply_kernel[(1,)](blk_tensor, blk0, numel, dyn, e_tab, gp_tab, mode, alpha, dpart, 1, 0,
                             DTYPE=tl.float32, EMA_DTYPE=tl.float32, ALIGNED=True, VEC=vec, BLOCK=block,
                             **SWEEP_LAUNCH)
    assert torch.equal(e, torch.full((block,), 1.5)), e[:4]  # 0.75 * 1 + 0.25 * 3
    assert dpart.item() == 1.5 * block, dpart
else:
    from cl_core.kernels import triton_fused as F
    vec, block, iters = F.launch_shape(4, True)
    tile = block * iters
    th = torch.full((tile,), 3.0)
    e = torch.full((tile,), 1.0)
    shift = BIG * 4
    tiles_before = BIG // tile
    stab = torch.zeros(L.N_STATIC, 1, dtype=torch.int64)
    stab[L.S_EMA, 0] = e.data_ptr() - shift
    stab[L.S_NUMEL, 0] = BIG + tile
    stab[L.S_TILE0, 0] = -tiles_before  # (pid - t0) * TILE = 2^31
    theta = torch.tensor([th.data_ptr() - shift], dtype=torch.int64)
    tot_r = torch.zeros(1, L.N_PART)  # the tensor's totals from the last step: finite (the probe)
    part_w = torch.zeros(1, L.N_PART)
    flags_r = torch.zeros(L.N_FLAGS, 1, dtype=torch.int32)
    flags_r[L.F_PEND, 0] = L.PEND_EMA
    flags_r[L.F_STARTED, 0] = 1
    dcarry = torch.zeros(1)
    alpha, skips = torch.zeros(1), torch.zeros(1, dtype=torch.int64)
    # "fixed" formula: alpha = 1 - beta = 0.25 whatever the sums
    F._fused_flush_kernel[(1,)](torch.zeros(1, dtype=torch.int32), stab, theta, tot_r, part_w, flags_r, dcarry,
                                alpha, skips, 1, 1, L.FORMULA_FIXED, 1.0, 0.5, 0.75, DTYPE=tl.float32, ALIGNED=True,
                                EMA_IN_PARAM_DTYPE=False, VEC=vec, BLOCK=block, ITERS=iters,
                                **F.LAUNCH)
    assert torch.equal(e, torch.full((tile,), 1.5)), e[:4]
    assert part_w[0, L.P_D].item() == 1.5 * tile, part_w
print("OK")
'''


@pytest.mark.parametrize("which", ["dema", "fused"])
def test_blocks_past_2_to_the_31_elements_address_the_right_memory(which):
    env = dict(os.environ, TRITON_INTERPRET="1")
    code = "ROOT = %r\n" % str(ROOT) + textwrap.dedent(_OFFSET_SCRIPT)
    r = subprocess.run([sys.executable, "-c", code, which], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.strip().endswith("OK"), (
        f"exit {r.returncode}: {r.stdout[-2000:]}\n{r.stderr[-3000:]}")
