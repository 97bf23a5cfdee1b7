"""Builds and loads the native CPU kernels (csrc/*.c) through ctypes, and runs them
over tensor shards on several threads.

The C files are plain C (no torch headers), so compiling it takes well under a second;
it is built at first use into a per-user cache (CL_CORE_CACHE, default
~/.cache/cl_core) keyed by the source, the flags and the CPU, written to a temp file
and renamed so concurrent processes never load a half-written library. Where no C
compiler works, `load()` returns None and the engine uses its pure-torch path.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

log = logging.getLogger(__name__)

CSRC = Path(__file__).with_name("csrc")
# Two libraries, each built on first use: the engine's (under a second to build) and
# the fused optimizer's (many specialised loops: a few seconds, once per machine).
LIBRARIES = {"dema": CSRC / "dema_cpu.c", "fused": CSRC / "fused_cpu.c"}
# -ffp-contract=off: no fused multiply-adds, so the optimizer maths rounds like torch's.
_FLAG_SETS = (
    ["-O3", "-march=native", "-fopenmp-simd", "-ffp-contract=off", "-fno-math-errno", "-DCL_CORE_HAVE_F16"],
    ["-O3", "-fopenmp-simd", "-ffp-contract=off", "-fno-math-errno", "-DCL_CORE_HAVE_F16"],
    ["-O3", "-fopenmp-simd", "-ffp-contract=off", "-fno-math-errno"],
)
_libs: dict = {}


def _cpu_fingerprint() -> str:
    # -march=native output is only valid on the same CPU model: key the cache on it.
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cache_dir() -> Path:
    return Path(os.environ.get("CL_CORE_CACHE", Path.home() / ".cache" / "cl_core"))


def _build(name: str, cc: str, flags: list[str]) -> Path | None:
    source = LIBRARIES[name]
    src = source.read_bytes() + (CSRC / "dema_common.h").read_bytes()
    key = hashlib.sha256(src + " ".join([cc, *flags]).encode() + _cpu_fingerprint().encode()).hexdigest()[:16]
    out = _cache_dir() / f"{name}_{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    cmd = [cc, *flags, "-shared", "-fPIC", "-o", tmp, str(source), "-lm"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        os.unlink(tmp)
        log.debug("native DEMA build failed (%s): %s", " ".join(cmd), proc.stderr.strip()[:500])
        return None
    os.replace(tmp, out)
    return out


def load(name: str = "dema"):
    """The loaded library `name` ("dema" or "fused"), or None when it cannot be built
    here (logged once)."""
    if name not in _libs:
        _libs[name] = _load(name)
    return _libs[name]


def _load(name: str):
    if os.environ.get("CL_CORE_NO_NATIVE"):
        log.info("CL_CORE_NO_NATIVE is set: DEMA uses the pure-torch CPU path")
        return None
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        log.warning("no C compiler found: DEMA uses the slower pure-torch CPU path")
        return None
    for flags in _FLAG_SETS:
        try:
            path = _build(name, cc, flags)
        except OSError as exc:
            log.debug("native DEMA build error: %s", exc)
            path = None
        if path is None:
            continue
        try:
            lib = ctypes.CDLL(str(path))
        except OSError as exc:
            log.debug("cannot load %s: %s", path, exc)
            continue
        vp, i64, f32, cint = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
        signatures = {
            "dema_cpu": [cint, i64] + [vp] * 12 + [cint, f32, f32, f32],
            "dema_cpu_param": [cint, i64] + [vp] * 12 + [cint, f32, f32, f32],
        }  # the fused library's entry points are typed by kernels/cpu_fused.py, which calls them
        for prefix, argtypes in signatures.items():
            for suffix in ("f32", "bf16", "f16"):
                fn = getattr(lib, f"{prefix}_{suffix}", None)
                if fn is not None:
                    fn.restype = None
                    fn.argtypes = argtypes
        return lib
    log.warning("could not build the native DEMA kernels with %s: DEMA uses the slower pure-torch CPU path", cc)
    return None


def function_for(dtype, prefix: str = "dema_cpu"):
    """The DEMA library's entry point `prefix` for a parameter dtype, or None when there is none."""
    lib = load("dema")
    if lib is None:
        return None
    suffix = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}.get(dtype)
    return getattr(lib, f"{prefix}_{suffix}", None) if suffix else None


def int64_table(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64)


def address(t: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


def balanced_shards(sizes: list[int], n: int) -> list[list[int]]:
    """Split indices into n lists of near-equal total size (largest first, greedy)."""
    shards = [[] for _ in range(max(1, n))]
    load_ = [0] * len(shards)
    for i in sorted(range(len(sizes)), key=lambda k: -sizes[k]):
        j = load_.index(min(load_))
        shards[j].append(i)
        load_[j] += sizes[i]
    return [sorted(s) for s in shards if s]


class ShardedRunner:
    """Calls a C function `fn(..., count, idx_ptr, ...)` once per shard of tensors, in
    parallel: ctypes releases the GIL, so the shards run on separate cores."""

    # Below this many elements per thread, handing work to another thread costs more
    # than it saves (the pool round trip is tens of microseconds).
    MIN_PER_THREAD = 1 << 19

    def __init__(self, numels: list[int], threads: int | None = None, indices: list[int] | None = None):
        """Shards of the tensors at `indices` (all of them when None)."""
        if indices is None:
            indices = list(range(len(numels)))
        sizes = [numels[i] for i in indices]
        threads = threads or torch.get_num_threads()
        threads = max(1, min(threads, sum(sizes) // self.MIN_PER_THREAD))
        shards = balanced_shards(sizes, threads)
        self.shards = [int64_table([indices[k] for k in sh]) for sh in shards]
        self.pool = ThreadPoolExecutor(len(shards) - 1) if len(shards) > 1 else None

    def run(self, call) -> None:
        """`call(count, idx_address)` for every shard; returns when all are done."""
        jobs = [(sh.numel(), address(sh)) for sh in self.shards]
        futures = [self.pool.submit(call, *job) for job in jobs[1:]] if self.pool else []
        if jobs:
            call(*jobs[0])
        for f in futures:
            f.result()
