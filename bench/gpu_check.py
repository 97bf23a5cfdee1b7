"""`make gpu-check`: the one program for a machine with a CUDA GPU; every GPU path gets a
verdict in one run (target: under 5 minutes on an H100 with a cold Triton cache).

Standalone: it imports cl_core from the checkout and installs nothing. In order:

1. preflight: CUDA, a C compiler and `Python.h` (Triton builds its launcher with them at
   the first launch), free GPU memory; one line per missing piece;
2. correctness, each ASSERTED against cl_core's CPU reference (`backend="reference"` on
   CPU copies of the same parameters and gradients): the two-pass DEMA backend and the
   one-pass fused optimizer step, float32/bfloat16/float16 parameters, `ema_dtype`
   float32 (within float32 rounding) and "param" (bit for bit, as docs/fidelity.md
   promises), AdamW/Adam/SGD, formulas official/paper/fixed, tensors of several tiles and
   > 2^31 elements on both paths (SKIP where memory is short), generic steps interleaved
   with fused ones, a non-default stream, graph capture refused, guard bands, bitwise
   repeats;
3. compute-sanitizer memcheck (with PYTORCH_NO_CUDA_MEMORY_CACHING=1: the caching
   allocator hides writes inside its blocks), initcheck and racecheck on both paths;
4. the suite's CUDA tests (test_cuda_*) and the compile tests, only the files this stack
   can import (a file that cannot be collected is named, with why); zero tests run is a
   FAIL;
5. speed, as ratios in the same run: the fused step against torch `AdamW(fused=True)` on the
   448 LLaVA-7B LoRA r=8 tensors (fp32; bf16 with a float32 and a bf16 EMA), every
   path as a fraction of a measured device-to-device copy's bandwidth with the bytes it
   must move, host ms per step, the DEMA decide kernel on a 2^27-element tensor and the
   float64 cost of `ema_dtype="param"`.

Full log in gpu_check.log; the table of every case last. Exit status: 0 when nothing
FAILed, 1 otherwise. Without CUDA it prints one line and exits 0 (`--pytest-only` runs
stage 4 alone, which also works without a GPU)."""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import re
import shutil
import statistics
import subprocess
import sys
import sysconfig
import time

log = logging.getLogger("gpu_check")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BAND = 256          # sentinel elements each side of every tensor
SENTINEL = 12345.0  # exactly representable in fp16/bf16/fp32
COMPILE_TESTS = "tests/kernels/test_triton_compile.py"
# The device of the correctness cases. Only ever "cuda" in a real run; the comparisons
# against the CPU reference are also run on "cpu" under TRITON_INTERPRET=1 by
# tests/test_gpu_check.py, so that their own logic is exercised where no GPU is lent.
DEV = "cuda"


def _sync(torch):
    if DEV == "cuda":
        torch.cuda.synchronize()


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


class Skip(Exception):
    """A case that cannot run here; its message is the one-line reason."""


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
            bad = int((self.buffer[a:b] != SENTINEL).sum())
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


# ---------------------------------------------------------------------------- preflight
def preflight(torch) -> list:
    """One (what, problem) per missing piece; an empty list when the machine can run the checks."""
    problems = []
    if not torch.cuda.is_available():
        problems.append(("CUDA", f"no CUDA device visible to {sys.executable} (torch {torch.__version__})"))
        return problems
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        problems.append(("C compiler", "no C compiler (CC, cc, gcc or clang): Triton builds its launcher with one "
                                       "at the first launch (apt-get install gcc)"))
    header = os.path.join(sysconfig.get_paths()["include"], "Python.h")
    if not os.path.exists(header):
        problems.append(("Python.h", f"{header} is missing: Triton's launcher includes it "
                                     f"(apt-get install python{sys.version_info[0]}.{sys.version_info[1]}-dev)"))
    free, total = torch.cuda.mem_get_info()
    if free < 4 * 2 ** 30:
        problems.append(("GPU memory", f"{free / 2 ** 30:.1f} GiB free of {total / 2 ** 30:.0f} GiB; the checks need "
                                       "4 GiB (another process holds the GPU?)"))
    if missing_package("triton"):
        problems.append(("triton", "triton is not importable: every cl_core GPU path needs it"))
    return problems


# ---------------------------------------------------------------------------- helpers
SHAPES = [(4096, 8), (8, 4096), (1000, 7), (33,), (8, 11008), (3 * 16384 + 4,)]  # the last: 4 fused tiles
ULP = {"float32": 2.0 ** -23, "bfloat16": 2.0 ** -8, "float16": 2.0 ** -11}


def _dt(torch, name):
    return getattr(torch, name)


