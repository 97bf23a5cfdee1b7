"""``report.md``: the run report in markdown, with the plots (report.plots) and the computed
comparisons (report.analysis) of a run's results.json."""
from __future__ import annotations

from pathlib import Path

from cl_core.continual import alpha as alpha_stats
from cl_core.continual.methods import BASELINE, PAPER_ROWS, TABLE, method_slug
from cl_core.continual.report.analysis import (CAT_GE1, CAT_LE0, CAT_NAN, CAT_START, _base_row, _official_switches,
                                               _pm, _seeds_text, conclusions, learned, out_of_regime, regime_lines,
                                               regime_report)
from cl_core.continual.report.plots import plot_alpha, plot_alpha_hist, plot_heatmap, plot_per_task
from cl_core.metrics import METRIC_LABELS, METRIC_NAMES


def _matrix_table(matrix, std, tasks, base=None) -> list[str]:
    lines = ["| after \\ on | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
    if base is not None:
        lines.append("| base (zero-shot) | " + " | ".join(f"*{v:.1f}*" for v in base) + " |")
    for j, row in enumerate(matrix):
        cells = []
        for i, v in enumerate(row):
            cell = f"{v:.1f}" if std is None or std[j][i] == 0 else f"{v:.1f}±{std[j][i]:.1f}"
            cells.append(cell if i <= j else f"*{cell}*")
        lines.append(f"| {tasks[j]} | " + " | ".join(cells) + " |")
    return lines


def write_report(results: dict, out_dir) -> Path:
    """Write report.md and the plots into ``out_dir``; returns the report's path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tasks = results["tasks"]
    cfg = results["config"]
    methods = results["methods"]
    seeds = cfg["seeds"]
    lines = ["# cl_core continual instruction tuning report", ""]
    if results["benchmark"] == "bundled":
        lines.append(f"Benchmark: the bundled synthetic CoIN-like tasks (cl_core.continual.synthetic), instruction "
                     f"templates `{cfg['variant']}`, order `{cfg['order']}`; {cfg['n_train']} training and "
                     f"{cfg['n_test']} test samples per task.")
    else:
        lines.append(f"Tasks: {len(tasks)} task files.")
    lines[-1] += " " + _model_text(results)
    lines += [
        "",
        f"Stage 2, the same for every method: {cfg['steps']} optimizer steps per task, batch {cfg['batch_size']}, "
        f"learning rate {cfg['lr']} (cosine, {cfg['warmup_steps']} warm-up steps), LoRA r={cfg['lora_r']} "
        f"alpha={cfg['lora_alpha']} on `{cfg['target_modules']}`. Seeds: {', '.join(map(str, seeds))}. "
        "Each method's EMA, LoRA-set and routing settings are in the table below.",
        "",
        "Tasks in training order: " + ", ".join(f"{i + 1}. {n} ({tt})" for i, (n, tt) in
                                               enumerate(zip(tasks, results["task_types"]))) + ".",
        "",
    ]
    lines += _out_of_regime_lines(results)
    lines += _unlike_official_lines(results["methods"])
    lines += [
        (f"## Methods compared (mean ± standard deviation over {_seeds_text(len(seeds))})" if len(seeds) > 1
         else f"## Methods compared (one seed, {seeds[0]}: no spread to show)"),
        "",
        "| method | " + " | ".join(METRIC_LABELS[m] for m in METRIC_NAMES) + " |",
        "|---" * (len(METRIC_NAMES) + 1) + "|",
    ]
    bm = results.get("base_metrics")
    if bm:
        lines.append("| base (zero-shot) | " + " | ".join(_pm(bm["avg_acc"], bm["avg_acc_std"], len(seeds))
                                                      if m == "avg_acc" else "-" for m in METRIC_NAMES) + " |")
    for method, r in methods.items():
        lines.append(f"| {method} | " + " | ".join(_pm(r["metrics"][m], r["metrics_std"][m], len(seeds))
                                                  for m in METRIC_NAMES if m in r["metrics"]) + " |")
    lines += _paper_table_lines(results)
    lines += [
        "",
        ("± is the standard deviation over the seeds (each seed: its own stage-1 base, data order and LoRA "
         "initialisation). " if len(seeds) > 1 else "") +
        ("`base (zero-shot)`: the untuned stage-1 model, before any stage-2 task (its Avg.ACC is its mean "
         "accuracy on all tasks; the other metrics need training)." if bm else ""),
        "",
        "### What the differences support",
        "",
    ]
    lines += [f"- {c}" for c in results.get("conclusions") or conclusions(results)]
    lines += ["", "### Was every task learned?", ""]
    lines += [f"- {c}" for c in results.get("learned") or learned(results)]
    lines += [
        "",
        "Right after a task's training, as in New.ACC; an EMA method is scored on its averaged weights, which "
        "lag the trained ones.",
        "",
        "Avg.ACC: mean accuracy on all tasks after the last one. Forgetting: mean drop from each task's "
        "accuracy right after training it to its final accuracy (tasks 1..T-1; LCIA). Forgetting (max): the "
        "same drop from the best accuracy the task ever had after it was trained (Continual-NExT). New.ACC: "
        "mean accuracy on each task right after training it. BWT = (1/T)·Σ(final − just-trained) (CoIN). MAA: "
        "mean over steps of the mean accuracy on the tasks seen so far (CoIN). All in percentage points.",
        "",
    ]
    lines += _never_on_lines(methods)
    lines += _settings_lines(methods)
    if BASELINE in methods:
        r = methods[BASELINE]
        forgets = (f"{r['metrics']['forgetting']:.1f} ± {r['metrics_std']['forgetting']:.1f}" if len(seeds) > 1
                   else f"{r['metrics']['forgetting']:.1f}")
        lines += [f"**Plain sequential LoRA forgets {forgets} points** on average (Forgetting; BWT "
                  f"{r['metrics']['bwt']:.1f}): accuracy right after each task {r['metrics']['new_acc']:.1f}, "
                  f"after the whole sequence {r['metrics']['avg_acc']:.1f}.", ""]
    base = results.get("base", {})
    if base:
        lines += ["## Base model before stage 2", "",
                  "| seed | " + " | ".join(tasks) + (" | stage-1 task |" if any("stage1" in b for b in base.values())
                                                  else " |"),
                  "|---" * (len(tasks) + 1 + (1 if any("stage1" in b for b in base.values()) else 0)) + "|"]
        for seed, b in base.items():
            extra = f" | {b['stage1']:.1f}" if "stage1" in b else ""
            lines.append(f"| {seed} | " + " | ".join(f"{v:.1f}" for v in b["zero_shot"]) + extra + " |")
        lines += ["", "Zero-shot accuracy of the base on each task (stage 2 has to teach the tasks' "
                  "instructions and answer conventions); the last column scores the stage-1 task itself.", ""]

    lines += ["## Accuracy matrices", "",
              "Row j: accuracy on every task after training task j (" + ("seed mean ± standard deviation"
              if len(seeds) > 1 else f"seed {seeds[0]}") + "). *Italic* (hatched in the heatmaps): tasks not "
              "trained yet (not used by the metrics); the first row is the untuned base.", ""]
    for method, r in methods.items():
        png = f"heatmap_{method_slug(method)}.png"
        title = (f"{method}: accuracy after each task (mean of {_seeds_text(len(seeds))})" if len(seeds) > 1
                 else f"{method}: accuracy after each task (seed {seeds[0]})")
        plot_heatmap(r["matrix"], tasks, title, out / png, base=_base_row(results))
        lines += [f"### {method}", "", f"![{method} accuracy matrix]({png})", ""]
        lines += _matrix_table(r["matrix"], r["matrix_std"], tasks, base=_base_row(results))
        lines.append("")
        if any(len(set(s["groups"])) > 1 for s in r["seeds"].values()):
            lines += _grouping_lines(r, tasks, _official_switches(results, method))

    plot_per_task(results, out / "per_task_accuracy.png")
    lines += ["## Accuracy on each task over the sequence", "", "![per-task accuracy](per_task_accuracy.png)", ""]
    if plot_alpha(results, out / "alpha_trace.png"):
        lines += ["## EMA weight over the steps", "",
                  "Mean over the LoRA tensors of α_t = 1 − β_t at every optimizer step of the tasks where the "
                  "EMA was on (first seed; log scale). Full per-tensor traces: "
                  "`chains/<method>/seed<s>/alpha_task<j>.json`.", "", "![alpha trace](alpha_trace.png)", ""]
        lines += ["| method | tasks with EMA | mean α | min α | max α |", "|---|---|---|---|---|"]
        for method, r in methods.items():
            vals = [a for s in r["seeds"].values() for trace in s["alpha"] for a in trace]
            if vals:
                n_tasks = sum(1 for s in r["seeds"].values() for trace in s["alpha"] if trace)
                lines.append(f"| {method} | {n_tasks} | {sum(vals) / len(vals):.4f} | {min(vals):.4f} | "
                             f"{max(vals):.4f} |")
        lines.append("")
    lines += _regime_lines(results)
    lines += _alpha_hist_lines(results, out)
    lines += ["## Files", "",
              "`results.json` (per method: seed-mean `matrix`, `metrics` and `settings`; per seed the same plus, "
              "one entry per task, `groups`, `reused`, `ema`, `dema` (DEMA on), `init_from` (the task whose "
              "weights the trained set started from; null: fresh), mean α per step and `alpha_counts`), "
              "`state.json` (finished units, for resuming), `config.json`, `chains/<method>/seed<s>/task<j>/` "
              "(final LoRA adapters, PEFT format; moelora: `moelora_config.json` + `moelora.safetensors`, reloaded "
              "by `cl_core.moelora.load_moelora`), `chains/<method>/seed<s>/alpha_task<j>.json` (α per step and "
              "tensor, with the tensors' sizes), `base/seed<s>/` (stage-1 base model).", ""]
    if "wall_seconds_this_call" in results:
        lines += [f"Wall time of the call that finished this run: {results['wall_seconds_this_call']:.0f} s "
                  "(the time `cl-core` prints; a resumed run counts only its last call).", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def _grouping_lines(r: dict, tasks, official=None) -> list[str]:
    """The grouping table; with ``official`` (per task, DEMA on in CoIN's scripts) also what
    grouping decided, what the scripts did, and where the two differ."""
    yn = lambda v: "yes" if v else "no"  # noqa: E731
    extra = " DEMA by grouping | DEMA in the official scripts |" if official is not None else ""
    lines = ["Instruction grouping decisions (first seed; every seed sees the same templates):", "",
             f"| task | group | re-used |{extra} DEMA on | set started from | similarity to earlier groups |",
             "|---|---|---|" + ("---|---|" if official is not None else "") + "---|---|---|"]
    seed = next(iter(r["seeds"].values()))
    n = len(seed["groups"])
    dema = seed.get("dema") or seed.get("ema") or [False] * n
    init = seed.get("init_from") or [None] * n
    for k, (name, g, reused, on, src, sims) in enumerate(zip(tasks, seed["groups"], seed["reused"], dema, init,
                                                             seed["similarities"])):
        start = "fresh" if src is None else f"task {src + 1} ({tasks[src]})"
        cols = f" {yn(reused)} | {yn(official[k])} |" if official is not None else ""
        lines.append(f"| {name} | {g} | {'yes' if reused else 'no (new set)'} |{cols} {yn(on)} | {start} | "
                     f"{', '.join(f'{s:.2f}' for s in sims) or '-'} |")
    lines.append("")
    if official is not None:
        differ = [f"task {k + 1} ({tasks[k]}): grouping {'on' if reused else 'off'}, the official scripts "
                  f"{'on' if official[k] else 'off'}" for k, reused in enumerate(seed["reused"]) if bool(reused) !=
                  official[k]]
        if differ:
            lines += ["DEMA by grouping (on when a task re-trains a set) differs from the official CoIN scripts "
                      "(`--dema True` only for tasks 4, 5, 7, 8) at " + "; ".join(differ) + ". `DEMA on` is what "
                      "this run did; `--dema-tasks 4,5,7,8` follows the scripts exactly.", ""]
        else:
            lines += ["DEMA by grouping agrees with the official CoIN scripts on every task.", ""]
    return lines


def _model_text(results: dict) -> str:
    """The model actually used, from what the run recorded (older results: from the config)."""
    cfg = results["config"]
    m = results.get("model")
    if m:
        size = f"{m['parameters']:,} parameters"
        shape = ", ".join(f"{k} {m[k]}" for k in ("hidden_size", "num_layers", "vocab_size") if m.get(k) is not None)
        if m.get("source") == "tiny":
            kind = "tiny LLaVA (CLIP-style vision tower, projector, tiny Llama)" if m.get("model_type") == "llava" \
                else "tiny Llama"
            return (f"Model: the bundled {kind} ({size}; {shape}), trained from scratch in stage 1 "
                    f"({cfg['stage1_steps']} steps, {_stage1_once(cfg)}, shared by all methods)."
                    + _multimodal_text(results))
        return f"Model: `{m['source']}` ({m.get('model_type', '?')}, {size}; {shape})." + _multimodal_text(results)
    if cfg.get("model"):
        return f"Model: `{cfg['model']}`."
    layers = f"{cfg['num_layers']} layer" + ("s" if cfg["num_layers"] != 1 else "")
    return (f"Model: a tiny Llama (hidden {cfg['hidden_size']}, {layers}) trained from scratch "
            f"in stage 1 ({cfg['stage1_steps']} steps, {_stage1_once(cfg)}, shared by all methods).")


def _multimodal_text(results: dict) -> str:
    """The processor and the images of a multimodal run (empty for a text run)."""
    m, im, cfg = results.get("model") or {}, results.get("images"), results["config"]
    p = m.get("processor")
    if not p and not im:
        return ""
    out = ""
    if p:
        size = p.get("image_size")
        size = "x".join(str(v) for v in size.values()) if isinstance(size, dict) else size
        out += (f" Processor: {p['processor']} ({p['image_processor']}, images at {size}, image token "
                f"`{p['image_token']}`); LoRA on the language model only, vision tower frozen"
                + (", multi-modal projector trained (`--train-projector`)" if cfg.get("train_projector") else "")
                + ".")
    if im:
        sizes = ", ".join(f"{k} ({v})" for k, v in list(im["sizes"].items())[:5])
        more = f" and {len(im['sizes']) - 5} more sizes" if len(im["sizes"]) > 5 else ""
        if im.get("source") == "files":
            out += (f" Images: {im['count']} distinct files under `{im['folder']}`" if im.get("folder")
                    else f" Images: {im['count']} distinct files")
            out += f", sizes {sizes}{more}"
            if im.get("records_without_image"):
                out += f"; {im['records_without_image']} records without an image (text only)"
            skipped = im.get("skipped") or {}
            out += (("; records skipped for a missing or unreadable image (`--skip-bad`): "
                     + ", ".join(f"{k} {v}" for k, v in skipped.items())) if skipped
                    else "; no record skipped for its image") + "."
        else:
            out += f" Images: {im['count']} scene pictures drawn by `cl_core.continual.images` ({sizes}); the prompts " \
                   "hold no scene text, so every answer is read from the picture."
    return out


def _stage1_once(cfg: dict) -> str:
    s1 = cfg.get("stage1_seed")
    return "once per seed" if s1 is None else f"once, with seed {s1}, for every seed"


# The settings in which a grouping method with DEMA can differ from the official run (lcia).
_OFFICIAL_KEYS = ("a new set starts from", "gradient clipping", "averaged tensors", "test routing", "EMA")


def _unlike_official_lines(methods: dict) -> list[str]:
    """Before comparing: where each custom grouping method with DEMA differs from the official
    run (the lcia recipe's settings), so that its numbers are not read as the paper's method."""
    official = TABLE["lcia"].fixed.describe()
    lines = []
    for m, r in methods.items():
        st = r.get("settings") or {}
        if (m == "lcia" or TABLE.get(m) is None or TABLE[m].kind != "custom" or not TABLE[m].grouping
                or st.get("EMA", "none") == "none"):
            continue
        diff = [f"{k}: {st[k]} (lcia: {official[k]})" for k in _OFFICIAL_KEYS if k in st and st[k] != official[k]]
        if diff:
            lines += [f"**{m} is not the paper's run as it ran:** " + "; ".join(diff)
                      + ". The `lcia` row is the official recipe.", ""]
    return lines


def _settings_lines(methods: dict) -> list[str]:
    rows = [(m, r["settings"]) for m, r in methods.items() if r.get("settings")]
    if not rows:
        return []
    keys = list(dict.fromkeys(k for _, st in rows for k in st))   # every method's keys (the baselines add theirs)
    lines = ["### Settings of each method", "",
             _methods_sentence(), "",
             "| method | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for m, st in rows:
        lines.append(f"| {m} | " + " | ".join(str(st.get(k, "-")) for k in keys) + " |")
    return lines + [""]


def _paper_table_lines(results: dict) -> list[str]:
    """The LCIA paper's Table 1 layout (Avg.ACC, Forgetting, New.ACC per method, its row order)
    for the rows of that table this run has (``--compare paper`` runs them all)."""
    methods, n = results["methods"], len(results["config"]["seeds"])
    rows = [m for m in PAPER_ROWS if m in methods]
    if len(rows) < 2:
        return []
    missing = [m for m in PAPER_ROWS if m not in rows]
    cols = ("avg_acc", "forgetting", "new_acc")
    lines = ["", "### The LCIA paper's Table 1 layout", "",
             "The paper's comparison rows that cl_core runs, in its order (`--compare paper` runs them all"
             + (f"; missing here: {', '.join(missing)}" if missing else "")
             + "). Avg.ACC and New.ACC: higher is better; Forgetting: lower is better.", "",
             "| method | " + " | ".join(METRIC_LABELS[c] for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for m in rows:
        r = methods[m]
        lines.append(f"| {m} | " + " | ".join(_pm(r["metrics"][c], r["metrics_std"][c], n) for c in cols) + " |")
    return lines


def _methods_sentence() -> str:
    """What each method of the table is, and whose settings it takes."""
    def kind(k):
        return "; ".join(f"`{m.name}` {m.trains}" for m in TABLE.values() if m.kind == k)

    recipes = [m.name for m in TABLE.values() if m.kind == "recipe"]
    return (f"The custom methods take the run's flags ({kind('custom')}); the recipes have their own fixed "
            f"settings ({kind('recipe')}; custom methods run beside "
            f"{' or '.join(f'`--recipe {r}`' for r in recipes)} take that recipe's settings); "
            f"{kind('own')}, with its own fixed settings.")


def _never_on_lines(methods: dict) -> list[str]:
    """Say so when a method with an EMA never turned it on (its numbers are then LoRA's)."""
    lines = []
    for m, r in methods.items():
        st = r.get("settings") or {}
        if st.get("EMA", "none") == "none":
            continue
        if not any(on for s in r["seeds"].values() for on in s.get("ema", [])):
            why = ("every task opened a new LoRA set (no task re-trained one)" if "grouping" in st.get("LoRA sets", "")
                   else "the run has a single task")
            lines.append(f"**{m} never turned its EMA on in this run:** {why}, so its numbers show "
                         f"{'grouping, routing and the new-set start' if 'grouping' in st.get('LoRA sets', '') else 'plain LoRA'}"
                         ", not the EMA.")
            lines.append("")
    return lines


# A LLaVA-7B LoRA tensor at the official rank 128: 4096 x 128 elements.
_LLAVA_LORA_NUMEL = 4096 * 128


def _alpha_hist_lines(results: dict, out: Path) -> list[str]:
    methods = results["methods"]
    rows = [(m, r["alpha_counts"]) for m, r in methods.items()
            if r.get("alpha_counts", {}).get("n") and r["alpha_counts"].get("fallback") is not None]
    if not rows:
        return []
    plot_alpha_hist(results, out / "alpha_hist.png")
    lines = ["## Where DEMA's α landed", "",
             "Every per-tensor α of the dynamic-EMA methods (all seeds and tasks with DEMA on): the share that "
             "landed exactly on the fallback (the formula left (0, 1) or could not be computed), between the "
             "fallback and 0.1, and above 0.1.", "", "![alpha histogram](alpha_hist.png)", "",
             "| method | EMA | α values | at the fallback | between | above 0.1 | below the fallback | "
             "geometric mean of the rest | tensor sizes |", "|---|---|---|---|---|---|---|---|---|"]
    for m, c in rows:
        gm = alpha_stats.geometric_mean_in_range(c)
        size = f"{c['numel_min']:,}–{c['numel_max']:,}" if c.get("numel_min") is not None else "-"
        lines.append(f"| {m} | {methods[m].get('settings', {}).get('EMA', '-')} | {c['n']:,} | "
                     f"{alpha_stats.share(c, 'at_fallback'):.0%} | {alpha_stats.share(c, 'between'):.0%} | "
                     f"{alpha_stats.share(c, 'above'):.0%} | {alpha_stats.share(c, 'below'):.0%} | "
                     f"{'-' if gm is None else f'{gm:.3g}'} | {size} |")
    lines.append("")
    lines += _alpha_why(rows, methods)
    return lines


def _alpha_why(rows, methods) -> list[str]:
    """The official constant on small tensors, in words, from this run's numbers."""
    official = [(m, c) for m, c in rows if "scale 2" in methods[m].get("settings", {}).get("EMA", "")]
    if not official:
        return []
    m, c = max(official, key=lambda mc: mc[1]["n"])
    if c.get("numel_max") is None:
        return []
    fb, hi, mid = (alpha_stats.share(c, k) for k in ("at_fallback", "above", "between"))
    ratio = _LLAVA_LORA_NUMEL / c["numel_max"]
    gm = alpha_stats.geometric_mean_in_range(c)
    text = (f"**Why the official scale behaves like this here.** α = scale·(1 + ‖g‖₁)/(‖θ − θ*‖₁·‖g − g_prev‖₁) "
            f"sums L1 norms over whole tensors. For the same per-element numbers each of the three norms grows with "
            f"the element count n, so α shrinks about as 1/n (faster while ‖g‖₁ < 1). The tensors averaged here hold "
            f"{c['numel_min']:,}–{c['numel_max']:,} elements, and with scale 2 the formula for {m} gave α outside "
            f"(0, 1) on {fb:.0%} of the updates, which then took the fallback {c['fallback']:g} (as does a task's "
            f"first step, which has no previous gradient); {hi:.0%} landed "
            f"above 0.1 and only {mid:.0%} in between")
    if gm is not None:
        text += f" (geometric mean of the values off the fallback: {gm:.3g})"
    text += (f". A LLaVA-7B LoRA tensor at the official rank 128 holds {_LLAVA_LORA_NUMEL:,} elements, "
             f"{ratio:,.0f}× more, with a learning rate of 2e-4: the constant was fit there. How far the 1/n "
             "argument carries is measured, not assumed: the EMA's lag adapts to the formula, so the share at the "
             "fallback does not simply fall as 1/n (docs/regime.md).")
    nx = [(mm, cc) for mm, cc in rows if "scale 0.01" in methods[mm].get("settings", {}).get("EMA", "")]
    if nx:
        mm, cc = nx[0]
        text += (f" With Continual-NExT's scale 0.01 (200× smaller) {mm} had "
                 f"{alpha_stats.share(cc, 'at_fallback'):.0%} of its α at its fallback {cc['fallback']:g}, "
                 f"{alpha_stats.share(cc, 'between'):.0%} between it and 0.1, "
                 f"{alpha_stats.share(cc, 'below'):.0%} below it and {alpha_stats.share(cc, 'above'):.0%} above 0.1.")
    return [text, ""]


def _out_of_regime_lines(results: dict) -> list[str]:
    """Before the comparison: which DEMA methods ran out of their regime (so what is compared
    there is not the method as designed), one line each."""
    bad = set(out_of_regime(results))
    if not bad:
        return []
    said = regime_lines(results, bad)
    return (["**Before comparing: DEMA ran out of its regime** (its α mostly at the fallback, or jumps; "
             "per task in \"DEMA's regime per task\" below, what it means in docs/regime.md):", ""]
            + [f"- {line}" for line in said] + [""])


def _regime_lines(results: dict) -> list[str]:
    """Per EMA method and task (mean over the seeds' counts): the share of updates at the
    fallback by cause, jumps, the α quantiles and the EMA's lag at the task's end."""
    methods = [m for m in results["methods"] if regime_report(results, m) is not None]
    if not methods:
        return []
    lines = ["## DEMA's regime per task", "",
             "Every tensor-update of each EMA method, per task over the seeds (cl_core/dema/regime.py): the share "
             "at the fallback α by cause (no previous gradient: a task's first step; the formula's α ≥ 1: it asks "
             "for more than a full step; α ≤ 0; NaN), jumps (α > 0.1), quantiles of the α the formula set, and "
             "the lag ‖θ* − θ‖₁ / ‖θ_start − θ‖₁ at the task's end (how far back towards the task's start the "
             "EMA sits; mean over the seeds).", ""]
    lines += [f"- {line}" for line in regime_lines(results)]
    lines.append("")
    tasks = results["tasks"]
    for m in methods:
        lines += [f"### {m}", "", "| task | at the fallback | no previous gradient | α ≥ 1 | α ≤ 0 | α NaN | jumps | "
                  "α 10 / 50 / 90 % | lag |", "|---|---|---|---|---|---|---|---|---|"]
        for j, name in enumerate(tasks):
            rep = regime_report(results, m, j)
            if rep is None or not rep.tensor_updates:
                continue
            n = rep.tensor_updates
            q = rep.quantiles()
            # a fixed EMA's α is its constant (its line above says it; the bins would round it)
            qs = "-" if q[1] is None or rep.formula == "fixed" else " / ".join(f"{v:.2g}" for v in q)
            fb = "-" if rep.formula == "fixed" else f"{rep.fallback_share:.0%}"
            causes = " | ".join("-" if rep.formula == "fixed" else f"{rep.counts[c] / n:.0%}"
                                for c in (CAT_START, CAT_GE1, CAT_LE0, CAT_NAN))
            lag = "-" if rep.lag is None else f"{rep.lag:.1%}"
            lines.append(f"| {j + 1}. {name} | {fb} | {causes} | {rep.jump_share:.0%} | {qs} | {lag} |")
        lines.append("")
    return lines
