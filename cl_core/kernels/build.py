"""Compiles the native CPU kernels (csrc/*.c): where each library is found and how it is built.

Standard library only (no torch), so the package's build hook (setup.py) can run it while the
wheel is built, before torch is importable. Each library is keyed by its source, the
compiler, the flags and the CPU (-march=native code is only valid on the CPU model it was
built for) and looked up in two places: the package's `_prebuilt/` folder, which building or
installing the package fills, then a per-user cache (CL_CORE_CACHE, default ~/.cache/cl_core).
`python -m cl_core.kernels.build` builds both libraries into the cache ahead of time (the
Makefile does, after an editable install, which runs no build hook). Builds go to a temp file
that is renamed, so concurrent processes never load a half-written library.
"""
from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

CSRC = Path(__file__).with_name("csrc")
PREBUILT = Path(__file__).with_name("_prebuilt")
# Two libraries: the engine's (under a second to build) and the fused optimizer's (many
# specialised loops: several seconds).
LIBRARIES = {"dema": CSRC / "dema_cpu.c", "fused": CSRC / "fused_cpu.c"}
# -ffp-contract=off: no fused multiply-adds, so the optimizer maths rounds like torch's.
FLAG_SETS = (
    ["-O3", "-march=native", "-fopenmp-simd", "-ffp-contract=off", "-fno-math-errno", "-DCL_CORE_HAVE_F16"],
    ["-O3", "-fopenmp-simd", "-ffp-contract=off", "-fno-math-errno", "-DCL_CORE_HAVE_F16"],
    ["-O3", "-fopenmp-simd", "-ffp-contract=off", "-fno-math-errno"],
)


def compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def _cpu_fingerprint() -> str:
    # -march=native output is only valid on the same CPU model: key the library on it.
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cache_dir() -> Path:
    return Path(os.environ.get("CL_CORE_CACHE", Path.home() / ".cache" / "cl_core"))


def library_file(name: str, cc: str, flags: list[str]) -> str:
    src = LIBRARIES[name].read_bytes() + (CSRC / "dema_common.h").read_bytes()
    key = hashlib.sha256(src + " ".join([cc, *flags]).encode() + _cpu_fingerprint().encode()).hexdigest()[:16]
    return f"{name}_{key}.so"


def find(name: str, cc: str, flags: list[str]) -> Path | None:
    """The library already built with these flags (prebuilt or cached), or None."""
    file = library_file(name, cc, flags)
    for folder in (PREBUILT, cache_dir()):
        if (folder / file).exists():
            return folder / file
    return None


def build(name: str, cc: str, flags: list[str], folder: Path | None = None) -> Path | None:
    """The library with these flags: found, or compiled into `folder` (the cache by default).
    None when the compiler refuses the flags."""
    found = find(name, cc, flags) if folder is None else None
    if found is not None:
        return found
    out = (cache_dir() if folder is None else folder) / library_file(name, cc, flags)
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    cmd = [cc, *flags, "-shared", "-fPIC", "-o", tmp, str(LIBRARIES[name]), "-lm"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        os.unlink(tmp)
        log.debug("native DEMA build failed (%s): %s", " ".join(cmd), proc.stderr.strip()[:500])
        return None
    os.replace(tmp, out)
    return out


def build_all(folder: Path | None = None) -> dict:
    """Every library with the first flag set the compiler takes, into `folder` (the cache by
    default): {name: path, or None where no working compiler took any flag set}."""
    cc = compiler()
    built = {}
    for name in LIBRARIES:
        built[name] = None
        for flags in FLAG_SETS if cc else ():
            try:
                built[name] = build(name, cc, flags, folder)
            except OSError as exc:
                log.debug("native DEMA build error: %s", exc)
            if built[name] is not None:
                break
    return built


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    dest = Path(sys.argv[1]) if len(sys.argv) > 1 else None
    for lib_name, lib_path in build_all(dest).items():
        log.info("%s: %s", lib_name, lib_path or "not built (no working C compiler)")