def _close(torch, got, want, rtol, atol, what):
    for i, (a, b) in enumerate(zip(got, want)):
        a, b = a.detach().float().cpu(), b.detach().float().cpu()
        if not torch.allclose(a, b, rtol=rtol, atol=atol, equal_nan=True):
            err = float((a - b).abs().nan_to_num(0).max())
            raise AssertionError(f"{what}: tensor {i} {tuple(a.shape)} differs by up to {err:.3e} "
                                 f"(rtol {rtol:.0e}, atol {atol:.0e})")


def _equal(torch, got, want, what):
    for i, (a, b) in enumerate(zip(got, want)):
        a, b = a.detach().cpu(), b.detach().cpu()
        if not torch.equal(a.view(torch.int16 if a.element_size() == 2 else torch.int32),
                           b.to(a.dtype).view(torch.int16 if a.element_size() == 2 else torch.int32)):
            n = int((a.float() != b.float()).sum())
            raise AssertionError(f"{what}: tensor {i} {tuple(a.shape)} not bit-equal ({n} element(s) differ)")


def _ema_check(torch, got_engine, ref_engine, ema_dtype, dtype, what):
    """θ* and α of a CUDA engine against the CPU reference: bit for bit with ema_dtype="param"
    (docs/fidelity.md), else within float32 rounding of the norms."""
    got, want = got_engine.ema_tensors(), ref_engine.ema_tensors()
    ga, ra = got_engine.stats.alpha.cpu(), ref_engine.stats.alpha.cpu()
    if ema_dtype == "param" and dtype != "float32":
        _equal(torch, got, want, f"{what} θ*")
        _equal(torch, [ga], [ra], f"{what} α")
    else:
        _close(torch, got, want, 1e-5, 1e-6, f"{what} θ*")
        _close(torch, [ga], [ra], 2e-3, 1e-5, f"{what} α")
    gs, rs = got_engine.stats.nonfinite_skips.cpu().tolist(), ref_engine.stats.nonfinite_skips.cpu().tolist()
    if gs != rs:
        raise AssertionError(f"{what}: skips {gs} against the reference's {rs}")


def _inputs(torch, shapes, dtype, steps, seed):
    """Per step: (θ, g) on the CPU, the same for every path; a missing gradient at step 3."""
    g = torch.Generator().manual_seed(seed)
    theta = [torch.randn(s, generator=g).to(dtype) for s in shapes]
    seq = []
    for t in range(steps):
        theta = [(x.float() + 0.05 * torch.randn(x.shape, generator=g)).to(dtype) for x in theta]
        grads = [(0.5 * torch.randn(x.shape, generator=g)).to(dtype) for x in theta]
        if t == 3:
            grads[1] = None
        seq.append(([x.clone() for x in theta], grads))
    return seq


# ---------------------------------------------------------------------------- two-pass backend
def _two_pass(torch, dtype, ema_dtype, formula, shapes=SHAPES, steps=5, seed=0):
    """(CUDA triton engine, CPU reference engine) after the same steps."""
    from cl_core import DEMA, DEMAConfig
    seq = _inputs(torch, shapes, _dt(torch, dtype), steps, seed)
    cuda = [x.clone().to(DEV) for x in seq[0][0]]
    cpu = [x.clone() for x in seq[0][0]]
    cfg = dict(ema_dtype=ema_dtype, formula=formula)
    eng = DEMA(cuda, DEMAConfig(backend="triton", **cfg))
    ref = DEMA(cpu, DEMAConfig(backend="reference", **cfg))
    for theta, grads in seq:
        for p, q, x, gr in zip(cuda, cpu, theta, grads):
            p.copy_(x), q.copy_(x)
            p.grad = None if gr is None else gr.to(DEV)
            q.grad = None if gr is None else gr.clone()
        eng.update(), ref.update()
    _sync(torch)
    return eng, ref


def case_two_pass(torch):
    n = 0
    for dtype in ("float32", "bfloat16", "float16"):
        for ema_dtype in ("float32", "param"):
            for formula in ("official", "paper", "fixed"):
                if dtype == "float32" and ema_dtype == "param":
                    continue
                eng, ref = _two_pass(torch, dtype, ema_dtype, formula)
                _ema_check(torch, eng, ref, ema_dtype, dtype, f"two-pass {dtype}/ema={ema_dtype}/{formula}")
                n += 1
    return f"{n} configurations x 5 steps match the CPU reference (param EMA bit for bit)"


# ---------------------------------------------------------------------------- one-pass fused step
KINDS = {  # (torch optimizer class name, kwargs)
    "adamw": ("AdamW", dict(lr=1e-2, weight_decay=0.1)),
    "adam": ("Adam", dict(lr=1e-2, weight_decay=0.01)),
    "sgd": ("SGD", dict(lr=1e-2, momentum=0.9, weight_decay=0.01)),
}


