"""`make gpu-check`: the one program for a machine with a CUDA GPU. Standalone (imports cl_core
from the checkout, installs nothing): every DEMA backend against the reference, memory probes
(guard bands, bitwise repeat, non-default stream, graph-capture refusal, a > 2^31-element
tensor), achieved bandwidth against a device-to-device copy, the CUDA tests of the suite and
compute-sanitizer where it exists. Full log to gpu_check.log; last, one table of every case.
On a machine without CUDA it prints one line and exits 0."""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import shutil
import subprocess
import sys
import time

log = logging.getLogger("gpu_check")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BAND = 256          # sentinel elements each side of every tensor
SENTINEL = 12345.0  # exactly representable in fp16/bf16/fp32


def missing_package(*names: str) -> "str | None":
    """The first of ``names`` that cannot be imported (a None sys.modules entry counts as missing)."""
    for name in names:
        if name in sys.modules and sys.modules[name] is None:
            return name
        try:
            importlib.import_module(name)
        except ImportError:
            return name
    return None


class Guarded:
    """Tensors as views into one buffer with a sentinel band before and after each, so a kernel
    that writes out of bounds is caught by ``check()`` instead of corrupting a neighbour silently."""

    def __init__(self, shapes, dtype, device, fill=None):
        import torch
        sizes = [int(torch.Size(s).numel()) for s in shapes]
        total = sum(sizes) + BAND * (len(sizes) + 1)
        self.buffer = torch.full((total,), SENTINEL, dtype=dtype, device=device)
        self.bands, self.tensors, at = [], [], BAND
        self.bands.append((0, BAND))
        for shape, n in zip(shapes, sizes):
            t = self.buffer[at:at + n].view(shape)
            if fill is not None:
                t.copy_(fill(shape))
            self.tensors.append(t)
            at += n
            self.bands.append((at, at + BAND))
            at += BAND

    def check(self) -> "str | None":
        """None when every band still holds the sentinel; else which band and how many elements changed."""
        for i, (a, b) in enumerate(self.bands):
            band = self.buffer[a:b]
            bad = int((band != SENTINEL).sum())
            if bad:
                return f"guard band {i} (elements {a}..{b}) has {bad} element(s) overwritten"
        return None


def format_table(rows) -> str:
    """rows: (case, status, detail) with status PASS/FAIL/SKIP; one aligned table."""
    head = ("case", "status", "detail")
    w0 = max(len(head[0]), *(len(r[0]) for r in rows)) if rows else len(head[0])
    lines = [f"{head[0]:<{w0}}  {head[1]:<6}  {head[2]}", f"{'-' * w0}  {'-' * 6}  {'-' * 6}"]
    lines += [f"{c:<{w0}}  {s:<6}  {d}" for c, s, d in rows]
    n = {s: sum(r[1] == s for r in rows) for s in ("PASS", "FAIL", "SKIP")}
    lines.append(f"gpu-check: {n['PASS']} PASS, {n['FAIL']} FAIL, {n['SKIP']} SKIP")
    return "\n".join(lines)


class Skip(Exception):
    """A case that cannot run here; its message is the one-line reason."""


def _shapes():
    return [(4096, 8), (8, 4096), (1000, 7), (33,), (8, 11008), (11008, 8)]


def _grads(torch, params, g=None):
    """Fresh gradients on every tensor: DEMA's α comes from the gradients (without them every
    tensor falls back to a fixed EMA and the check would not exercise the dynamic path)."""
    for p in params:
        p.grad = torch.randn(p.shape, generator=g, device=p.device).to(p.dtype)


def _engines(torch, dtype, ema_dtype, backends, steps=5, seed=0):
    """Runs the same parameter sequence through each backend; returns {backend: ema tensors}."""
    from cl_core import DEMA, DEMAConfig
    out = {}
    for backend in backends:
        g = torch.Generator(device="cuda").manual_seed(seed)
        params = [torch.randn(s, generator=g, device="cuda").to(dtype) for s in _shapes()]
        engine = DEMA(params, DEMAConfig(backend=backend, ema_dtype=ema_dtype))
        for _ in range(steps):
            _grads(torch, params, g)
            engine.update()
            with torch.no_grad():
                for p in params:
                    p.add_(torch.randn(p.shape, generator=g, device="cuda").to(dtype), alpha=0.01)
        torch.cuda.synchronize()
        out[backend] = [t.float().clone() for t in engine.ema_tensors()]
    return out


