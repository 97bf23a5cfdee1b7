"""The regime study of issue 33: where DEMA's α sits, and why, on the bundled benchmark and
on synthetic trajectories at LLaVA-7B LoRA shapes. One command reproduces docs/regime.md:

    nice -n 10 env OMP_NUM_THREADS=1 PYTHONPATH=. python bench/regime_study.py --out runs/regime-study
    python bench/regime_study.py --list                    # the configurations and what each varies
    python bench/regime_study.py --preset smallest --out D # the pipeline check the test runs

Part 1 (``bench``) runs the continual runner (``cl_core.continual.run``: RunConfig, run) on the
bundled benchmark, one run folder per configuration, varying one thing at a time around the
demo's setting (tensor size by LoRA rank and model width, learning rate, task length,
clipping, formula, constants). Every EMA of the runner is a ``RegimeRecorder``: the runner's
own ``DEMACallback`` (two-pass, so the update happens in ``on_optimizer_step``) that, beside
the applied α the engine reports, recomputes the statistics a, b, c, d of docs/design.md §2 in
float64, the raw α before the fallback test, and so the cause of each fallback (first update /
no previous gradient, raw α ≥ 1, raw α ≤ 0, non-finite), and at the end of the task the EMA's
lag ‖θ* − θ‖₁ / ‖θ_start − θ‖₁ (θ the trained weights before the EMA replaces them). It also
keeps the per-element statistics part 2 is calibrated on.

Part 2 (``synthetic``) drives the real engine (``cl_core.DEMA``, after a real ``AdamW`` step
with the runner's warm-up + cosine schedule) on synthetic trajectories: every element follows
a noisy quadratic, g = G·((θ − θ_opt)/D + s·ξ_t), ξ_t ~ N(0, 1) fresh each step, θ_opt − θ_0 ~
N(0, D²). D (how far each element must travel, in units of lr × steps) and s (noise to
signal) are fitted so that the synthetic trajectory's gradient change ‖g_t − g_{t−1}‖₁/‖g_t‖₁
and net-to-gross travel ‖θ_end − θ_start‖₁ / Σ_t ‖Δθ_t‖₁ match the medians measured in part 1;
G (gradient per element) is part 1's median ‖g‖₁/n. The fit is validated by reproducing part 1's
fallback share at the demo's tensor sizes, then the same statistics are run at LLaVA-7B LoRA
sizes (r=8: 32,768 elements per A or B; r=128: 524,288) at the official lr 2e-4 and task
lengths of 160 and 600 steps, with G ×0.1 and ×10 as a sensitivity check (LLaVA's per-element
gradient scale is not measured here).

Results: ``<out>/study.json`` (every number) and ``<out>/study.md`` (the tables of docs/regime.md).
A configuration whose results are in ``<out>/configs/<name>.json`` is not run again; the
stage-1 base of each (width, seed) is trained once and shared by every configuration.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

log = logging.getLogger("bench.regime_study")

JUMP = 0.1          # α above this is a "jump" (the report's large-α mark)
CAUSES = ("first", "ge1", "le0", "nonfinite", "no_grad")

# ----------------------------------------------------------------------------- presets
# The demo's text preset (cl_core.cli.run DEMO_FULL, without its seeds), the base of part 1.
DEMO = dict(tasks=("sqa", "textvqa", "imagenet", "gqa", "vqav2", "ocrvqa"), stage1_seed=None, stage1_steps=800,
            steps=150, n_train=800, n_test=50, hidden_size=96)
SMALLEST = dict(tasks=("sqa", "imagenet"), stage1_seed=None, stage1_steps=30, steps=6, n_train=48, n_test=8,
                hidden_size=32)


@dataclasses.dataclass(frozen=True)
class Config:
    """One run folder of part 1: ``overrides`` on top of the preset, the methods it runs, and
    how many seeds (the first ``seeds`` of the study's seed list)."""

    name: str
    varies: str
    overrides: tuple = ()
    methods: tuple = ("dema",)
    seeds: int = 1

    def run_config(self, preset: dict, seeds: tuple):
        from cl_core.continual.run import RunConfig

        return RunConfig(methods=self.methods, seeds=tuple(seeds[: self.seeds]), **{**preset, **dict(self.overrides)})


# One thing varied at a time around the demo's `dema` (r 8, width 96, lr 5e-3, 150 steps, clip
# 1.0, official formula, scale 2, fallback 0.01). `core` also runs the references (lora, the
# fixed EMA, Continual-NExT's constants, the official lcia recipe) on three seeds, as does the
# paper formula; each other variation runs seed 0 only: its regime numbers (fallback share,
# lag) vary little between seeds (docs/regime.md gives core's spread), its Avg.ACC is one seed's.
CONFIGS = (
    Config("core", "demo setting; references", methods=("lora", "ema", "dema", "cl-next", "lcia"), seeds=3),
    Config("paper", "formula paper (d_t)", (("dema_formula", "paper"),), seeds=3),
    Config("lr2e-4", "lr 2e-4 (official)", (("lr", 2e-4),)),
    Config("r64", "LoRA rank 64 (n×8)", (("lora_r", 64), ("lora_alpha", 128))),
    Config("scale0.2", "scale 0.2", (("dema_scale", 0.2),)),
    Config("scale20", "scale 20", (("dema_scale", 20.0),)),
    Config("scale0.05", "scale 0.05", (("dema_scale", 0.05),)),
    Config("noclip", "no clipping", (("max_grad_norm", 0.0),)),
    Config("steps50", "50 steps per task", (("steps", 50),)),
    Config("r64-lr2e-4", "LoRA rank 64, lr 2e-4", (("lora_r", 64), ("lora_alpha", 128), ("lr", 2e-4))),
    Config("r2", "LoRA rank 2 (n/4)", (("lora_r", 2), ("lora_alpha", 4))),
    Config("lr1e-3", "lr 1e-3", (("lr", 1e-3),)),
    Config("w192", "width 192 (n×2)", (("hidden_size", 192),)),
    Config("steps400", "400 steps per task", (("steps", 400),)),
    Config("w48", "width 48 (n/2)", (("hidden_size", 48),)),
)
SMALLEST_CONFIGS = (Config("core", "pipeline check", methods=("lora", "dema"), seeds=1),
                    Config("paper", "formula paper", (("dema_formula", "paper"),), seeds=1))


# ----------------------------------------------------------------------------- the tracker
def l1(x: torch.Tensor) -> float:
    """‖x‖₁ summed in float64 (x's own float32 elements: what the engine sums)."""
    return float(x.detach().abs().sum(dtype=torch.float64))


class Tracker:
    """The regime of one DEMA engine over one task, recomputed beside it (float32 elements as
    the engine keeps them, norms summed in float64).

    ``before(lr)`` just before ``engine.update()`` (θ_t and g_t are in the parameters, θ*_{t−1}
    in the engine), ``after()`` just after it (the applied α), ``finish()`` before the EMA
    replaces the weights. One row per (step, tensor): a, b, c, d, the raw α, the applied α.
    """

    def __init__(self, engine):
        self.engine = engine
        cfg = engine.config
        self.formula, self.scale, self.fallback = cfg.formula, cfg.scale, cfg.fallback
        self.fallback32 = float(torch.tensor(cfg.fallback, dtype=torch.float32))
        ps = engine.params
        self.numel = [p.numel() for p in ps]
        self.start = [p.detach().float().clone() for p in ps]
        self.prev = [p.detach().float().clone() for p in ps]    # θ_{t−1}
        self.gprev = [None] * len(ps)
        self.started = False
        self.rows = []            # (step, tensor, a, b, c, d, raw, cause-if-fallback-by-rule)
        self.applied = []         # per step: list of applied α
        self.steps = []           # per step: (lr, Σ‖Δθ‖₁ per tensor)
        self.mismatch = 0         # raw α and applied α disagree beyond float32 rounding
        self.lag = None

    def before(self, lr: float) -> None:
        ema = [e.detach().float() for e in self.engine.ema_tensors()]
        t = len(self.applied)
        moves = []
        pending = []
        for i, p in enumerate(self.engine.params):
            th = p.detach().float()
            g = None if p.grad is None else p.grad.detach().float()
            moves.append(l1(th - self.prev[i]))
            if self.formula == "fixed":
                pending.append((t, i, None, None, None, None, 1.0 - self.engine.config.beta, None))
            elif g is None:
                pending.append((t, i, None, None, None, None, None, "no_grad"))
            elif not self.started or self.gprev[i] is None:
                pending.append((t, i, None, l1(g), None, None, None, "first"))
            else:
                a, b, c = l1(th - ema[i]), l1(g), l1(g - self.gprev[i])
                d = l1(self.prev[i] - ema[i])
                mult = self.scale if self.formula == "official" else d
                with_inf = a * c == 0.0
                raw = math.inf if with_inf else mult * (1.0 + b) / (a * c)
                cause = ("nonfinite" if not math.isfinite(raw) else "ge1" if raw >= 1.0 else "le0" if raw <= 0.0
                         else None)
                pending.append((t, i, a, b, c, d, raw, cause))
            self.gprev[i] = None if g is None else g.clone()
            self.prev[i] = th.clone()
        self._pending = pending
        self.steps.append((lr, moves))

    def after(self) -> None:
        alpha = self.engine.stats.alpha.detach().double().cpu().tolist()
        for row, a in zip(self._pending, alpha):
            raw, cause = row[6], row[7]
            if cause is None and raw is not None and self.formula != "fixed":
                # a dynamic α: the engine computed it in float32 from float32 norms
                if abs(a - raw) > 1e-4 * raw + 1e-7:
                    self.mismatch += 1
            elif cause is not None and a != self.fallback32:
                self.mismatch += 1
        self.rows.extend(self._pending)
        self.applied.append(alpha)
        self.started = True

    def finish(self) -> None:
        """Lag of the EMA at the end of the task (before the replace)."""
        ema = [e.detach().float() for e in self.engine.ema_tensors()]
        num = sum(l1(e - p.detach().float()) for e, p in zip(ema, self.engine.params))
        den = sum(l1(s - p.detach().float()) for s, p in zip(self.start, self.engine.params))
        self.lag = num / den if den > 0 else None
        self.net = den

    def summary(self) -> dict:
        """The task's regime numbers and the per-element statistics part 2 is fitted on."""
        at = [row[7] for row in self.rows]
        alphas = [a for step in self.applied for a in step]
        n = len(alphas)
        at_fb = [c for c, a in zip(at, alphas) if a == self.fallback32 and self.formula != "fixed"]
        causes = {k: sum(1 for c in at_fb if c == k) for k in CAUSES}
        causes["other"] = len(at_fb) - sum(causes.values())
        dyn = sorted(a for a, c in zip(alphas, at) if not (a == self.fallback32 and self.formula != "fixed"))
        ge1_raw = [row[6] for row in self.rows if row[7] == "ge1"]
        gross = sum(sum(m) for _, m in self.steps)
        lr_sum = sum(lr for lr, _ in self.steps)
        b_per = [row[3] / self.numel[row[1]] for row in self.rows if row[3] is not None]
        c_over_b = [row[4] / row[3] for row in self.rows if row[4] is not None and row[3]]
        return {
            "n": n, "at_fallback": len(at_fb), "causes": causes,
            "jumps": sum(1 for a in alphas if a > JUMP),
            "between": sum(1 for a in dyn if a <= JUMP),
            "alpha_q": _quantiles(dyn), "raw_ge1_median": _median(ge1_raw),
            "lag": self.lag, "mismatch": self.mismatch,
            "numel": self.numel,
            # per-element statistics
            "g_per_elem": _median(b_per), "c_over_b": _median(c_over_b),
            "update_per_lr": gross / (sum(self.numel) * lr_sum) if lr_sum else None,
            "net_over_gross": self.net / gross if gross else None,
            # α and the fallback over the task (tenths of the task)
            "fallback_by_tenth": _by_tenth(self.applied, self.fallback32, self.formula),
        }


def _quantiles(xs) -> list:
    if not xs:
        return []
    return [xs[min(len(xs) - 1, int(q * len(xs)))] for q in (0.1, 0.5, 0.9)]


def _median(xs):
    return statistics.median(xs) if xs else None


def _by_tenth(applied, fallback32, formula) -> list:
    if formula == "fixed" or not applied:
        return []
    out = []
    for k in range(10):
        part = applied[len(applied) * k // 10: len(applied) * (k + 1) // 10]
        vals = [a for s in part for a in s]
        out.append(round(sum(1 for a in vals if a == fallback32) / len(vals), 3) if vals else None)
    return out


# ----------------------------------------------------------------------------- part 1
def recorder_class():
    """A DEMACallback that keeps a Tracker per task (two-pass: the update runs in its
    on_optimizer_step, so θ_t, g_t and θ*_{t−1} are all visible just before it)."""
    from cl_core.integrations.hf import DEMACallback

    class RegimeRecorder(DEMACallback):
        def on_train_begin(self, args, state, control, **kwargs):
            super().on_train_begin(args, state, control, **kwargs)
            self.tracker = Tracker(self.engine)

        def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
            self.tracker.before(float(optimizer.param_groups[0]["lr"]))
            super().on_optimizer_step(args, state, control, optimizer=optimizer, **kwargs)
            self.tracker.after()

        def on_train_end(self, args, state, control, **kwargs):
            self.tracker.finish()
            super().on_train_end(args, state, control, **kwargs)

    return RegimeRecorder


class recording:
    """Within the block, every EMA callback the runner makes is a RegimeRecorder; after each
    task its tracker's summary is filed under (method, seed, task) by ``on_task_end``."""

    def __init__(self):
        self.made = []
        self.tasks = {}

    def __enter__(self):
        from cl_core.continual import run as runner

        cls = recorder_class()
        original = runner.dema_callback

        def factory(config, params, precision="fp32"):
            cb = original(config, params, precision)
            # the runner's callback, two-pass (its own regime statistics and lag kept, so the
            # test can check the tracker against them)
            rec = cls(cb.config, params=cb.params, replace_at_end=True, record_alpha=True, fused=False,
                      precision=cb.precision, measure_lag=True, warn_regime=False)
            self.made.append(rec)
            return rec

        self._restore = (runner, original)
        runner.dema_callback = factory
        return self

    def __exit__(self, *exc):
        runner, original = self._restore
        runner.dema_callback = original

    def on_task_end(self, method, seed, task):
        if self.made:
            rec = self.made.pop()
            self.tasks[f"{method}|{seed}|{task}"] = rec.tracker.summary()
        self.made.clear()


def run_config(cfg: Config, preset: dict, seeds: tuple, out: Path, bases: dict, threads: int) -> dict:
    """Run one configuration (its own run folder, the shared stage-1 bases linked in)."""
    import shutil

    from cl_core.continual.run import run

    rc = cfg.run_config(preset, seeds)
    folder = out / "runs" / cfg.name
    if folder.exists():
        shutil.rmtree(folder)          # a configuration is redone whole (its trackers live in memory)
    (folder / "base").mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(rc.to_dict(), indent=1))
    width = rc.hidden_size
    for s in rc.seeds:
        cached = bases.get((width, s))
        if cached is not None:
            os.symlink(cached.resolve(), folder / "base" / f"seed{s}")
    t0 = time.time()
    with recording() as rec:
        results = run(rc, folder, quiet=True, threads=threads, on_task_end=rec.on_task_end)
    for s in rc.seeds:
        link = folder / "base" / f"seed{s}"
        if not link.is_symlink():
            bases[(width, s)] = link
    out_methods = {}
    for m in rc.methods:
        r = results["methods"][m]
        per_seed = {}
        for s in rc.seeds:
            sr = r["seeds"][str(s)]
            per_seed[str(s)] = {
                "avg_acc": sr["metrics"]["avg_acc"], "forgetting": sr["metrics"]["forgetting"],
                "diagonal": [sr["matrix"][j][j] for j in range(len(sr["matrix"]))], "loss": sr["loss"],
                "tasks": {str(j): rec.tasks[f"{m}|{s}|{j}"] for j in range(len(sr["matrix"]))
                          if f"{m}|{s}|{j}" in rec.tasks},
            }
        out_methods[m] = {"avg_acc": r["metrics"]["avg_acc"], "avg_acc_std": r["metrics_std"]["avg_acc"],
                          "forgetting": r["metrics"]["forgetting"], "forgetting_std": r["metrics_std"]["forgetting"],
                          "seeds": per_seed, "settings": r["settings"]}
    return {"name": cfg.name, "varies": cfg.varies, "config": rc.to_dict(), "methods": out_methods,
            "seconds": round(time.time() - t0, 1)}


def pooled(method_result: dict) -> dict:
    """Every task of every seed of one method, pooled: the regime numbers of a table row."""
    tasks = [t for s in method_result["seeds"].values() for t in s["tasks"].values()]
    if not tasks:
        return {}
    n = sum(t["n"] for t in tasks)
    fb = sum(t["at_fallback"] for t in tasks)
    causes = {k: sum(t["causes"].get(k, 0) for t in tasks) for k in CAUSES + ("other",)}
    lags = [t["lag"] for t in tasks if t["lag"] is not None]
    qs = [t["alpha_q"] for t in tasks if t["alpha_q"]]
    return {
        "n": n, "fallback": fb / n, "jumps": sum(t["jumps"] for t in tasks) / n,
        "between": sum(t["between"] for t in tasks) / n,
        "causes": {k: v / fb for k, v in causes.items()} if fb else {},
        "lag_median": _median(lags), "lag_range": [min(lags), max(lags)] if lags else None,
        "alpha_median_q": [_median([q[i] for q in qs]) for i in range(3)] if qs else [],
        "mismatch": sum(t["mismatch"] for t in tasks),
        "numel": sorted(set(tasks[0]["numel"])),
        "g_per_elem": _median([t["g_per_elem"] for t in tasks if t["g_per_elem"] is not None]),
        "c_over_b": _median([t["c_over_b"] for t in tasks if t["c_over_b"] is not None]),
        "update_per_lr": _median([t["update_per_lr"] for t in tasks if t["update_per_lr"] is not None]),
        "net_over_gross": _median([t["net_over_gross"] for t in tasks if t["net_over_gross"] is not None]),
        "fallback_by_tenth": [_median([t["fallback_by_tenth"][k] for t in tasks if t["fallback_by_tenth"]])
                              for k in range(10)] if tasks[0]["fallback_by_tenth"] else [],
    }


# ----------------------------------------------------------------------------- part 2
def simulate(numel: int, *, lr: float, steps: int, D: float, s: float, G: float, config, seed: int = 0,
             warmup: int = 4) -> dict:
    """One synthetic tensor of ``numel`` elements: AdamW (the Trainer's defaults, warm-up and
    cosine schedule) on the noisy quadratic, the real engine averaging it, a Tracker beside it.
    D is in units of lr × steps (the distance each element must travel)."""
    from cl_core import DEMA

    gen = torch.Generator().manual_seed(seed)
    dist = D * lr * steps
    theta0 = torch.randn(numel, generator=gen) * 0.02
    target = theta0 + torch.randn(numel, generator=gen) * dist
    p = torch.nn.Parameter(theta0.clone())
    opt = torch.optim.AdamW([p], lr=lr, weight_decay=0.0)
    # transformers' get_cosine_schedule_with_warmup (the Trainer's), without importing transformers
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: k / max(1, warmup) if k < warmup else max(
        0.0, 0.5 * (1.0 + math.cos(math.pi * (k - warmup) / max(1, steps - warmup)))))
    engine = DEMA([p], config)
    tracker = Tracker(engine)
    for _ in range(steps):
        noise = torch.randn(numel, generator=gen)
        p.grad = G * ((p.detach() - target) / dist + s * noise)
        lr_now = opt.param_groups[0]["lr"]
        opt.step()
        tracker.before(lr_now)
        engine.update()
        tracker.after()
        sched.step()
    tracker.finish()
    return tracker.summary()