def _one_pass(torch, kind, dtype, ema_dtype, formula, shapes=SHAPES, steps=5, seed=1, generic_at=2):
    """The fused CUDA optimizer + DEMA against (a) torch's CPU optimizer for θ and (b) the CPU
    reference DEMA fed the CUDA run's own θ after every step, so that the EMA is compared
    on identical inputs. At step `generic_at` one gradient is non-contiguous: that step runs
    on the generic path (the fused step refuses it), between fused ones."""
    from cl_core import DEMA, DEMAConfig, DEMAOptimizer
    dt = _dt(torch, dtype)
    cls, kw = KINDS[kind]
    seq = _inputs(torch, shapes, dt, steps, seed)
    init = seq[0][0]
    mine = [torch.nn.Parameter(x.clone().to(DEV)) for x in init]
    theirs = [torch.nn.Parameter(x.clone()) for x in init]
    cfg = dict(ema_dtype=ema_dtype, formula=formula)
    opt = DEMAOptimizer(getattr(torch.optim, cls)(mine, **kw), DEMAConfig(backend="triton", **cfg), fused=True)
    cpu_opt = getattr(torch.optim, cls)(theirs, foreach=False, **kw)
    ref_params = [x.clone() for x in init]
    ref = DEMA(ref_params, DEMAConfig(backend="reference", **cfg))
    generic_before = opt._fused.generic_steps if opt._fused is not None else 0
    for t, (_, grads) in enumerate(seq):
        for p, q, gr in zip(mine, theirs, grads):
            if gr is None:
                p.grad = q.grad = None
                continue
            gc = gr.to(DEV)
            if t == generic_at and gc.dim() == 2:
                gc = gc.t().contiguous().t()  # same values, non-contiguous: the fused kernel cannot read it
            p.grad, q.grad = gc, gr.clone()
        opt.step()
        cpu_opt.step()
        with torch.no_grad():
            for r, p, gr in zip(ref_params, mine, grads):
                r.copy_(p.detach().cpu())
                r.grad = None if gr is None else gr.clone()
        ref.update()
    _sync(torch)
    generic = (opt._fused.generic_steps if opt._fused is not None else steps) - generic_before
    if generic != 1:
        raise AssertionError(f"{generic} generic steps of {steps}, expected exactly 1 (the non-contiguous gradient)")
    tol = 1e-5 if dtype == "float32" else 2 * steps * ULP[dtype]
    _close(torch, mine, theirs, tol, 1e-6 if dtype == "float32" else tol, f"one-pass {kind}/{dtype} θ vs torch CPU {cls}")
    return opt, ref


def case_one_pass(torch):
    n = 0
    combos = [(k, "float32", "float32", f) for k in KINDS for f in ("official", "paper", "fixed")]
    combos += [(k, d, e, "official") for k in KINDS for d in ("bfloat16", "float16") for e in ("float32", "param")]
    for kind, dtype, ema_dtype, formula in combos:
        opt, ref = _one_pass(torch, kind, dtype, ema_dtype, formula)
        _ema_check(torch, opt.engine, ref, ema_dtype, dtype, f"one-pass {kind}/{dtype}/ema={ema_dtype}/{formula}")
        n += 1
    return f"{n} configurations x 5 steps (1 generic between fused) match torch's CPU optimizer and the CPU reference"


def case_launches(torch):
    """Triton launches per DEMA update and per fused step (JITFunction.run calls)."""
    from triton.runtime.jit import JITFunction

    from cl_core import DEMA, DEMAConfig, DEMAOptimizer
    n = {"n": 0}
    orig = JITFunction.run

    def counting(self, *a, **k):
        n["n"] += 1
        return orig(self, *a, **k)

    params = [torch.randn(s, device="cuda") for s in SHAPES]
    engine = DEMA(params, DEMAConfig(backend="triton"))
    for p in params:
        p.grad = torch.randn_like(p)
    ps = [torch.nn.Parameter(torch.randn(s, device="cuda")) for s in SHAPES]
    opt = DEMAOptimizer(torch.optim.AdamW(ps, lr=1e-2), fused=True)
    for p in ps:
        p.grad = torch.randn_like(p)
    engine.update()
    opt.step()  # the first calls compile: count the steady state
    JITFunction.run = counting
    try:
        engine.update()
        dema, n["n"] = n["n"], 0
        opt.step()
        fused = n["n"]
    finally:
        JITFunction.run = orig
    if dema != 3 or fused != 1:
        raise AssertionError(f"DEMA update {dema} launches (expected 3), fused step {fused} (expected 1)")
    return f"DEMA update 3 launches, fused step 1, {len(SHAPES)} tensors"


