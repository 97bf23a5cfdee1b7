"""The report's pieces on hand-made results: the base line, ± only with a spread, the computed
comparisons, the α trace's gaps, the DeepSpeed notice filter."""
import logging
import math

from cl_core import metrics
from cl_core.continual import report
from cl_core.continual.training import silence_deepspeed_cpu_notice


def _results(seeds, matrices, base_rows):
    """results.json as the runner writes it, for methods given as {method: {seed: matrix}}."""
    tasks = ["a", "b"]
    out = {"tasks": tasks, "task_types": ["exact", "exact"], "benchmark": "bundled",
           "config": {"seeds": seeds, "steps": 3, "variant": "original", "order": "origin", "n_train": 4,
                      "n_test": 2, "batch_size": 2, "lr": 0.01, "warmup_steps": 0, "lora_r": 2, "lora_alpha": 4,
                      "target_modules": "all-linear", "stage1_steps": 1, "stage1_seed": None, "hidden_size": 8,
                      "num_layers": 1, "model": None},
           "base": {str(s): {"zero_shot": base_rows[k]} for k, s in enumerate(seeds)}, "methods": {}}
    for m, per in matrices.items():
        seeds_d = {str(s): {"matrix": mx, "metrics": metrics.summarize(mx), "alpha": [[], []], "groups": [0, 0],
                            "reused": [False, True], "ema": [False, False], "dema": [False, False],
                            "init_from": [None, 0], "similarities": [[], [1.0]], "alpha_counts": {}}
                   for s, mx in per.items()}
        vals = {k: [d["metrics"][k] for d in seeds_d.values()] for k in metrics.METRIC_NAMES}
        out["methods"][m] = {"matrix": next(iter(per.values())), "matrix_std": [[0, 0], [0, 0]],
                             "metrics": {k: metrics.mean_std(v)[0] for k, v in vals.items()},
                             "metrics_std": {k: metrics.mean_std(v)[1] for k, v in vals.items()},
                             "seeds": seeds_d, "alpha_counts": {}}
    rows = base_rows
    out["base_metrics"] = {"zero_shot": [sum(r[i] for r in rows) / len(rows) for i in range(2)],
                           "zero_shot_std": [0, 0], "avg_acc": metrics.mean_std([sum(r) / 2 for r in rows])[0],
                           "avg_acc_std": metrics.mean_std([sum(r) / 2 for r in rows])[1],
                           "per_seed": {str(s): sum(r) / 2 for s, r in zip(seeds, rows)}}
    return out


def test_conclusions_weigh_differences_against_the_seeds_spread():
    # group beats lora by 40 points in every seed (spread 2): beyond the spread; dema+group and
    # group differ by 1 point with a spread of about 10: within it.
    lora = {0: [[90, 0], [10, 90]], 1: [[90, 0], [12, 90]], 2: [[90, 0], [8, 90]]}
    group = {0: [[90, 0], [90, 90]], 1: [[90, 0], [92, 90]], 2: [[90, 0], [88, 90]]}
    dg = {0: [[90, 0], [80, 90]], 1: [[90, 0], [100, 90]], 2: [[90, 0], [92, 90]]}
    r = _results([0, 1, 2], {"lora": lora, "group": group, "dema+group": dg}, [[0, 0], [0, 2], [2, 0]])
    lines = report.conclusions(r)
    by = {line.split(":")[0] + "|" + line.split(": ", 1)[1].split(" vs ")[0].split()[0] + "|" +
          line.split(" vs ")[1].split()[0]: line for line in lines}
    assert "exceeds the seeds' spread" in by["Avg.ACC|group|lora"]
    assert "better in 3 of 3 seeds" in by["Avg.ACC|group|lora"]
    assert "within the seeds' spread: no conclusion" in by["Avg.ACC|dema+group|group"]
    assert "exceeds the seeds' spread" in by["Avg.ACC against the untuned base|group|base"]
    # one seed: no difference is called
    one = _results([0], {"lora": {0: lora[0]}}, [[0, 0]])
    assert report.conclusions(one) == [report.conclusions(one)[0]] and "One seed" in report.conclusions(one)[0]