def fit(measured: dict, *, lr: float, steps: int, numel: int = 4096) -> dict:
    """D and s whose synthetic gradient change and net-to-gross travel are nearest (in log
    distance) to the measured medians. Adam makes the trajectory independent of G."""
    from cl_core import DEMAConfig

    best = None
    grid = []
    for D in (0.03, 0.1, 0.3, 1.0, 3.0):
        for s in (0.3, 1.0, 3.0, 10.0, 30.0):
            r = simulate(numel, lr=lr, steps=steps, D=D, s=s, G=1.0, config=DEMAConfig(), seed=1)
            cb, ng = r["c_over_b"], r["net_over_gross"]
            err = (math.log(cb / measured["c_over_b"]) ** 2 + math.log(ng / measured["net_over_gross"]) ** 2)
            grid.append({"D": D, "s": s, "c_over_b": cb, "net_over_gross": ng, "err": err})
            if best is None or err < best["err"]:
                best = grid[-1]
    return {"best": best, "grid": grid}


def synthetic(measured: dict, real_numel: list, *, quick: bool = False) -> dict:
    """Fit on part 1's core `dema`, validate at the demo's sizes, then LLaVA-7B LoRA sizes."""
    from cl_core import DEMAConfig

    demo_lr, demo_steps = 5e-3, (20 if quick else 150)
    fitted = fit(measured, lr=demo_lr, steps=demo_steps, numel=512 if quick else 4096)
    D, s = fitted["best"]["D"], fitted["best"]["s"]
    G0 = measured["g_per_elem"]
    official = DEMAConfig()
    # validation: the demo's own tensor sizes, lr and steps
    sizes = sorted(set(real_numel))
    val = [simulate(n, lr=demo_lr, steps=demo_steps, D=D, s=s, G=G0, config=official, seed=k)
           for k, n in enumerate(sizes)]
    validation = _pool_sim(val)
    rows = []
    grid_n = (768, 4096) if quick else (768, 4096, 32768, 131072, 524288)
    # (lr, steps): the demo's lr over an official-length task, the official lr over a short and
    # a middle official task (the scripts: 160-1,730 steps)
    grid = ((5e-3, 20), (2e-4, 20)) if quick else ((5e-3, 160), (2e-4, 160), (2e-4, 600))
    for n in grid_n:
        for lr, T in grid:
            for gm in (1.0, 0.1, 10.0):
                if gm != 1.0 and (quick or (lr, T) != (2e-4, 160) or n not in (32768, 524288)):
                    continue          # the gradient-scale check only where LLaVA sits
                r = simulate(n, lr=lr, steps=T, D=D, s=s, G=G0 * gm, config=official, seed=7)
                rows.append({"numel": n, "lr": lr, "steps": T, "G_factor": gm, **_pool_sim([r])})
    paper = []
    for n in grid_n:
        lr, T = grid[1]
        r = simulate(n, lr=lr, steps=T, D=D, s=s, G=G0, config=DEMAConfig(formula="paper"), seed=7)
        paper.append({"numel": n, "lr": lr, "steps": T, **_pool_sim([r])})
    return {"fit": fitted, "D": D, "s": s, "G": G0, "validation": validation, "official": rows, "paper": paper}


