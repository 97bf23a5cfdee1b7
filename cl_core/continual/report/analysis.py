"""The report's computations on results.json: comparisons of methods against the seeds' spread,
the conclusions they support, whether every task was learned (and where not). Text lines, no
files: the CLI prints some of them, the markdown report (report.markdown) writes them all."""
from __future__ import annotations

from cl_core.continual.methods import COMPARISONS
from cl_core.dema.regime import CAT_GE1, CAT_JUMP, CAT_LE0, CAT_NAN, CAT_START, JUMP, RegimeReport
from cl_core.metrics import METRIC_LABELS


def _pm(mean: float, std: float, n_seeds: int = 2) -> str:
    """mean ± standard deviation over seeds; one seed has no spread, so only the mean."""
    return f"{mean:.2f} ± {std:.2f}" if n_seeds > 1 else f"{mean:.2f}"


# The comparisons the demo is built to answer (each method against what it is added to) are
# the method table's: methods.COMPARISONS.
COMPARED_METRICS = ("avg_acc", "forgetting")


def _compare(name_a, a_vals, name_b, b_vals, label, lower_is_better=False) -> dict:
    """One comparison: the difference of the seed means, whether it exceeds the seeds' spread
    (|Δ| > std_a + std_b, the standard deviations over seeds), and in how many seeds (each
    pairs the same base, data and initialisation) ``name_a`` was better."""
    from cl_core.metrics import mean_std

    (ma, sa), (mb, sb) = mean_std(a_vals), mean_std(b_vals)
    wins = sum(1 for x, y in zip(a_vals, b_vals) if (x < y if lower_is_better else x > y))
    return {"label": label, "a": name_a, "b": name_b, "ma": ma, "sa": sa, "mb": mb, "sb": sb, "delta": ma - mb,
            "spread": sa + sb, "beyond": abs(ma - mb) > sa + sb, "wins": wins, "seeds": len(a_vals)}


def _difference(c: dict) -> str:
    """A comparison (:func:`_compare`) in words."""
    verdict = "exceeds the seeds' spread" if c["beyond"] else "is within the seeds' spread: no conclusion"
    return (f"{c['label']}: {c['a']} {c['ma']:.1f} ± {c['sa']:.1f} vs {c['b']} {c['mb']:.1f} ± {c['sb']:.1f}, "
            f"difference {c['delta']:+.1f} {verdict} (spread {c['spread']:.1f} = sum of the two standard "
            f"deviations); {c['a']} better in {c['wins']} of {c['seeds']} seeds")


_ONE_SEED = ("One seed: there is no spread over seeds to weigh a difference against, so no difference "
             "here supports a conclusion (run with 3 or more --seeds).")


_AGAINST_BASE = "Avg.ACC against the untuned base"


def comparisons(results: dict) -> list:
    """Every comparison the report weighs (:func:`_compare`), computed from the run's own
    numbers: each method against the untuned base, then the pairs of COMPARISONS present in
    the run, on COMPARED_METRICS. Empty with one seed (no spread)."""
    methods = results["methods"]
    seeds = [str(s) for s in results["config"]["seeds"]]
    if len(seeds) < 2:
        return []
    out = []

    def per_seed(m, metric):
        return [methods[m]["seeds"][s]["metrics"][metric] for s in seeds]

    base = results.get("base_metrics")
    if base:
        b_vals = [base["per_seed"][s] for s in seeds]
        for m in methods:
            out.append(_compare(m, per_seed(m, "avg_acc"), "base", b_vals, _AGAINST_BASE))
    for a, b in COMPARISONS:
        if a in methods and b in methods:
            for metric in COMPARED_METRICS:
                out.append(_compare(a, per_seed(a, metric), b, per_seed(b, metric), METRIC_LABELS[metric],
                                    lower_is_better=metric.startswith("forgetting")))
    return out


def conclusions(results: dict) -> list:
    """Which differences of this run exceed the seeds' spread and which do not, one line each,
    computed from the run's own numbers (never written in advance)."""
    found = comparisons(results)
    return [_difference(c) for c in found] if found else [_ONE_SEED]


