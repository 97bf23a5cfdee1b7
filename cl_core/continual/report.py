"""The run report: ``report.md`` and PNG plots (matplotlib, Agg backend) in the run folder.

    from cl_core.continual.report import write_report
    write_report(results, out_dir)      # results: the dict of results.json

Plots: ``heatmap_<method>.png`` (seed-mean accuracy matrix), ``per_task_accuracy.png``
(accuracy on each task over the sequence, one panel per task, one line per method) and
``alpha_trace.png`` (mean α = 1 − β per optimizer step, for the methods with an EMA).
"""
from __future__ import annotations

from pathlib import Path

from cl_core.metrics import METRIC_LABELS, METRIC_NAMES


def _slug(method: str) -> str:
    return method.replace("+", "_")


def _pm(mean: float, std: float) -> str:
    return f"{mean:.2f} ± {std:.2f}"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_heatmap(matrix, tasks, title: str, path: Path) -> None:
    plt = _pyplot()
    t = len(tasks)
    fig, ax = plt.subplots(figsize=(1.0 + 0.62 * t, 0.8 + 0.55 * t))
    im = ax.imshow(matrix, vmin=0, vmax=100, cmap="viridis")
    ax.set_xticks(range(t), tasks, rotation=45, ha="right")
    ax.set_yticks(range(t), [f"after {name}" for name in tasks])
    ax.set_xlabel("evaluated task")
    ax.set_title(title, fontsize=10)
    for j in range(t):
        for i in range(t):
            v = matrix[j][i]
            ax.text(i, j, f"{v:.0f}", ha="center", va="center", fontsize=7,
                    color="white" if v < 60 else "black", alpha=1.0 if i <= j else 0.45)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="accuracy (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")  # long task names must not be clipped
    plt.close(fig)