def _pool_sim(results: list) -> dict:
    n = sum(r["n"] for r in results)
    fb = sum(r["at_fallback"] for r in results)
    return {"fallback": fb / n, "jumps": sum(r["jumps"] for r in results) / n,
            "ge1": sum(r["causes"]["ge1"] for r in results) / fb if fb else 0.0,
            "lag": _median([r["lag"] for r in results if r["lag"] is not None]),
            "alpha_q": _median([r["alpha_q"][1] for r in results if r["alpha_q"]]),
            "alpha_q10": _median([r["alpha_q"][0] for r in results if r["alpha_q"]]),
            "alpha_q90": _median([r["alpha_q"][2] for r in results if r["alpha_q"]]),
            "c_over_b": _median([r["c_over_b"] for r in results if r["c_over_b"] is not None]),
            "net_over_gross": _median([r["net_over_gross"] for r in results]),
            "update_per_lr": _median([r["update_per_lr"] for r in results]),
            "fallback_by_tenth": [_median([r["fallback_by_tenth"][k] for r in results]) for k in range(10)],
            "mismatch": sum(r["mismatch"] for r in results)}


# ----------------------------------------------------------------------------- tables
def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.0f} %"


def tables(study: dict) -> str:
    lines = ["## Part 1: the bundled benchmark", "",
             "| configuration | method | n per tensor | seeds | at fallback | of which raw α ≥ 1 / first / α ≤ 0 / "
             "non-finite | jumps (α > 0.1) | α 10/50/90 % (not fallback) | lag (median, range) | Avg.ACC | "
             "Forgetting |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in study["bench"]:
        for m, r in c["methods"].items():
            p = pooled(r)
            seeds = len(r["seeds"])
            acc = f"{r['avg_acc']:.1f}" + (f" ± {r['avg_acc_std']:.1f}" if seeds > 1 else "")
            fg = f"{r['forgetting']:.1f}" + (f" ± {r['forgetting_std']:.1f}" if seeds > 1 else "")
            if not p:
                lines.append(f"| {c['name']} ({c['varies']}) | {m} | | {seeds} | | | | | | {acc} | {fg} |")
                continue
            cz = p["causes"]
            cause = (" / ".join(_pct(cz.get(k)) for k in ("ge1", "first", "le0", "nonfinite"))
                     if cz else "-")
            q = "/".join(f"{x:.2g}" for x in p["alpha_median_q"]) if p["alpha_median_q"] else "-"
            lag = (f"{p['lag_median']:.2f} ({p['lag_range'][0]:.2f}-{p['lag_range'][1]:.2f})"
                   if p["lag_median"] is not None else "-")
            fixed = r["settings"].get("EMA", "").startswith("fixed")
            lines.append(f"| {c['name']} ({c['varies']}) | {m} | {min(p['numel'])}-{max(p['numel'])} | {seeds} | "
                         f"{'-' if fixed else _pct(p['fallback'])} | {'-' if fixed else cause} | "
                         f"{'-' if fixed else _pct(p['jumps'])} | {'-' if fixed else q} | {lag} | {acc} | {fg} |")
    syn = study.get("synthetic")
    if syn:
        lines += ["", "## Part 2: synthetic trajectories", "",
                  f"Fitted: D = {syn['D']} (× lr × steps), s = {syn['s']}, G = {syn['G']:.3g} per element "
                  f"(fit error {syn['fit']['best']['err']:.3f}: c/b {syn['fit']['best']['c_over_b']:.2f}, "
                  f"net/gross {syn['fit']['best']['net_over_gross']:.2f}).", "",
                  f"Validation at the demo's sizes (lr 5e-3, the demo's steps): fallback "
                  f"{_pct(syn['validation']['fallback'])}, jumps {_pct(syn['validation']['jumps'])}, lag "
                  f"{syn['validation']['lag']:.2f}.", "",
                  "| formula | n per tensor | lr | steps | G × | at fallback | of which raw α ≥ 1 | jumps | "
                  "α 10/50/90 % (not fallback) | lag |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for label, rows in (("official", syn["official"]), ("paper", syn["paper"])):
            for r in rows:
                q = ("-" if r["alpha_q"] is None else
                     f"{r['alpha_q10']:.2g}/{r['alpha_q']:.2g}/{r['alpha_q90']:.2g}")
                lag = "-" if r["lag"] is None else f"{r['lag']:.2f}"
                lines.append(f"| {label} | {r['numel']:,} | {r['lr']:g} | {r['steps']} | {r.get('G_factor', 1.0):g} | "
                             f"{_pct(r['fallback'])} | {_pct(r['ge1'])} | {_pct(r['jumps'])} | {q} | {lag} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="runs/regime-study", help="results folder (configurations already in "
                   "<out>/configs are not run again)")
    p.add_argument("--part", choices=("all", "bench", "synthetic"), default="all",
                   help="bench: the bundled benchmark; synthetic: LLaVA-shape trajectories (needs bench's core)")
    p.add_argument("--preset", choices=("full", "smallest"), default="full",
                   help="full: the demo's setting (docs/regime.md); smallest: a seconds-long pipeline check")
    p.add_argument("--only", nargs="+", metavar="NAME", help="run only these configurations (see --list)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                   help="the study's seeds; a configuration takes the first 1 or 3 (see --list)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--list", action="store_true", help="print the configurations and exit")
    args = p.parse_args(argv)
    configs = SMALLEST_CONFIGS if args.preset == "smallest" else CONFIGS
    preset = SMALLEST if args.preset == "smallest" else DEMO
    if args.list:
        for c in configs:
            print(f"{c.name:12s} {c.varies:32s} methods {', '.join(c.methods)}; seeds {c.seeds}; "
                  f"{dict(c.overrides) or 'the demo setting'}")
        return 0
    names = [c.name for c in configs]
    for n in args.only or ():
        if n not in names:
            p.error(f"--only {n}: no such configuration; the configurations are: {', '.join(names)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    out = Path(args.out)
    (out / "configs").mkdir(parents=True, exist_ok=True)
    bases = {}
    for f in (out / "runs").glob("*/base/seed*"):
        if not f.is_symlink() and (f / "config.json").exists():
            cfgd = json.loads((f.parent.parent / "config.json").read_text())
            bases[(cfgd["hidden_size"], int(f.name[4:]))] = f
    bench = []
    if args.part in ("all", "bench"):
        for c in configs:
            path = out / "configs" / f"{c.name}.json"
            if (args.only and c.name not in args.only) or path.exists():
                if path.exists():
                    bench.append(json.loads(path.read_text()))
                continue
            log.info("configuration %s (%s) ...", c.name, c.varies)
            result = run_config(c, preset, tuple(args.seeds), out, bases, args.threads)
            path.write_text(json.dumps(result, indent=1))
            bench.append(result)
            pr = pooled(result["methods"]["dema"]) if "dema" in result["methods"] else {}
            log.info("configuration %s: %.0f s; dema fallback %s, lag %s, Avg.ACC %.1f", c.name, result["seconds"],
                     _pct(pr.get("fallback")), pr.get("lag_median"),
                     result["methods"].get("dema", {}).get("avg_acc", float("nan")))
    else:
        bench = [json.loads((out / "configs" / f"{c.name}.json").read_text()) for c in configs
                 if (out / "configs" / f"{c.name}.json").exists()]
    study = {"preset": args.preset, "bench": bench}
    if args.part in ("all", "synthetic"):
        core = next((c for c in bench if c["name"] == "core"), None)
        if core is None:
            p.error("the synthetic part is fitted on the core configuration: run --part bench (with core) first")
        measured = pooled(core["methods"]["dema"])
        t0 = time.time()
        study["synthetic"] = synthetic(measured, measured["numel"], quick=args.preset == "smallest")
        study["synthetic"]["measured"] = {k: measured[k] for k in ("g_per_elem", "c_over_b", "update_per_lr",
                                                                   "net_over_gross", "fallback", "jumps")}
        study["synthetic"]["seconds"] = round(time.time() - t0, 1)
        log.info("synthetic part: %.0f s", study["synthetic"]["seconds"])
    (out / "study.json").write_text(json.dumps(study, indent=1))
    (out / "study.md").write_text(tables(study))
    print(tables(study))
    return 0


if __name__ == "__main__":
    sys.exit(main())