def summary(results: dict) -> list:
    """The conclusions in short for the terminal (the report has each in full): the pairs
    whose difference exceeds the seeds' spread, one line each with the differences, then those
    within it, then the methods above the untuned base beyond the spread."""
    found = comparisons(results)
    if not found:
        return [_ONE_SEED]
    pairs: dict = {}
    for c in found:
        if c["label"] != _AGAINST_BASE:
            pairs.setdefault((c["a"], c["b"]), []).append(c)

    def said(cs):
        return ", ".join(f"{c['label']} {c['delta']:+.1f} ({c['a']} better in {c['wins']} of {c['seeds']})" for c in cs)

    beyond = [f"{a} vs {b}: {said([c for c in cs if c['beyond']])}" for (a, b), cs in pairs.items()
              if any(c["beyond"] for c in cs)]
    within = [f"{a} vs {b}" + ("" if not any(c["beyond"] for c in cs) else
                                " on " + ", ".join(c["label"] for c in cs if not c["beyond"]))
              for (a, b), cs in pairs.items() if not all(c["beyond"] for c in cs)]
    n = found[0]["seeds"]
    out = [f"Beyond the spread of the {n} seeds:" + ("" if beyond else " none.")] + [f"  {line}" for line in beyond]
    out.append("Within it, no conclusion: " + ("; ".join(within) if within else "none") + ".")
    above = [c["a"] for c in found if c["label"] == _AGAINST_BASE and c["beyond"] and c["delta"] > 0]
    rest = [c["a"] for c in found if c["label"] == _AGAINST_BASE and c["a"] not in above]
    if above or rest:
        out.append("Above the untuned base beyond the spread: " + (", ".join(above) or "none")
                   + ("" if not rest else f"; not beyond it: {', '.join(rest)}") + ".")
    return out


# A task counts as learned in a seed when its accuracy right after its training reaches this.
LEARNED_AT = 80.0


def learned(results: dict, at: float = LEARNED_AT) -> list:
    """Whether every task could be learned within the run's budget, computed from the
    accuracy of each task right after its own training (the matrix diagonal): first whether,
    in every seed, at least one method reached ``at`` % on it (else the task is not learnable
    at this budget and no method's result on it means much), then per method where it stayed
    below (the method, not the task: a continued LoRA set, or EMA weights that lag)."""
    methods = results["methods"]
    tasks = results["tasks"]
    seeds = [str(s) for s in results["config"]["seeds"]]
    if not methods:
        return []
    best = {(j, s): max(_just_trained(results, m, s)[j] for m in methods) for j in range(len(tasks)) for s in seeds}
    missed = [(tasks[j], s, v) for (j, s), v in best.items() if v < at]
    if missed:
        out = ["Not every task was learned within the budget: " + "; ".join(
            f"{t} in seed {s} (best method {v:.0f} % right after its training)" for t, s, v in missed)
            + f", below {at:.0f} %. Results on such a task do not compare methods (more --steps, or a larger model)."]
    else:
        j, s = min(best, key=best.get)
        out = [f"Every task was learned within the budget: right after its training, at least one method reached "
               f"{at:.0f} % or more on every task in every seed (lowest of those bests: {tasks[j]} in seed {s}, "
               f"{best[(j, s)]:.0f} %)."]
    for m, short in shortfalls(results, at).items():
        out.append(f"{m} stayed below {at:.0f} % right after training on: " + "; ".join(
            f"{t} " + ", ".join(f"{v:.0f} (seed {s})" for s, v in found) for t, found in short.items()) + ".")
    return out


def _just_trained(results: dict, method: str, seed: str) -> list:
    """Each task's accuracy right after its own training (the matrix diagonal) in one seed."""
    rows = results["methods"][method]["seeds"][seed]["matrix"]
    return [rows[j][j] for j in range(len(results["tasks"]))]


def shortfalls(results: dict, at: float = LEARNED_AT) -> dict:
    """{method: {task: [(seed, accuracy), ...]}} where a method's accuracy right after a task's
    training stayed below ``at`` %; only the methods that did somewhere."""
    out: dict = {}
    for m in results["methods"]:
        for s in (str(s) for s in results["config"]["seeds"]):
            for task, v in zip(results["tasks"], _just_trained(results, m, s)):
                if v < at:
                    out.setdefault(m, {}).setdefault(task, []).append((s, v))
    return out