def case_dema_backends(torch):
    worst = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for ema_dtype in ("float32", "param"):
            res = _engines(torch, dtype, ema_dtype, ("reference", "torch", "triton"))
            for b in ("torch", "triton"):
                err = max(float((x - r).abs().max()) for x, r in zip(res[b], res["reference"]))
                worst.append(f"{b}/{str(dtype)[6:]}/{ema_dtype}={err:.2e}")
                log.info("DEMA %s dtype=%s ema_dtype=%s worst |err| vs reference %.3e", b, dtype, ema_dtype, err)
                if ema_dtype == "float32" and dtype == torch.float32 and err > 1e-5:
                    raise AssertionError(f"{b} fp32 worst error {err:.3e} vs reference")
    return "worst |err| vs reference: " + ", ".join(worst)


def case_concurrent_seeds(torch, seeds=16):
    for seed in range(seeds):
        res = _engines(torch, torch.float32, "float32", ("reference", "triton"), steps=2, seed=seed)
        for i, (x, r) in enumerate(zip(res["triton"], res["reference"])):
            if not torch.allclose(x, r, rtol=0, atol=1e-5):
                raise AssertionError(f"seed {seed} tensor {i}: triton differs from reference")
    return f"{seeds} seeds match the reference"


def case_repeat_bitwise(torch):
    a = _engines(torch, torch.bfloat16, "float32", ("triton",), seed=3)["triton"]
    b = _engines(torch, torch.bfloat16, "float32", ("triton",), seed=3)["triton"]
    if not all(torch.equal(x, y) for x, y in zip(a, b)):
        raise AssertionError("two identical runs differ bitwise")
    return "two runs bitwise equal"


def case_guard_bands(torch):
    from cl_core import DEMA, DEMAConfig
    for dtype in (torch.float32, torch.bfloat16):
        g = Guarded(_shapes(), dtype, "cuda", fill=lambda s: torch.randn(s, device="cuda"))
        engine = DEMA(g.tensors, DEMAConfig(backend="triton"))
        for _ in range(3):
            _grads(torch, g.tensors)
            engine.update()
            with torch.no_grad():
                for p in g.tensors:
                    p.mul_(0.99)
        engine.copy_to_params()
        torch.cuda.synchronize()
        bad = g.check()
        if bad:
            raise AssertionError(f"{dtype}: {bad}")
    return "bands untouched (fp32, bf16)"


def case_side_stream(torch):
    from cl_core import DEMA, DEMAConfig
    ref = _engines(torch, torch.float32, "float32", ("triton",), steps=1, seed=5)["triton"]
    g = torch.Generator(device="cuda").manual_seed(5)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        params = [torch.randn(sh, generator=g, device="cuda") for sh in _shapes()]
        engine = DEMA(params, DEMAConfig(backend="triton"))
        _grads(torch, params, g)
        engine.update()
        got = [t.float().clone() for t in engine.ema_tensors()]
    s.synchronize()
    if not all(torch.equal(x, y) for x, y in zip(got, ref)):
        raise AssertionError("a step on a non-default stream differs from the default-stream step")
    return "non-default stream matches bitwise"


def case_graph_capture(torch):
    from cl_core import DEMA, DEMAConfig
    params = [torch.randn(s, device="cuda") for s in _shapes()]
    engine = DEMA(params, DEMAConfig(backend="triton"))
    _grads(torch, params)
    engine.update()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            engine.update()
    except Exception as exc:  # the refusal we expect: one clear error
        return f"refused: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    raise AssertionError("a step inside torch.cuda.graph capture ran without error (no refusal)")


def case_big_tensor(torch):
    from cl_core import DEMA, DEMAConfig
    n = 2 ** 31 + 1024
    free, _ = torch.cuda.mem_get_info()
    need = n * 2 * 4  # fp16 param + fp32 θ* + fp32 g_prev + fp16 slack
    if free < need:
        raise Skip(f"needs ~{need / 2**30:.0f} GiB free, {free / 2**30:.0f} GiB free")
    p = torch.zeros(n, dtype=torch.float16, device="cuda")
    engine = DEMA([p], DEMAConfig(backend="triton"))
    p.grad = torch.ones_like(p)
    engine.update()
    p.fill_(1.0)
    engine.update()
    torch.cuda.synchronize()
    ema = engine.ema_tensors()[0]
    tail = ema[-4096:].float()
    if not torch.isfinite(tail).all() or float(tail.min()) <= 0:
        raise AssertionError("the elements past 2^31 were not updated")
    return f"{n} elements updated to the end"


