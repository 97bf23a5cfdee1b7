"""Builds and loads the native CPU kernels (csrc/*.c) through ctypes, and runs them
over tensor shards on several threads.

Where each library is found or built is build.py's (prebuilt in the package, the
CL_CORE_CACHE cache, or compiled at first use, which is said in one log line with its
time). Where no C compiler works, `load()` returns None and the engine uses its
pure-torch path.
"""
from __future__ import annotations

import ctypes
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from cl_core.kernels import build

log = logging.getLogger(__name__)

_libs: dict = {}


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
    cc = build.compiler()
    if cc is None:
        log.warning("no C compiler found: DEMA uses the slower pure-torch CPU path")
        return None
    first_use = all(build.find(name, cc, flags) is None for flags in build.FLAG_SETS)
    started = time.perf_counter()
    for flags in build.FLAG_SETS:
        try:
            path = build.build(name, cc, flags)
        except OSError as exc:
            log.debug("native DEMA build error: %s", exc)
            path = None
        if path is None:
            continue
        if first_use:  # not a degradation, but a pause the user should be able to explain
            log.warning("cl_core: compiled the native %s kernels for this machine at first use in %.1f s, "
                        "cached in %s (installing the package or `python -m cl_core.kernels.build` does "
                        "it ahead of time)", name, time.perf_counter() - started, path.parent)
        try:
            lib = ctypes.CDLL(str(path))
        except OSError as exc:
            log.debug("cannot load %s: %s", path, exc)
            continue
        vp, i64, f32, cint = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
        signatures = {
            "dema_cpu": [cint, i64] + [vp] * 12 + [cint, f32, f32, f32],
            "dema_cpu_param": [cint, i64] + [vp] * 12 + [cint, f32, f32, f32],
        }  # the fused library's entry points are typed by cpu_fused.py, which calls them
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