def test_summary_puts_the_same_comparisons_in_a_few_lines():
    lora = {0: [[90, 0], [10, 90]], 1: [[90, 0], [12, 90]], 2: [[90, 0], [8, 90]]}
    group = {0: [[90, 0], [90, 90]], 1: [[90, 0], [92, 90]], 2: [[90, 0], [88, 90]]}
    dg = {0: [[90, 0], [80, 90]], 1: [[90, 0], [100, 90]], 2: [[90, 0], [92, 90]]}
    r = _results([0, 1, 2], {"lora": lora, "group": group, "dema+group": dg}, [[0, 0], [0, 2], [2, 0]])
    head, beyond, within, base = report.summary(r)
    # group vs lora: Avg.ACC and Forgetting both beyond; dema+group vs group: neither
    assert head == "Beyond the spread of the 3 seeds:"
    assert beyond == "  group vs lora: Avg.ACC +40.0 (group better in 3 of 3), Forgetting -80.0 (group better in 3 of 3)"
    assert within == "Within it, no conclusion: dema+group vs group."
    assert base == "Above the untuned base beyond the spread: lora, group, dema+group."
    # the same numbers as the full lines
    full = [line for line in report.conclusions(r) if line.startswith("Avg.ACC: group") and " vs lora " in line]
    assert "difference +40.0 exceeds" in full[0]
    one = _results([0], {"lora": {0: lora[0]}}, [[0, 0]])
    assert report.summary(one) == report.conclusions(one)


def test_learned_says_whether_every_task_was_learned_and_where_a_method_stayed_below(tmp_path):
    # task b right after its training: lora 90/85, dema 30 in seed 1: learnable (lora), dema short
    lora = {0: [[90, 0], [10, 90]], 1: [[95, 0], [12, 85]]}
    dema = {0: [[90, 0], [40, 81]], 1: [[95, 0], [50, 30]]}
    r = _results([0, 1], {"lora": lora, "dema": dema}, [[0, 0], [0, 0]])
    lines = report.learned(r)
    assert lines[0].startswith("Every task was learned within the budget") and "b in seed 1, 85 %" in lines[0]
    assert lines[1:] == ["dema stayed below 80 % right after training on: b 30 (seed 1)."]
    # nobody reaches 80 % on b in seed 0: not learnable at this budget, said first
    r = _results([0, 1], {"lora": {0: [[90, 0], [10, 60]], 1: lora[1]}}, [[0, 0], [0, 0]])
    lines = report.learned(r)
    assert lines[0].startswith("Not every task was learned within the budget: b in seed 0 (best method 60 %")
    assert lines[1] == "lora stayed below 80 % right after training on: b 60 (seed 0)."
    r["learned"] = lines
    text = report.write_report(r, tmp_path).read_text()
    assert "### Was every task learned?\n\n- Not every task was learned" in text


def test_report_has_a_base_line_and_plus_minus_only_with_a_spread(tmp_path):
    lora = {0: [[90, 0], [10, 90]], 1: [[90, 0], [12, 90]]}
    r = _results([0, 1], {"lora": lora}, [[0, 0], [0, 2]])
    r["conclusions"] = report.conclusions(r)
    text = report.write_report(r, tmp_path / "two").read_text()
    assert "| base (zero-shot) | 0.50 ± 0.71 | - |" in text
    assert "± is the standard deviation over the seeds" in text
    assert "| base (zero-shot) | *0.0* | *1.0* |" in text  # the matrix's first row
    one = _results([0], {"lora": {0: lora[0]}}, [[0, 0]])
    text = report.write_report(one, tmp_path / "one").read_text()
    assert "±" not in text, [line for line in text.splitlines() if "±" in line]
    assert "| base (zero-shot) | 0.00 | - |" in text and "no spread to show" in text


def test_alpha_trace_breaks_where_the_ema_was_off():
    xs, ys = report.alpha_series([[0.1, 0.2], [], [0.3, 0.4]], steps=2)
    assert len(xs) == len(ys)
    # task 1's two points, a gap at the boundary, task 2 (no EMA) all gaps, task 3's points
    assert ys[:2] == [0.1, 0.2] and math.isnan(ys[2])
    assert all(math.isnan(v) for v in ys[3:6])
    assert ys[6:8] == [0.3, 0.4] and xs[6:8] == [5, 6]


def test_deepspeed_cpu_notice_is_dropped_and_nothing_else():
    silence_deepspeed_cpu_notice()
    silence_deepspeed_cpu_notice()  # idempotent: one filter
    ds = logging.getLogger("DeepSpeed")
    assert sum(type(f).__name__ == "_DeepSpeedCPUNotice" for f in ds.filters) == 1
    # a handler on the logger itself: DeepSpeed, once imported, installs its own handlers and
    # propagation, so what reaches the root logger depends on which tests ran before
    seen = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: seen.append(record.getMessage())
    ds.addHandler(handler)
    try:
        ds.warning("Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it.")
        ds.warning("ZeRO stage 3 offload is slow")
    finally:
        ds.removeHandler(handler)
    messages = seen
    assert messages == ["ZeRO stage 3 offload is slow"]
