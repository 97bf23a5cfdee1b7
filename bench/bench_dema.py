"""One DEMA update over the LLaVA-7B LoRA shape set (rank 8: 448 tensors, 20.0 M fp32).

Compares, in one run: the reference backend (the official per-tensor loop), the
torch backend (native CPU kernels on CPU; pure torch elsewhere), the triton backend
(CUDA only) and the fixed-β `torch._foreach_lerp_` EMA, the cheapest possible EMA
(12 B/element against DEMA's 24: 2× is the floor for a separate DEMA pass).
"""
from __future__ import annotations

import pytest
import torch
from shapes import llava7b_lora_shapes, make_params

from cl_core import DEMA, DEMAConfig

GROUP = "DEMA update, LLaVA-7B LoRA r=8"
SHAPES = llava7b_lora_shapes(8)
NUMEL = sum(a * b for a, b in SHAPES)


def _sync(device):
    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


def _timed(fn, device):
    sync = _sync(device)

    def run():
        fn()
        sync()

    return run


@pytest.fixture(scope="module")
def params(device):
    return make_params(SHAPES, device)


def test_fixed_beta_lerp(benchmark, params, report, device):
    emas = [p.detach().clone() for p in params]
    benchmark.pedantic(_timed(lambda: torch._foreach_lerp_(emas, params, 0.01), device), rounds=9, warmup_rounds=2)
    report.add(GROUP, "fixed-β torch._foreach_lerp_", benchmark, baseline=True, numel=NUMEL, floor_bytes=12)


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
def test_dema_update(benchmark, params, report, device, backend):
    if backend == "triton" and device != "cuda":
        pytest.skip("the triton backend is benchmarked on CUDA (--device cuda)")
    engine = DEMA(params, DEMAConfig(backend=backend))
    engine.update()  # lazy start outside the timing
    rounds = 3 if backend == "reference" else 9
    benchmark.pedantic(_timed(engine.update, device), rounds=rounds, warmup_rounds=1)
    report.add(GROUP, f"DEMA backend={backend}", benchmark, numel=NUMEL, floor_bytes=24)
    report.want("torch backend speed-up over reference", "DEMA backend=reference", "DEMA backend=torch", ">= 4", lambda r: r >= 4)
    report.want("torch backend time / fixed-β lerp", "DEMA backend=torch", "fixed-β torch._foreach_lerp_", "<= 3 (floor 2)", lambda r: r <= 3)
    if backend == "triton":  # CUDA only: the GPU path's ratio (stats 16 + apply 20 B/elem: 36/12 = 3.0 on paper)
        report.want("triton backend time / fixed-β lerp", "DEMA backend=triton", "fixed-β torch._foreach_lerp_",
                    "<= 3.5 (paper 3.0, floor 2)", lambda r: r <= 3.5)


def test_first_call_warmup(benchmark, report, tmp_path):
    """Cold start of the torch backend: building the native kernels + the first update,
    in a fresh process with an empty kernel cache (target: under 5 s)."""
    import os
    import subprocess
    import sys
    import time

    code = (
        "import sys; sys.path.insert(0, 'bench');"
        "from shapes import llava7b_lora_shapes, make_params; from cl_core import DEMA;"
        "ps = make_params(llava7b_lora_shapes(8)); import time; t = time.perf_counter();"
        "DEMA(ps).update(); print(time.perf_counter() - t)"
    )
    env = dict(os.environ, CL_CORE_CACHE=str(tmp_path / "cache"))
    start = time.perf_counter()
    out = benchmark.pedantic(
        lambda: subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True),
        rounds=1, iterations=1,
    )
    first_update = float(out.stdout.strip().splitlines()[-1])
    report.add("warm-up", "first update() incl. native build, cold cache", first_update,
               note=f"whole process {time.perf_counter() - start:.1f} s")
    report.check("torch backend first-call warm-up, s", first_update, "< 5", lambda v: v < 5)
