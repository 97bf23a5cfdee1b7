"""The report's PNG plots (matplotlib, Agg backend): ``heatmap_<method>.png`` (seed-mean accuracy
matrix), ``per_task_accuracy.png`` (accuracy on each task over the sequence, one panel per task,
one line per method), ``alpha_trace.png`` (mean α = 1 − β per optimizer step, for the methods
with an EMA) and ``alpha_hist.png`` (where every per-tensor α of the dynamic methods landed)."""
from __future__ import annotations

from pathlib import Path

from cl_core.continual import alpha as alpha_stats
from cl_core.continual.report.analysis import _base_row


# Line styles and markers per method: overlapping lines (equal accuracies) stay visible.
_STYLES = [("-", "o"), ("--", "s"), ("-.", "^"), (":", "D"), ("-", "v"), ("--", "x"), ("-.", "P"), (":", "*")]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_heatmap(matrix, tasks, title: str, path: Path, base=None) -> None:
    """The accuracy matrix; ``base``: the untuned base's zero-shot row, drawn on top.
    Cells of tasks not trained yet are hatched (the key says so): they are not in the metrics."""
    from matplotlib.patches import Patch, Rectangle

    plt = _pyplot()
    t = len(tasks)
    rows = ([list(base)] if base is not None else []) + [list(r) for r in matrix]
    first = 1 if base is not None else 0
    fig, ax = plt.subplots(figsize=(1.0 + 0.62 * t, 1.2 + 0.55 * len(rows)))
    im = ax.imshow(rows, vmin=0, vmax=100, cmap="viridis")
    ax.set_xticks(range(t), tasks, rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), (["base (zero-shot)"] if base is not None else [])
                  + [f"after {name}" for name in tasks])
    ax.set_xlabel("evaluated task")
    ax.set_title(title, fontsize=10)
    for r, row in enumerate(rows):
        j = r - first
        for i, v in enumerate(row):
            untrained = j < 0 or i > j
            if untrained:
                ax.add_patch(Rectangle((i - 0.5, r - 0.5), 1, 1, fill=False, hatch="///", lw=0,
                                       edgecolor="white", alpha=0.5))
            ax.text(i, r, f"{v:.0f}", ha="center", va="center", fontsize=7,
                    color="white" if v < 60 else "black", alpha=0.55 if untrained else 1.0)
    if base is not None:
        ax.axhline(0.5, color="white", lw=1.5)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="accuracy (%)")
    ax.legend(handles=[Patch(facecolor="grey", hatch="///", edgecolor="white",
                             label="task not trained yet (not in the metrics)")],
              loc="upper center", bbox_to_anchor=(0.5, -0.16 - 0.04 * (t > 6)), fontsize=7, frameon=False)
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
    n_methods = len(results["methods"])
    for i, name in enumerate(tasks):
        ax = axes[i // cols][i % cols]
        for k, (method, r) in enumerate(results["methods"].items()):
            col = [row[i] for row in r["matrix"]]
            ls, marker = _STYLES[k % len(_STYLES)]
            # A small sideways offset per method: equal accuracies do not hide each other.
            dx = (k - (n_methods - 1) / 2) * 0.06
            ax.plot([v + dx for v in x[i:]], col[i:], ls=ls, marker=marker, markersize=4, lw=1.2,
                    alpha=0.85, label=method)
        base = _base_row(results)
        if base is not None:
            ax.axhline(base[i], color="black", lw=1.0, ls=(0, (1, 2)), label="base (zero-shot)")
        ax.axvline(i + 1, color="grey", lw=0.6, ls=":")
        ax.set_title(f"task {i + 1}: {name}", fontsize=9)
        ax.set_xticks(x)
        ax.set_xlim(0.6, t + 0.4)
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


def alpha_series(traces, steps: int):
    """(x, y) of a method's mean-α trace over the tasks one after another: NaN where the
    EMA was off (a task without EMA, and one point at every task boundary, since each task
    starts its own EMA), so a plot breaks the line there instead of joining across."""
    nan = float("nan")
    xs, ys = [], []
    for j, trace in enumerate(traces):
        offset = j * steps
        if trace:
            xs.extend(offset + k + 1 for k in range(len(trace)))
            ys.extend(trace)
        else:
            xs.extend(offset + k + 1 for k in range(steps))
            ys.extend([nan] * steps)
        xs.append(offset + steps + 0.5)
        ys.append(nan)
    return xs, ys


def plot_alpha(results: dict, path: Path) -> bool:
    """Mean α per step (first seed), tasks one after the other; False when no method has one."""
    plt = _pyplot()
    tasks = results["tasks"]
    steps = results["config"]["steps"]
    fig, ax = plt.subplots(figsize=(max(8, 1.1 * len(tasks)), 3.4))
    drawn = False
    for k, (method, r) in enumerate(results["methods"].items()):
        seed = next(iter(r["seeds"]))
        traces = r["seeds"][seed]["alpha"]
        if not any(traces):
            continue
        xs, ys = alpha_series(traces, steps)
        ax.plot(xs, ys, lw=0.9, ls=_STYLES[k % len(_STYLES)][0], label=f"{method} (seed {seed})")
        drawn = True
    if not drawn:
        plt.close(fig)
        return False
    for j in range(1, len(tasks)):
        ax.axvline(j * steps, color="grey", lw=0.5, ls=":")
    # Task names between the boundaries, above the plot (not over the data).
    ax.set_xlim(0, len(tasks) * steps)
    top = ax.secondary_xaxis("top")
    top.set_xticks([(j + 0.5) * steps for j in range(len(tasks))], tasks, fontsize=7)
    top.tick_params(length=0)
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step (tasks one after another; gaps: EMA off)")
    ax.set_ylabel("mean α = 1 − β")
    ax.set_title("EMA weight per step (fixed EMA: α = 1 − β; DEMA: dynamic)", fontsize=10, pad=18)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)  # off the data
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")  # long task names must not be clipped
    plt.close(fig)
    return True