def case_repeat_bitwise(torch):
    a, _ = _two_pass(torch, "bfloat16", "float32", "official", seed=3)
    b, _ = _two_pass(torch, "bfloat16", "float32", "official", seed=3)
    _equal(torch, a.ema_tensors(), b.ema_tensors(), "two-pass repeat")
    c, _ = _one_pass(torch, "adamw", "bfloat16", "float32", "paper", seed=3)
    d, _ = _one_pass(torch, "adamw", "bfloat16", "float32", "paper", seed=3)
    _equal(torch, c.engine.ema_tensors(), d.engine.ema_tensors(), "one-pass repeat")
    return "two identical runs bit-equal (two-pass and one-pass)"


def case_guard_bands(torch):
    from cl_core import DEMA, DEMAConfig, DEMAOptimizer
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        g = Guarded(SHAPES, dtype, "cuda", fill=lambda s: torch.randn(s, device="cuda"))
        engine = DEMA(g.tensors, DEMAConfig(backend="triton"))
        for _ in range(3):
            for p in g.tensors:
                p.grad = torch.randn(p.shape, device="cuda").to(dtype)
            engine.update()
            with torch.no_grad():
                for p in g.tensors:
                    p.mul_(0.99)
        engine.copy_to_params()
        torch.cuda.synchronize()
        bad = g.check()
        if bad:
            raise AssertionError(f"two-pass {dtype}: {bad}")
        g = Guarded(SHAPES, dtype, "cuda", fill=lambda s: torch.randn(s, device="cuda"))
        params = [torch.nn.Parameter(t) for t in g.tensors]  # share the guarded storage
        opt = DEMAOptimizer(torch.optim.AdamW(params, lr=1e-2), fused=True)
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, device="cuda").to(dtype)
            opt.step()
        opt.engine.copy_to_params()
        torch.cuda.synchronize()
        bad = g.check()
        if bad:
            raise AssertionError(f"one-pass {dtype}: {bad}")
    return "bands untouched (fp32, bf16, fp16; two-pass and one-pass)"


def case_side_stream(torch):
    from cl_core import DEMAOptimizer

    def run(stream):
        g = torch.Generator(device="cuda").manual_seed(5)
        with torch.cuda.stream(stream):
            ps = [torch.nn.Parameter(torch.randn(s, generator=g, device="cuda")) for s in SHAPES]
            opt = DEMAOptimizer(torch.optim.AdamW(ps, lr=1e-2), fused=True)
            for _ in range(2):
                for p in ps:
                    p.grad = torch.randn(p.shape, generator=g, device="cuda")
                opt.step()
            out = [t.clone() for t in opt.engine.ema_tensors()]
        stream.synchronize()
        return out

    from cl_core import DEMA, DEMAConfig

    def run_two_pass(stream):
        g = torch.Generator(device="cuda").manual_seed(6)
        with torch.cuda.stream(stream):
            ps = [torch.randn(s, generator=g, device="cuda") for s in SHAPES]
            e = DEMA(ps, DEMAConfig(backend="triton"))
            for _ in range(2):
                for p in ps:
                    p.grad = torch.randn(p.shape, generator=g, device="cuda")
                e.update()
            out = [t.clone() for t in e.ema_tensors()]
        stream.synchronize()
        return out

    default = torch.cuda.current_stream()
    side = torch.cuda.Stream()
    _equal(torch, run(side), run(default), "one-pass on a side stream")
    _equal(torch, run_two_pass(side), run_two_pass(default), "two-pass on a side stream")
    return "a side stream gives the default stream's bits (two-pass and one-pass)"


def case_graph_capture(torch):
    from cl_core import DEMA, DEMAConfig, DEMAOptimizer
    params = [torch.randn(s, device="cuda") for s in SHAPES]
    engine = DEMA(params, DEMAConfig(backend="triton"))
    for p in params:
        p.grad = torch.randn_like(p)
    engine.update()
    ps = [torch.nn.Parameter(torch.randn(s, device="cuda")) for s in SHAPES]
    opt = DEMAOptimizer(torch.optim.AdamW(ps, lr=1e-2), fused=True)
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.step()
    torch.cuda.synchronize()
    refusals = []
    for what, fn in (("two-pass update", engine.update), ("fused step", opt.step)):
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                fn()
        except Exception as exc:  # the refusal we expect: one clear error
            refusals.append(f"{what}: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}")
            continue
        raise AssertionError(f"a {what} inside torch.cuda.graph capture ran without error (no refusal)")
    return "; ".join(refusals)


# ---------------------------------------------------------------------------- > 2^31 elements
BIG = 2 ** 31 + 2 ** 16  # a multiple of the 4,096-element pattern row