def _ulp(a, b) -> int:
    """Largest distance in units in the last place between two fp32 tensors (bit patterns
    mapped to a monotone integer line, so -0.0 and 0.0 are 0 apart)."""
    import torch
    def line(t):
        i = t.float().contiguous().view(torch.int32).long()
        return torch.where(i < 0, -(i & 0x7FFFFFFF), i)
    return int((line(a) - line(b)).abs().max())


def case_fused_vs_adamw(torch, steps=5):
    """The fused optimizer+DEMA step's parameters against torch.optim.AdamW(fused=True)."""
    from cl_core import DEMAOptimizer
    g = torch.Generator(device="cuda").manual_seed(7)
    init = [torch.randn(s, generator=g, device="cuda") for s in _shapes()]
    mine = [torch.nn.Parameter(t.clone()) for t in init]
    theirs = [torch.nn.Parameter(t.clone()) for t in init]
    opt = DEMAOptimizer(torch.optim.AdamW(mine, lr=1e-2, weight_decay=0.1), fused=True)
    ref = torch.optim.AdamW(theirs, lr=1e-2, weight_decay=0.1, fused=True)
    for _ in range(steps):
        grads = [torch.randn(t.shape, generator=g, device="cuda") for t in init]
        for p, q, gr in zip(mine, theirs, grads):
            p.grad, q.grad = gr.clone(), gr.clone()
        opt.step()
        ref.step()
    torch.cuda.synchronize()
    if getattr(opt, "_fused", None) is not None and getattr(opt._fused, "generic_steps", 0):
        raise AssertionError(f"{opt._fused.generic_steps} of {steps} steps took the generic path, not the fused kernel")
    ulp = max(_ulp(p.detach(), q.detach()) for p, q in zip(mine, theirs))
    err = max(float((p.detach() - q.detach()).abs().max()) for p, q in zip(mine, theirs))
    return f"max {ulp} ulp (max |err| {err:.1e}) from torch AdamW(fused=True) after {steps} steps"


def case_launches(torch):
    """Triton launches per DEMA update and per fused step (JITFunction.run calls, as the suite's
    cuda_launches fixture counts them)."""
    from triton.runtime.jit import JITFunction
    from cl_core import DEMA, DEMAConfig, DEMAOptimizer
    n = {"n": 0}
    orig = JITFunction.run

    def counting(self, *a, **k):
        n["n"] += 1
        return orig(self, *a, **k)

    params = [torch.randn(s, device="cuda") for s in _shapes()]
    engine = DEMA(params, DEMAConfig(backend="triton"))
    _grads(torch, params)
    ps = [torch.nn.Parameter(torch.randn(s, device="cuda")) for s in _shapes()]
    opt = DEMAOptimizer(torch.optim.AdamW(ps, lr=1e-2), fused=True)
    for p in ps:
        p.grad = torch.randn_like(p)
    engine.update()
    opt.step()  # first calls compile and start lazily: count the steady state
    JITFunction.run = counting
    try:
        engine.update()
        dema = n["n"]
        n["n"] = 0
        opt.step()
        fused = n["n"]
    finally:
        JITFunction.run = orig
    return f"DEMA update {dema} launch(es), fused step {fused} launch(es), {len(_shapes())} tensors"


def _time(torch, fn, reps=20):
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / reps


def case_bandwidth(torch):
    from cl_core import DEMA, DEMAConfig
    n = 64 * 2 ** 20
    src, dst = torch.randn(n, device="cuda"), torch.empty(n, device="cuda")
    copy_bw = 8 * n / _time(torch, lambda: dst.copy_(src))
    params = [torch.randn(4096, 4096, device="cuda") for _ in range(4)]
    numel = sum(p.numel() for p in params)
    emas = [p.clone() for p in params]
    lerp_bw = 12 * numel / _time(torch, lambda: torch._foreach_lerp_(emas, params, 0.01))
    engine = DEMA(params, DEMAConfig(backend="triton"))
    _grads(torch, params)
    engine.update()
    dema_bw = 24 * numel / _time(torch, engine.update)
    from cl_core import DEMAOptimizer
    ps = [torch.nn.Parameter(p.clone()) for p in params]
    for p in ps:
        p.grad = torch.randn_like(p)
    opt = DEMAOptimizer(torch.optim.AdamW(ps, lr=1e-4), fused=True)
    # fp32 AdamW+DEMA in one pass: read p, g, m, v, θ*, g_prev; write p, m, v, θ*, g_prev
    fused_bw = 44 * numel / _time(torch, opt.step)
    return (f"copy {copy_bw / 1e9:.0f} GB/s; fused step {fused_bw / copy_bw:.2f}x copy, DEMA {dema_bw / copy_bw:.2f}x copy, "
            f"fixed-beta lerp {lerp_bw / copy_bw:.2f}x copy")