def plot_alpha_hist(results: dict, path: Path) -> bool:
    """Per dynamic-EMA method: where its per-tensor α landed (all seeds, all tasks)."""
    rows = [(m, r["alpha_counts"]) for m, r in results["methods"].items()
            if r.get("alpha_counts", {}).get("n") and r["alpha_counts"].get("fallback") is not None]
    if not rows:
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(len(rows), 1, figsize=(7.5, 1.9 * len(rows) + 0.4), squeeze=False, sharex=True)
    for ax, (method, c) in zip(axes[:, 0], rows):
        edges = alpha_stats.bin_edges(c)
        shares = [b / c["n"] for b in c["bins"]]
        ax.bar(edges[:-1], shares, width=[hi - lo for lo, hi in zip(edges, edges[1:])], align="edge",
               color="tab:blue", edgecolor="white", lw=0.3)
        ax.axvline(c["fallback"], color="tab:red", lw=1.0, ls="--", label=f"fallback {c['fallback']:g}")
        ax.axvline(alpha_stats.ABOVE, color="black", lw=0.8, ls=":", label="0.1")
        ax.set_xscale("log")
        used = [k for k, b in enumerate(c["bins"]) if b]
        ax.set_xlim(min(edges[used[0]], c["fallback"] / 2), max(edges[used[-1] + 1], 1.5))
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("share", fontsize=8)
        ax.set_title(f"{method}: {alpha_stats.share(c, 'at_fallback'):.0%} at the fallback, "
                     f"{alpha_stats.share(c, 'between'):.0%} between, {alpha_stats.share(c, 'above'):.0%} above 0.1 "
                     f"({c['n']:,} values)", fontsize=9)
        ax.legend(fontsize=7, loc="upper left")
    axes[-1, 0].set_xlabel("α = 1 − β per tensor and step (log scale)")
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True