def _patterned(torch, n, dtype, seed):
    """n elements: one random 4,096-element row repeated (built without an n-sized temporary)."""
    row = torch.randn(4096, generator=torch.Generator().manual_seed(seed)).to(dtype).cuda()
    t = torch.empty(n, dtype=dtype, device="cuda")
    t.view(-1, 4096).copy_(row.expand(n // 4096, 4096))
    return t


def _big_rows(t):
    """The first row, the row across element 2^31 and the last row."""
    k = 2 ** 31 // 4096
    return [t[:4096], t[(k - 1) * 4096:(k + 1) * 4096].view(2, 4096)[1], t[-4096:]]


def _need(torch, nbytes):
    free, _ = torch.cuda.mem_get_info()
    if free < 1.1 * nbytes + 2 ** 30:
        raise Skip(f"needs ~{(1.1 * nbytes + 2 ** 30) / 2 ** 30:.0f} GiB free, {free / 2 ** 30:.0f} GiB free")


def case_big_two_pass(torch):
    """fp16 parameters, fp16 EMA, the fixed formula (elementwise: every 4,096-row of the
    result must equal a 4,096-element tensor's run bit for bit); θ and θ* 2 B each."""
    from cl_core import DEMA, DEMAConfig
    _need(torch, 4 * BIG)
    cfg = DEMAConfig(backend="triton", formula="fixed", beta=0.9, ema_dtype="param")
    p = _patterned(torch, BIG, torch.float16, 0)
    small = p[:4096].clone()
    engines = [DEMA([p], cfg), DEMA([small], cfg)]
    for step in range(3):
        for e in engines:
            e.update()
        p.view(-1, 4096).add_(float(step + 1) * 0.01)
        small.add_(float(step + 1) * 0.01)
    torch.cuda.synchronize()
    want = engines[1].ema_tensors()[0]
    _equal(torch, _big_rows(engines[0].ema_tensors()[0]), [want] * 3, "two-pass > 2^31")
    return f"{BIG} elements: first, 2^31-straddling and last rows equal a small tensor's bits"


def case_big_one_pass(torch):
    """The fused AdamW step on one fp16 tensor of > 2^31 elements (θ, g, m, v, θ* 2 B each)."""
    from cl_core import DEMAConfig, DEMAOptimizer
    _need(torch, 10 * BIG)
    cfg = DEMAConfig(formula="fixed", beta=0.9, ema_dtype="param")
    big = torch.nn.Parameter(_patterned(torch, BIG, torch.float16, 1))
    small = torch.nn.Parameter(big.detach()[:4096].clone())
    opts = [DEMAOptimizer(torch.optim.AdamW([q], lr=1e-2), cfg, fused=True) for q in (big, small)]
    big.grad = _patterned(torch, BIG, torch.float16, 2)
    small.grad = big.grad[:4096].clone()
    for _ in range(3):
        for o in opts:
            o.step()
    torch.cuda.synchronize()
    if opts[0]._fused.generic_steps:
        raise AssertionError("the > 2^31 step took the generic path")
    _equal(torch, _big_rows(big.detach()), [small.detach()] * 3, "one-pass > 2^31 θ")
    _equal(torch, _big_rows(opts[0].engine.ema_tensors()[0]), [opts[1].engine.ema_tensors()[0]] * 3,
           "one-pass > 2^31 θ*")
    return f"{BIG} elements: θ and θ* rows at the start, across 2^31 and at the end equal a small tensor's bits"


# ---------------------------------------------------------------------------- compute-sanitizer
SANITIZED = r"""
import torch
from cl_core import DEMA, DEMAConfig, DEMAOptimizer
shapes = [(64, 8), (8, 64), (33,), (16384 + 4,)]
for dtype in (torch.float32, torch.bfloat16):
    for ema in ("float32", "param"):
        p = [torch.randn(s, device='cuda').to(dtype) for s in shapes]
        e = DEMA(p, DEMAConfig(backend='triton', ema_dtype=ema))
        for _ in range(2):
            for t in p:
                t.grad = torch.randn_like(t)
            e.update()
        e.ema_tensors()
        q = [torch.nn.Parameter(torch.randn(s, device='cuda').to(dtype)) for s in shapes]
        o = DEMAOptimizer(torch.optim.AdamW(q, lr=1e-2), DEMAConfig(ema_dtype=ema), fused=True)
        for _ in range(2):
            for t in q:
                t.grad = torch.randn_like(t)
            o.step()
        o.engine.ema_tensors()
        o.engine.stats
torch.cuda.synchronize()
"""


def case_sanitizer(torch, tool):
    exe = shutil.which("compute-sanitizer")
    if exe is None:
        cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
        exe = os.path.join(cuda_home, "bin", "compute-sanitizer")
        if not os.path.exists(exe):
            raise Skip("compute-sanitizer is not on PATH nor in $CUDA_HOME/bin")
    env = dict(os.environ, PYTORCH_NO_CUDA_MEMORY_CACHING="1", TRITON_INTERPRET="0",
               PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    args = [exe, "--tool", tool, "--error-exitcode", "3"]
    if tool == "initcheck":
        args += ["--track-unused-memory", "no"]
    proc = subprocess.run(args + [sys.executable, "-c", SANITIZED], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    log.info("compute-sanitizer %s:\n%s%s", tool, proc.stdout[-20000:], proc.stderr[-20000:])
    if proc.returncode:
        summary = re.findall(r"=+ (ERROR SUMMARY: .*)", proc.stdout + proc.stderr)
        raise AssertionError(f"compute-sanitizer --tool {tool} exit {proc.returncode}: "
                             f"{summary[-1] if summary else (proc.stderr.strip().splitlines() or ['?'])[-1]}")
    return "no errors (caching allocator off)"


# ---------------------------------------------------------------------------- the suite's tests
def cuda_test_files(root=ROOT) -> list:
    """Test files holding a test_cuda_* test (the suite's CUDA tests), relative to root."""
    out = []
    for folder, _, files in os.walk(os.path.join(root, "tests")):
        for f in sorted(files):
            if f.startswith("test_") and f.endswith(".py"):
                path = os.path.join(folder, f)
                with open(path, encoding="utf-8") as fh:
                    if re.search(r"^\s*def test_cuda_", fh.read(), re.M):
                        out.append(os.path.relpath(path, root))
    return sorted(out)


def collectable(files, root=ROOT, env=None, python=sys.executable):
    """(files pytest can collect here, {file: why not}): one --collect-only run; a file whose
    import fails (a package this machine does not have) is left out with the error's last line."""
    if not files:
        return [], {}
    proc = subprocess.run([python, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *files],
                          cwd=root, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    bad = {}
    for block in re.split(r"_{3,} ERROR collecting ", out)[1:]:
        name = block.split()[0]
        reason = [ln for ln in block.splitlines() if re.match(r"^E\s+\w*(Error|Exception)", ln)]
        bad[name] = reason[-1][1:].strip() if reason else "collection error"
    return [f for f in files if f not in bad], bad


def run_pytest(files, root=ROOT, env=None, python=sys.executable, select=(), timeout=400):
    """(status, detail) of one pytest run: PASS only for exit status 0 with at least one test
    run; 5 (nothing collected) is a FAIL, as is every other status."""
    if not files:
        return "FAIL", "no test file can be collected here"
    cmd = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", *select, *files]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    log.info("%s (exit %d)\n%s%s", " ".join(cmd), proc.returncode, proc.stdout[-30000:], proc.stderr[-5000:])
    last = (proc.stdout.strip().splitlines() or ["(no output)"])[-1].strip("= ")
    if proc.returncode == 5:
        return "FAIL", f"no tests collected (pytest exit 5): {last}"
    if proc.returncode != 0:
        return "FAIL", f"pytest exit {proc.returncode}: {last}"
    if not re.search(r"\d+ passed", last):
        return "FAIL", f"no test passed: {last}"
    return "PASS", last


def pytest_rows(root=None, env=None, python=sys.executable, cuda_files=None, compile_files=None) -> list:
    """The table rows of stage 4: the CUDA tests and the compile tests, each over the files
    this machine can collect (the others named in the detail)."""
    root = ROOT if root is None else root
    env = dict(os.environ if env is None else env, TRITON_INTERPRET="0")
    env["PYTHONPATH"] = os.pathsep.join(p for p in [root, env.get("PYTHONPATH", "")] if p)
    rows = []
    groups = (("pytest: CUDA tests (test_cuda_*)", cuda_test_files(root) if cuda_files is None else cuda_files,
               ("-k", "test_cuda_")),
              ("pytest: compile tests (sm_80/sm_90)", [COMPILE_TESTS] if compile_files is None else compile_files, ()))
    for name, files, select in groups:
        ok, bad = collectable(files, root, env, python)
        for f, why in bad.items():
            print(f"gpu-check: {f} cannot be collected here ({why}); its tests do not run", flush=True)
        status, detail = run_pytest(ok, root, env, python, select)
        if bad:
            detail += f"; not collectable here: {', '.join(f'{f} ({why})' for f, why in bad.items())}"
        rows.append((name, status, detail))
    return rows


# ---------------------------------------------------------------------------- speed
def _device_time(torch, fn, reps=20):
    """Median device seconds of fn() (CUDA events around each call, after a warm-up call)."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)


def _host_ms(torch, fn, reps=20):
    """Median host milliseconds to enqueue fn() (no synchronisation inside the timing)."""
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
        torch.cuda.synchronize()
    return 1e3 * statistics.median(times)


def _lora(torch, dtype):
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from shapes import llava7b_lora_shapes
    g = torch.Generator(device="cuda").manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s, generator=g, device="cuda").to(dtype)) for s in llava7b_lora_shapes(8)]
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g, device="cuda").to(dtype)
    return ps


# bytes per element each step must move (reads + writes), the denominators of "x of copy"
BYTES = {
    ("torch AdamW", "float32"): 28,            # θ, g, m, v read; θ, m, v written
    ("torch AdamW", "bfloat16"): 14,
    ("fused", "float32", "float32"): 44,       # + θ*, g_prev read and written, fp32
    ("fused", "bfloat16", "float32"): 30,      # 14 + 16 (fp32 θ*, g_prev)
    ("fused", "bfloat16", "param"): 22,        # 14 + 8 (bf16 θ*, g_prev)
    ("two-pass", "float32"): 36,               # stats θ, g, θ*, g_prev 16; apply θ, g, θ* read, θ*, g_prev written 20
}


def case_speed(torch, rows_out):
    """Ratios and bandwidth fractions; each measurement is its own table row (rows_out)."""
    from cl_core import DEMA, DEMAConfig, DEMAOptimizer
    n = 2 ** 28
    src, dst = torch.randn(n, device="cuda"), torch.empty(n, device="cuda")
    copy_bw = 8 * n / _device_time(torch, lambda: dst.copy_(src))
    del src, dst
    rows_out.append(("speed: d2d copy", "PASS", f"{copy_bw / 1e9:.0f} GB/s (the 1.0 of every 'x copy' below)"))

    def frac(nbytes, numel, t):
        return nbytes * numel / t / copy_bw

    for dtype, ema in (("float32", "float32"), ("bfloat16", "float32"), ("bfloat16", "param")):
        dt = _dt(torch, dtype)
        ps = _lora(torch, dt)
        numel = sum(p.numel() for p in ps)
        ref = torch.optim.AdamW(ps, lr=1e-4, fused=True)
        t_ref = _device_time(torch, ref.step)
        h_ref = _host_ms(torch, ref.step)
        qs = _lora(torch, dt)
        opt = DEMAOptimizer(torch.optim.AdamW(qs, lr=1e-4), DEMAConfig(ema_dtype=ema), fused=True)
        t_mine = _device_time(torch, opt.step)
        h_mine = _host_ms(torch, opt.step)
        if opt._fused.generic_steps:
            raise AssertionError(f"fused {dtype}/ema={ema}: {opt._fused.generic_steps} steps took the generic path")
        b_ref, b_mine = BYTES[("torch AdamW", dtype)], BYTES[("fused", dtype, ema)]
        rows_out.append((f"speed: fused AdamW+DEMA {dtype}/ema={ema}, 448 LoRA", "PASS",
                         f"{t_mine / t_ref:.2f}x torch AdamW(fused) alone ({t_mine * 1e3:.3f} vs {t_ref * 1e3:.3f} ms; "
                         f"paper {b_mine / b_ref:.2f}x); {frac(b_mine, numel, t_mine):.2f} of copy at {b_mine} B/elem "
                         f"(torch {frac(b_ref, numel, t_ref):.2f} at {b_ref}); host {h_mine:.2f} ms/step "
                         f"(torch {h_ref:.2f})"))
        del ps, qs, ref, opt
    # the two-pass backend on the same tensors, and the float64 cost of ema_dtype="param"
    times = {}
    for dtype, ema in (("float32", "float32"), ("bfloat16", "float32"), ("bfloat16", "param")):
        ps = _lora(torch, _dt(torch, dtype))
        e = DEMA(ps, DEMAConfig(backend="triton", ema_dtype=ema))
        e.update()
        times[(dtype, ema)] = _device_time(torch, e.update)
        if dtype == "float32":
            numel = sum(p.numel() for p in ps)
            rows_out.append(("speed: two-pass DEMA update fp32, 448 LoRA", "PASS",
                             f"{times[(dtype, ema)] * 1e3:.3f} ms, {frac(36, numel, times[(dtype, ema)]):.2f} of copy "
                             f"at 36 B/elem; host {_host_ms(torch, e.update):.2f} ms"))
        del ps, e
    fused64 = {}
    for ema in ("float32", "param"):
        qs = _lora(torch, torch.bfloat16)
        opt = DEMAOptimizer(torch.optim.AdamW(qs, lr=1e-4), DEMAConfig(ema_dtype=ema), fused=True)
        fused64[ema] = _device_time(torch, opt.step)
        del qs, opt
    rows_out.append(("speed: ema_dtype=param (float64 sums) on bf16", "PASS",
                     f"two-pass {times[('bfloat16', 'param')] / times[('bfloat16', 'float32')]:.2f}x the fp32-EMA "
                     f"update, fused {fused64['param'] / fused64['float32']:.2f}x the fp32-EMA step "
                     f"(param moves 8 B/elem less; above 1x is the fp64 arithmetic)"))
    return None


def case_decide(torch):
    """The two-pass update of one 2^27-element fp32 tensor, per kernel (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    from cl_core import DEMA, DEMAConfig
    n = 2 ** 27
    _need(torch, 5 * 4 * n)
    p = torch.randn(n, device="cuda")
    p.grad = torch.randn(n, device="cuda")
    e = DEMA([p], DEMAConfig(backend="triton"))
    for _ in range(3):
        e.update()
    torch.cuda.synchronize()
    reps = 5
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            e.update()
        torch.cuda.synchronize()
    per = {}
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
        for k in ("stats", "decide", "apply"):
            if f"_dema_{k}_kernel" in ev.key:
                per[k] = per.get(k, 0.0) + t / reps  # microseconds
    if set(per) != {"stats", "decide", "apply"}:
        raise AssertionError(f"profiler saw {sorted(per)} of the three DEMA kernels")
    total = sum(per.values())
    return (f"2^27 fp32: decide {per['decide']:.0f} us = {100 * per['decide'] / total:.0f}% of the update "
            f"(stats {per['stats']:.0f} us, apply {per['apply']:.0f} us)")


# ---------------------------------------------------------------------------- driver
CASES = [  # (name, function, optional packages it needs)
    ("two-pass DEMA vs CPU reference", case_two_pass, ("triton",)),
    ("one-pass fused step vs CPU reference", case_one_pass, ("triton",)),
    ("launches per step", case_launches, ("triton",)),
    ("repeat runs bitwise", case_repeat_bitwise, ("triton",)),
    ("guard bands", case_guard_bands, ("triton",)),
    ("non-default stream", case_side_stream, ("triton",)),
    ("graph-capture refusal", case_graph_capture, ("triton",)),
    ("two-pass tensor > 2^31 elements", case_big_two_pass, ("triton",)),
    ("one-pass tensor > 2^31 elements", case_big_one_pass, ("triton",)),
    ("compute-sanitizer memcheck", lambda t: case_sanitizer(t, "memcheck"), ("triton",)),
    ("compute-sanitizer initcheck", lambda t: case_sanitizer(t, "initcheck"), ("triton",)),
    ("compute-sanitizer racecheck", lambda t: case_sanitizer(t, "racecheck"), ("triton",)),
    ("speed: decide on 2^27 elements", case_decide, ("triton",)),
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
        print(f"gpu-check: {rows[-1][1]} {name} ({time.time() - t0:.0f} s)", flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--log", default=os.path.join(ROOT, "gpu_check.log"), help="full log file (default: gpu_check.log)")
    ap.add_argument("--pytest-only", action="store_true",
                    help="run only the suite's CUDA and compile tests (stage 4); works without a GPU")
    args = ap.parse_args(argv)
    t0 = time.time()

    def start_log():
        logging.basicConfig(filename=args.log, filemode="w", level=logging.INFO,
                            format="%(asctime)s %(levelname)s %(message)s")

    if args.pytest_only:
        start_log()
        rows = pytest_rows()
    else:
        import torch
        problems = preflight(torch)
        if problems and problems[0][0] == "CUDA":
            print(f"gpu-check: {problems[0][1]}: nothing to check")
            return 0
        start_log()
        for what, why in problems:
            print(f"gpu-check: preflight: {what}: {why}", flush=True)
        rows = [("preflight", "FAIL" if problems else "PASS",
                 "; ".join(w for w, _ in problems) + " missing" if problems else
                 f"{torch.cuda.get_device_name()}, torch {torch.__version__}, "
                 f"triton {importlib.import_module('triton').__version__}, compiler and Python.h present, "
                 f"{torch.cuda.mem_get_info()[0] / 2 ** 30:.0f} GiB free")]
        log.info("torch %s on %s", torch.__version__, torch.cuda.get_device_name())
        if not problems:
            rows += run_cases(torch, CASES)
            speed = []
            try:
                case_speed(torch, speed)
            except Exception as exc:
                log.exception("speed failed")
                speed.append(("speed", "FAIL", f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"))
            rows += speed
            rows += pytest_rows()
    table = format_table(rows)
    log.info("\n%s", table)
    print(f"gpu-check: full log in {args.log}; {time.time() - t0:.0f} s\n{table}")
    return 1 if any(r[1] == "FAIL" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
