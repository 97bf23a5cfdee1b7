"""One DEMA update over the LLaVA-7B LoRA shape set (rank 8: 448 tensors, 20.0 M fp32).

Compares, in one run: the reference backend (the official per-tensor loop), the
torch backend (native CPU kernels on CPU; pure torch elsewhere), the triton backend
(CUDA only) and the fixed-β `torch._foreach_lerp_` EMA, the cheapest possible EMA
(12 B/element against DEMA's 24: 2× is the floor for a separate DEMA pass); and, on bf16
parameters, the exact official arithmetic (ema_dtype="param") against the fp32 EMA.
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


def test_dema_update_with_one_odd_tensor(benchmark, params, report, device):
    """448 LoRA tensors + one transposed 16x8 one: only the odd tensor may take a slower
    path (it once sent the whole group to pure torch: 12 ms -> 174 ms per update)."""
    if device != "cpu":
        pytest.skip("the odd-tensor path is the native CPU kernels'")
    odd = torch.randn(8, 16).t()
    odd.grad = torch.randn(16, 8)
    engine = DEMA([*params, odd], DEMAConfig(backend="torch"))
    engine.update()
    benchmark.pedantic(engine.update, rounds=9, warmup_rounds=1)
    report.add(GROUP, "DEMA backend=torch, + 1 transposed 16x8 tensor", benchmark, numel=NUMEL, floor_bytes=24)
    report.want("torch backend with one odd tensor / without", "DEMA backend=torch, + 1 transposed 16x8 tensor",
                "DEMA backend=torch", "<= 1.2", lambda r: r <= 1.2)


# Peak memory of the engine in a fresh process: RSS high-water mark (Linux VmHWM, reset
# through /proc/self/clear_refs) after three updates, minus the RSS before the engine,
# per byte of parameters. The EMA and g_prev alone are 2.0 for fp32 parameters.
_MEMORY_CODE = r"""
import sys; sys.path.insert(0, 'bench')
import torch
import cl_core.kernels.native as native
from shapes import llava7b_lora_shapes, make_params
from cl_core import DEMA, DEMAConfig
path = sys.argv[1]
if path == "pure":
    native.function_for = lambda dtype, prefix="dema_cpu": None
params = make_params(llava7b_lora_shapes(8))
if path == "odd":
    odd = torch.randn(8, 16).t(); odd.grad = torch.randn(16, 8); params.append(odd)
def kib(field):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(field))
before = kib("VmRSS")
open("/proc/self/clear_refs", "w").write("5")
if path == "lerp":
    emas = [p.detach().clone() for p in params]
    for _ in range(3):
        torch._foreach_lerp_(emas, params, 0.01)
else:
    engine = DEMA(params, DEMAConfig(backend="reference" if path == "reference" else "torch"))
    for _ in range(3):
        engine.update()
print((kib("VmHWM") - before) * 1024 / sum(p.numel() * p.element_size() for p in params))
"""


@pytest.mark.parametrize("path", ["lerp", "native", "odd", "pure", "reference"])
def test_engine_peak_memory(benchmark, report, device, path):
    """Peak bytes per parameter byte (CPU, Linux): the torch backend's native and pure-torch
    paths and the reference, against a fixed-β lerp EMA (1.0: its EMA copy)."""
    import os
    import subprocess
    import sys

    if device != "cpu" or not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("peak RSS is measured on Linux CPU runs")
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = benchmark.pedantic(  # one run in a fresh process (the benchmark fixture: --benchmark-only runs it)
        lambda: subprocess.run([sys.executable, "-c", _MEMORY_CODE, path], capture_output=True, text=True,
                               check=True, env=env, cwd=root),
        rounds=1, iterations=1,
    )
    ratio = float(out.stdout.strip().splitlines()[-1])
    names = {"lerp": "fixed-β lerp EMA", "native": "DEMA torch backend (native CPU)",
             "odd": "DEMA torch backend (native CPU) + 1 transposed tensor",
             "pure": "DEMA torch backend (pure torch)", "reference": "DEMA reference backend"}
    target = {"reference": "no target (the test oracle)", "lerp": "1.0 (its EMA copy)"}.get(path, "<= 3")
    ok = (lambda v: v <= 3.0) if target == "<= 3" else (lambda v: True)
    report.check(f"peak memory / parameter bytes, {names[path]}", ratio, target, ok)


BF16_GROUP = "DEMA update, LLaVA-7B LoRA r=8, bf16 parameters"


@pytest.mark.parametrize("ema_dtype", ["float32", "param"])
def test_official_bf16_arithmetic(benchmark, report, device, ema_dtype):
    """The exact official 16-bit arithmetic (ema_dtype="param": norms summed in float64 and
    rounded once, α's operations and the EMA's products rounded to bf16) against the fp32 EMA
    on the same bf16 parameters, on the device's fast backend (torch's native kernels on CPU,
    triton on CUDA, whose param mode accumulates in float64). The exact path is the only one
    "param" has; this ratio says what it costs."""
    params = make_params(SHAPES, device, dtype=torch.bfloat16)
    engine = DEMA(params, DEMAConfig(ema_dtype=ema_dtype, backend="auto"))
    engine.update()
    engine.update()  # past the lazy start and the first (fallback) update
    benchmark.pedantic(_timed(engine.update, device), rounds=9, warmup_rounds=1)
    backend = engine.groups[0].backend_name
    report.add(BF16_GROUP, f"ema_dtype={ema_dtype} ({backend})", benchmark, baseline=ema_dtype == "float32",
               numel=NUMEL)
    report.want("bf16: exact official arithmetic (param) / fp32 EMA", f"ema_dtype=param ({backend})",
                f"ema_dtype=float32 ({backend})", "<= 1.5 (moves 12 B/elem against 20)", lambda r: r <= 1.5,
                group=BF16_GROUP)