def case_pytest(torch):
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "tests",
           "tests/kernels/test_triton_compile.py"]
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    log.info("%s\n%s%s", " ".join(cmd), proc.stdout, proc.stderr)
    last = (proc.stdout.strip().splitlines() or ["(no output)"])[-1]
    if proc.returncode not in (0, 5):
        raise AssertionError(last)
    return last


def case_sanitizer(torch, tool):
    exe = shutil.which("compute-sanitizer")
    if exe is None:
        raise Skip("compute-sanitizer is not on PATH")
    code = ("import torch; from cl_core import DEMA, DEMAConfig; "
            "p=[torch.randn(s, device='cuda') for s in [(64,8),(8,64),(33,)]]; "
            "e=DEMA(p, DEMAConfig(backend='triton')); [setattr(t, 'grad', torch.randn_like(t)) for t in p]; e.update(); e.update(); torch.cuda.synchronize()")
    proc = subprocess.run([exe, "--tool", tool, "--error-exitcode", "3", sys.executable, "-c", code],
                          cwd=ROOT, capture_output=True, text=True, timeout=240)
    log.info("compute-sanitizer %s:\n%s%s", tool, proc.stdout, proc.stderr)
    if proc.returncode:
        raise AssertionError(f"compute-sanitizer --tool {tool} exit {proc.returncode}")
    return "no errors"


CASES = [  # (name, function, optional packages it needs)
    ("dema backends vs reference", case_dema_backends, ("triton",)),
    ("fused step vs torch AdamW(fused)", case_fused_vs_adamw, ("triton",)),
    ("launches per step", case_launches, ("triton",)),
    ("concurrent seeds vs reference", case_concurrent_seeds, ("triton",)),
    ("repeat runs bitwise", case_repeat_bitwise, ("triton",)),
    ("guard bands", case_guard_bands, ("triton",)),
    ("non-default stream", case_side_stream, ("triton",)),
    ("graph-capture refusal", case_graph_capture, ("triton",)),
    ("tensor > 2^31 elements", case_big_tensor, ("triton",)),
    ("bandwidth vs d2d copy", case_bandwidth, ("triton",)),
    ("pytest -m gpu + compile tests", case_pytest, ("pytest", "triton")),
    ("compute-sanitizer memcheck", lambda t: case_sanitizer(t, "memcheck"), ("triton",)),
    ("compute-sanitizer racecheck", lambda t: case_sanitizer(t, "racecheck"), ("triton",)),
]


def run_cases(torch, cases):
    rows = []
    for name, fn, needs in cases:
        miss = missing_package(*needs)
        if miss:
            print(f"gpu-check: SKIP {name}: {miss} is not installed", flush=True)
            rows.append((name, "SKIP", f"{miss} is not installed"))
            continue
        t0 = time.time()
        try:
            rows.append((name, "PASS", fn(torch)))
        except Skip as why:
            rows.append((name, "SKIP", str(why)))
        except Exception as exc:  # one case failing must not hide the others
            log.exception("case %s failed", name)
            rows.append((name, "FAIL", f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"))
        log.info("case %s: %s in %.1fs", name, rows[-1][1], time.time() - t0)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--log", default=os.path.join(ROOT, "gpu_check.log"), help="full log file")
    args = ap.parse_args(argv)
    import torch
    if not torch.cuda.is_available():
        print(f"gpu-check: no CUDA device visible to {sys.executable} (torch {torch.__version__}): nothing to check")
        return 0
    logging.basicConfig(filename=args.log, filemode="w", level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s")
    log.info("torch %s on %s", torch.__version__, torch.cuda.get_device_name())
    rows = run_cases(torch, CASES)
    table = format_table(rows)
    log.info("\n%s", table)
    print(f"gpu-check: full log in {args.log}\n{table}")
    return 1 if any(r[1] == "FAIL" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
