"""The one-pass AdamW + DEMA step with DEMAConfig(ema_dtype="param") on bf16/fp16 parameters.

θ* and g_prev in the parameter dtype (the official code's layout: half the EMA memory of
an fp32 EMA), every DEMA difference and sum rounded to it (csrc/fused_cpu.c,
cpu_fused_*_param_*). For each dtype, one optimizer step of:

    torch AdamW fused=True (baseline)             torch's best AdamW alone
    + cl_core generic DEMA, ema_dtype="float32"   optimizer step, then the engine's pass
    + cl_core generic DEMA, ema_dtype="param"     the same, θ* and g_prev in the dtype
    cl_core fused, ema_dtype="float32"            one pass, fp32 θ* and g_prev
    cl_core fused, ema_dtype="param"              one pass, θ* and g_prev in the dtype

Targets: the param-dtype fused step no slower than the two passes it replaces, and
within 2x the fp32-EMA fused step (it moves fewer bytes but rounds every DEMA result
and sums the statistics in element order, in double, to equal the engine bit for bit).

Run: `.venv/bin/python -m pytest bench/bench_fused_param.py -q --benchmark-only`.
"""
from __future__ import annotations

import pytest
import torch
from shapes import make_params, sweep_shapes

from cl_core import DEMAConfig, DEMAOptimizer
from cl_core.kernels import cpu_fused, native

SHAPES = sweep_shapes(2**22, 16)  # 4 M elements in 16 tensors
METHODS = ["adamw-fused", "generic-fp32-ema", "generic-param", "fused-fp32-ema", "fused-param"]
LABEL = {
    "adamw-fused": "torch AdamW fused",
    "generic-fp32-ema": "AdamW fused + cl_core generic DEMA (ema_dtype=float32)",
    "generic-param": "AdamW fused + cl_core generic DEMA (ema_dtype=param)",
    "fused-fp32-ema": "cl_core fused AdamW+DEMA (ema_dtype=float32)",
    "fused-param": "cl_core fused AdamW+DEMA (ema_dtype=param)",
}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_step(benchmark, report, device, dtype, method):
    if device != "cpu" or native.load("fused") is None:
        pytest.skip("the CPU fused kernels (this file measures the CPU path)")
    if dtype == torch.float16 and cpu_fused.kernels(dtype, dtype) is None:
        pytest.skip("compiler without _Float16: no fp16 kernels")
    params = [torch.nn.Parameter(p.detach()) for p in make_params(SHAPES, device, dtype=dtype)]
    for p, q in zip(params, make_params(SHAPES, device, dtype=dtype, seed=1)):
        p.grad = q.grad
    # eps=1e-3: representable in fp16 (1e-8 rounds to 0 there and the parameters turn NaN)
    hyper = dict(lr=1e-4, weight_decay=0.01, eps=1e-3)
    if method == "adamw-fused":
        opt = torch.optim.AdamW(params, fused=True, **hyper)
    elif method.startswith("generic"):
        ema = "param" if method == "generic-param" else "float32"
        opt = DEMAOptimizer(torch.optim.AdamW(params, fused=True, **hyper), DEMAConfig(ema_dtype=ema), fused=False)
    else:
        ema = "param" if method == "fused-param" else "float32"
        opt = DEMAOptimizer(torch.optim.AdamW(params, **hyper), DEMAConfig(ema_dtype=ema), fused=True)
    step = opt.step
    step()  # state allocation and the lazy EMA start stay outside the timing
    step()
    if method.startswith("fused"):
        assert opt.fused and opt._fused.generic_steps == 0
    benchmark.pedantic(step, rounds=9, warmup_rounds=1)
    group = f"AdamW+DEMA {str(dtype).replace('torch.', '')}"
    numel = sum(p.numel() for p in params)
    report.add(group, LABEL[method], benchmark, baseline=(method == "adamw-fused"), numel=numel,
               note=f"{len(SHAPES)} tensors, {numel / 1e6:.1f} M")
    report.want(f"[{group}] param fused / param generic", LABEL["fused-param"], LABEL["generic-param"], "<= 1.0",
                lambda r: r <= 1.0, group=group)
    report.want(f"[{group}] fp32-EMA fused / fp32-EMA generic", LABEL["fused-fp32-ema"], LABEL["generic-fp32-ema"],
                "<= 1.0", lambda r: r <= 1.0, group=group)
    report.want(f"[{group}] param fused / fp32-EMA fused", LABEL["fused-param"], LABEL["fused-fp32-ema"], "<= 2.0",
                lambda r: r <= 2.0, group=group)