def plot_per_task(results: dict, path: Path) -> None:
    plt = _pyplot()
    tasks = results["tasks"]
    t = len(tasks)
    cols = min(4, t)
    rows = (t + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.5 * rows), squeeze=False, sharey=True)
    x = list(range(1, t + 1))
    for i, name in enumerate(tasks):
        ax = axes[i // cols][i % cols]
        for method, r in results["methods"].items():
            col = [row[i] for row in r["matrix"]]
            ax.plot(x[i:], col[i:], marker="o", markersize=3, label=method)
        ax.axvline(i + 1, color="grey", lw=0.6, ls=":")
        ax.set_title(f"task {i + 1}: {name}", fontsize=9)
        ax.set_xticks(x)
        ax.set_ylim(-3, 103)
        ax.set_xlabel("after training task", fontsize=8)
        if i % cols == 0:
            ax.set_ylabel("accuracy (%)", fontsize=8)
    for k in range(t, rows * cols):
        axes[k // cols][k % cols].axis("off")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=len(labels), fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.savefig(path, dpi=110, bbox_inches="tight")  # long task names must not be clipped
    plt.close(fig)


def plot_alpha(results: dict, path: Path) -> bool:
    """Mean α per step (first seed), tasks one after the other; False when no method has one."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 3.2))
    drawn = False
    for method, r in results["methods"].items():
        seed = next(iter(r["seeds"]))
        traces = r["seeds"][seed]["alpha"]
        xs, ys, offset = [], [], 0
        steps = results["config"]["steps"]
        for j, trace in enumerate(traces):
            xs.extend(offset + k + 1 for k in range(len(trace)))
            ys.extend(trace)
            offset += steps
        if ys:
            ax.plot(xs, ys, lw=0.9, label=f"{method} (seed {seed})")
            drawn = True
    if not drawn:
        plt.close(fig)
        return False
    for j in range(1, len(results["tasks"])):
        ax.axvline(j * results["config"]["steps"], color="grey", lw=0.5, ls=":")
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step (tasks one after another)")
    ax.set_ylabel("mean α = 1 − β")
    ax.set_title("EMA weight per step (fixed EMA: α = 1 − β; DEMA: dynamic)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")  # long task names must not be clipped
    plt.close(fig)
    return True


def _matrix_table(matrix, std, tasks) -> list[str]:
    lines = ["| after \\ on | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
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
                     f"{cfg['n_test']} test samples per task. Model: a tiny Llama (hidden {cfg['hidden_size']}, "
                     f"{cfg['num_layers']} layers) trained from scratch in stage 1 ({cfg['stage1_steps']} steps, "
                     f"once per seed, shared by all methods).")
    else:
        lines.append(f"Tasks: {len(tasks)} task files; model `{cfg['model']}`.")
    lines += [
        "",
        f"Stage 2, the same for every method: {cfg['steps']} optimizer steps per task, batch {cfg['batch_size']}, "
        f"learning rate {cfg['lr']} (cosine, {cfg['warmup_steps']} warm-up steps), LoRA r={cfg['lora_r']} "
        f"alpha={cfg['lora_alpha']} on `{cfg['target_modules']}`. Seeds: {', '.join(map(str, seeds))}. "
        f"Fixed EMA β={cfg['ema_beta']}; DEMA formula `{cfg['dema_formula']}` (scale {cfg['dema_scale']}, "
        f"fallback {cfg['dema_fallback']}).",
        "",
        "Tasks in training order: " + ", ".join(f"{i + 1}. {n} ({tt})" for i, (n, tt) in
                                               enumerate(zip(tasks, results["task_types"]))) + ".",
        "",
        f"## Methods compared (mean ± std over {len(seeds)} seed{'s' if len(seeds) != 1 else ''})",
        "",
        "| method | " + " | ".join(METRIC_LABELS[m] for m in METRIC_NAMES) + " |",
        "|---" * (len(METRIC_NAMES) + 1) + "|",
    ]
    for method, r in methods.items():
        lines.append(f"| {method} | " + " | ".join(_pm(r["metrics"][m], r["metrics_std"][m]) for m in METRIC_NAMES)
                     + " |")
    lines += [
        "",
        "Avg.ACC: mean accuracy on all tasks after the last one. Forgetting: mean drop from each task's "
        "accuracy right after training it to its final accuracy (tasks 1..T-1). New.ACC: mean accuracy on "
        "each task right after training it. BWT = (1/T)·Σ(final − just-trained) (CoIN). MAA: mean over "
        "steps of the mean accuracy on the tasks seen so far (CoIN). All in percentage points.",
        "",
    ]
    if "lora" in methods:
        r = methods["lora"]
        lines += [f"**Plain sequential LoRA forgets {r['metrics']['forgetting']:.1f} ± "
                  f"{r['metrics_std']['forgetting']:.1f} points** on average (Forgetting; BWT "
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
              "Row j: accuracy on every task after training task j (seed mean ± std). *Italic*: tasks not "
              "trained yet (not used by the metrics).", ""]
    for method, r in methods.items():
        png = f"heatmap_{_slug(method)}.png"
        plot_heatmap(r["matrix"], tasks, f"{method}: accuracy after each task (mean of {len(seeds)} seeds)",
                     out / png)
        lines += [f"### {method}", "", f"![{method} accuracy matrix]({png})", ""]
        lines += _matrix_table(r["matrix"], r["matrix_std"], tasks)
        lines.append("")
        if method == "dema+group":
            lines += _grouping_lines(r, tasks)

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
    lines += ["## Files", "",
              "`results.json` (per method: seed-mean `matrix` and `metrics`, per seed the same plus α traces), "
              "`state.json` (finished units, for resuming), `config.json`, `chains/<method>/seed<s>/task<j>/` "
              "(final LoRA adapters, PEFT format), `base/seed<s>/` (stage-1 base model).", ""]
    if "wall_seconds_this_call" in results:
        lines += [f"Wall time of the call that finished this run: {results['wall_seconds_this_call']:.0f} s.", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def _grouping_lines(r: dict, tasks) -> list[str]:
    lines = ["Instruction grouping decisions (first seed; every seed sees the same templates):", "",
             "| task | group | re-used (DEMA on) | similarity to earlier groups |", "|---|---|---|---|"]
    seed = next(iter(r["seeds"].values()))
    for name, g, reused, sims in zip(tasks, seed["groups"], seed["reused"], seed["similarities"]):
        lines.append(f"| {name} | {g} | {'yes' if reused else 'no (new set)'} | "
                     f"{', '.join(f'{s:.2f}' for s in sims) or '-'} |")
    lines.append("")
    return lines