def _seeds_text(n: int) -> str:
    return f"{n} seed" if n == 1 else f"{n} seeds"


def _official_switches(results: dict, method: str):
    """Per task, DEMA on in the official CoIN scripts, when this run is theirs (the bundled tasks
    in CoIN's order, original templates) and ``method`` has an EMA; else None."""
    from cl_core.continual.config import RunConfig

    cfg = RunConfig.from_dict(results["config"])
    if cfg.plan(method).ema is None:
        return None
    return cfg.official_switches()


def _base_row(results: dict):
    """The untuned base's zero-shot accuracy per task (seed mean), or None without a base."""
    b = results.get("base_metrics")
    return b["zero_shot"] if b else None


# ---- DEMA's regime (cl_core/dema/regime.py) of each EMA method

_CAUSES = ((CAT_GE1, "the formula's α ≥ 1"), (CAT_START, "no previous gradient"), (CAT_LE0, "α ≤ 0"),
           (CAT_NAN, "α NaN"))


def regime_report(results: dict, method: str, task=None):
    """The RegimeReport of `method` over all its tasks and seeds (or task `task`, over the
    seeds), from results.json; None where no EMA ran."""
    reg = results["methods"][method].get("regime")
    if not reg:
        return None
    if task is None:
        return RegimeReport.from_records([reg["total"]])
    entry = reg["per_task"][task] if task < len(reg["per_task"]) else None
    return None if entry is None else RegimeReport.from_records([entry["record"]])


def _lag_text(results: dict, method: str) -> str:
    lags = [r.lag for r in (regime_report(results, method, j) for j in range(len(results["tasks"])))
            if r is not None and r.lag is not None]
    if not lags:
        return ""
    span = f"{min(lags):.0%}" if max(lags) - min(lags) < 0.005 else f"{min(lags):.0%}-{max(lags):.0%}"
    return f"; the EMA ended its tasks {span} of the way back towards each task's start (L1 lag)"


def regime_lines(results: dict, methods=None) -> list:
    """One line per EMA method (of `methods`, default all): in which regime its EMA ran over every task and seed with the
    EMA on (the share at the fallback by cause, jumps, the α quantiles, the lag at the tasks'
    ends), and whether that is out of DEMA's regime. Computed from the run's own counts."""
    out = []
    for method, r in results["methods"].items():
        if methods is not None and method not in methods:
            continue
        ema = r.get("ema_config")
        rep = regime_report(results, method)
        if rep is None or not ema or not rep.tensor_updates:
            continue
        lag = _lag_text(results, method)
        if ema["formula"] == "fixed":
            out.append(f"{method}: a fixed EMA (α = {1 - ema['beta']:.3g} on every update){lag}.")
            continue
        n = rep.tensor_updates
        q = rep.quantiles()
        alpha = "" if q[1] is None else f", α set by the formula at {q[0]:.2g} / {q[1]:.2g} / {q[2]:.2g} (10/50/90 %)"
        causes = ", ".join(f"{why} {rep.counts[c] / n:.0%}" for c, why in _CAUSES if rep.counts[c])
        shares = (f"{rep.fallback_share:.0%} of its {n:,} tensor-updates at the fallback α {ema['fallback']:g}"
                  + (f" ({causes})" if causes else "") + f", {rep.jump_share:.0%} jumps (α > {JUMP:g}){alpha}{lag}")
        verdict = rep.verdict()
        if verdict == "fallback":
            out.append(f"{method} ran out of DEMA's regime, in effect a fixed EMA of beta {1 - ema['fallback']:g}: "
                       f"{shares}.")
        elif verdict == "jumps":
            out.append(f"{method} ran out of DEMA's regime, driven by jumps ({rep.counts[CAT_JUMP] / rep.formula_set:.0%} "
                       f"of the α its formula set): {shares}.")
        else:
            out.append(f"{method} ran in DEMA's regime: {shares}.")
    return out


def out_of_regime(results: dict) -> list:
    """The methods whose dynamic EMA ran out of its regime over the run."""
    return [m for m in results["methods"]
            if (rep := regime_report(results, m)) is not None and rep.formula != "fixed" and rep.verdict()]
