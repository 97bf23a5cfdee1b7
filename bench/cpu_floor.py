"""The CPU floor of cl_core's EMA updates: one DEMA `update()` (torch backend, native
kernels) against `torch._foreach_lerp_` (the cheapest fixed EMA: read θ and θ*, write
θ*, 12 B/element) over the LLaVA-7B LoRA r=8 shapes (448 tensors, 20.0 M fp32), one
thread, rounds interleaved (lerp, fixed, official, lerp, ...), median of the per-round
ratios. Targets (issue 28): `formula="fixed"` ≤ 1.15× lerp (it moves the same 12 B),
`formula="official"` ≤ 2.2× lerp (24 B: the floor is 2.0).

    PYTHONPATH=. OMP_NUM_THREADS=1 nice python bench/cpu_floor.py [--rounds 41]

Prints one line per method (median ms, ratio to lerp, target) and exits 1 when a target is
missed. The other fixed EMAs users run (timm ModelEmaV3, torch.optim.swa_utils,
ema-pytorch) are not installed here; the issue measured them at 1.13-1.43× lerp."""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from shapes import llava7b_lora_shapes, make_params  # noqa: E402

from cl_core import DEMA, DEMAConfig  # noqa: E402

TARGETS = {"fixed": 1.15, "official": 2.2}


def _clock(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def measure(rounds: int, rank: int = 8) -> dict:
    """{method: (median seconds, median ratio to lerp)} over `rounds` interleaved rounds."""
    torch.set_num_threads(1)
    params = make_params(llava7b_lora_shapes(rank))
    emas = [p.detach().clone() for p in params]
    engines = {f: DEMA(params, DEMAConfig(formula=f)) for f in TARGETS}
    for e in engines.values():
        e.update()  # the lazy start (a copy) outside the timing
        e.update()
    lerp = lambda: torch._foreach_lerp_(emas, params, 0.01)  # noqa: E731
    lerp()
    times = {"lerp": [], **{f: [] for f in TARGETS}}
    ratios = {f: [] for f in TARGETS}
    for _ in range(rounds):
        base = _clock(lerp)
        times["lerp"].append(base)
        for f, e in engines.items():
            t = _clock(e.update)
            times[f].append(t)
            ratios[f].append(t / base)
    out = {"lerp": (statistics.median(times["lerp"]), 1.0)}
    for f in TARGETS:
        out[f] = (statistics.median(times[f]), statistics.median(ratios[f]))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=41, help="interleaved rounds (default 41)")
    ap.add_argument("--rank", type=int, default=8, help="LoRA rank of the LLaVA-7B shapes (default 8)")
    args = ap.parse_args(argv)
    res = measure(args.rounds, args.rank)
    ok = True
    print(f"LLaVA-7B LoRA r={args.rank}, 1 thread, {args.rounds} interleaved rounds, medians")
    print(f"  torch._foreach_lerp_          {res['lerp'][0] * 1e3:7.2f} ms  1.00x")
    for f, target in TARGETS.items():
        ms, r = res[f][0] * 1e3, res[f][1]
        hit = r <= target
        ok &= hit
        print(f"  DEMA formula={f:<9s} torch   {ms:7.2f} ms  {r:.2f}x lerp (target <= {target}) "
              f"{'ok' if hit else 'MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
