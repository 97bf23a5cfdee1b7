"""Sub-commands `cl-core demo` and `cl-core run` (the continual runner, cl_core.continual.run).

    cl-core demo [--quick] [--out DIR]           the bundled comparison of the custom methods and the base
    cl-core run  [--tasks FILE ...] [--model DIR] [--methods ...] [--out DIR] ...

Both resume an interrupted run when pointed at its folder again. Heavy imports (torch,
transformers) happen inside the commands so `cl-core --help` stays quick.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import signal
import threading
import time

# Light imports (no torch): the choices and defaults are the runner's own constants.
from cl_core.integrations.extras import require
from cl_core.continual.config import SECTIONS, RunConfig, cli_settings, setting_flags
from cl_core.continual.methods import CUSTOM_METHODS, METHODS, PAPER_ROWS

METHOD_CHOICES = METHODS
# The methods `cl-core demo` compares (the top-level help counts them): the custom methods, so
# each effect has its own row (fixed EMA, DEMA with the official and with the paper formula,
# grouping, grouping with DEMA, against plain LoRA), and the official recipe lcia as the paper
# ran it (no clipping, new sets from the last trained set); cl-next is left to `cl-core run`. The multimodal demo
# (a 64-wide base, 50 steps: what its pictures need) has CoIN's MoELoRA where the text demo has
# the fixed EMA, so that it keeps to its measured time (docs/runner.md).
DEMO_METHODS = CUSTOM_METHODS + ("lcia",)
DEMO_MULTIMODAL_METHODS = ("lora", "dema", "group", "dema+group", "moelora")

# The run setting each flag sets (from RunConfig's fields): validation errors name the flag the
# user typed. --deepspeed is the launcher's (cl_core.continual.launch), not a run setting.
FLAGS = {**setting_flags(), "deepspeed": "--deepspeed"}
_FIELDS = {f.name: f for f in dataclasses.fields(RunConfig)}

# The demo presets: the same tasks, seeds, steps and learning rate for every method. The full
# demo: three seeds, each with its own 800-step stage-1 base (the seeds' spread then includes
# the base's), six tasks of which three re-train the short-answer group (so DEMA is on for tasks
# the base cannot do), 150 steps of batch 16 per task. The stage-1 mix asks the VQA questions in
# a sentence convention (cl_core.continual.synthetic.stage1_samples), so a fresh LoRA set learns
# each task in 25-50 steps; 150 because a set that continues from another task (lora, dema)
# needs more (measured, docs/runner.md). hidden_size 96, not RunConfig's 64: a 64-wide base read
# the word written on an object in ~7 % of held-out scenes (measured with the older mix).
# --quick is a pipeline check (one seed, four tasks that each open a new group).
DEMO_TASKS = ("sqa", "textvqa", "imagenet", "gqa", "vqav2", "ocrvqa")
DEMO_FULL = dict(seeds=(0, 1, 2), stage1_seed=None, tasks=DEMO_TASKS, stage1_steps=800, steps=150,
                 n_train=800, n_test=50, hidden_size=96)
DEMO_QUICK = dict(seeds=(0,), tasks=("sqa", "imagenet", "vizwiz", "grounding"), stage1_steps=300, steps=30,
                  n_train=480, n_test=32)

# --multimodal on top of either preset: the same tasks, seeds, methods and steps, on pictures
# (cl_core.continual.images) with the tiny LLaVA (cl_core.continual.tiny_model.build_llava).
# Its own width and steps (measured with them, docs/runner.md): the pictures' codes are learned by a
# 64-wide tiny LLaVA in 50 steps, and 96 wide / 150 steps would triple its time.
DEMO_MULTIMODAL = dict(multimodal=True)
DEMO_MULTIMODAL_FULL = dict(hidden_size=64, steps=50)


# The run settings `cl-core demo` takes beside its preset: the model's size and every DEMA setting.
DEMO_SETTINGS = ("hidden_size", "num_layers", "lora_r", "dema_formula", "dema_scale", "dema_fallback", "dema_tasks")


def _demo_default(name: str) -> str:
    """The demo's default of setting ``name`` in words (full preset, --quick, --multimodal)."""
    full = DEMO_FULL.get(name, _FIELDS[name].default)
    quick = DEMO_QUICK.get(name, _FIELDS[name].default)
    mm = {**DEMO_FULL, **DEMO_MULTIMODAL, **DEMO_MULTIMODAL_FULL}.get(name, full)
    text = "default: " + ("on when a task re-trains a set" if full is None else str(full))
    if quick != full:
        text += f"; --quick {quick}"
    if mm != full:
        text += f"; --multimodal {mm}"
    return text


def _methods(values) -> tuple:
    out = []
    for v in values:
        out += [m.strip() for m in v.split(",") if m.strip()]
    return tuple(out)


def _dema_tasks(value):
    """``--dema-tasks 4,5,7,8`` -> (4, 5, 7, 8); the range is checked by RunConfig.validate."""
    if value is None:
        return None
    parts = [v.strip() for v in value.split(",")]
    if not parts or any(not v.isdigit() for v in parts):
        raise ValueError(f"--dema-tasks takes 1-based task numbers separated by commas (e.g. 4,5,7,8), "
                         f"got {value!r}")
    return tuple(int(v) for v in parts)


# Settings whose command-line text is parsed further than argparse's type (name -> parser).
_PARSE = {"methods": _methods, "dema_tasks": _dema_tasks,
          # --seeds 0,1 2 (parsed parts are tuples; the default's are ints)
          "seeds": lambda parts: tuple(n for part in parts for n in (part if isinstance(part, tuple) else (part,)))}


def _value(name: str, value):
    """The RunConfig value of setting ``name`` from its parsed flag."""
    if name in _PARSE:
        return _PARSE[name](value) if value is not None else None
    return tuple(value) if isinstance(value, list) else value


def add_setting(parser, name: str, **override):
    """Add run setting ``name``'s flag to ``parser`` as its RunConfig field declares it (flag,
    help, type, choices, ...; default: the field's); ``override`` replaces keywords (the demo's
    own help and preset defaults). Its value lands in ``args.<name>``."""
    f = _FIELDS[name]
    meta = f.metadata
    kw = dict(meta["cli"], help=meta["help"], dest=name,
              default=list(f.default) if isinstance(f.default, tuple) else f.default)
    if "metavar" not in kw and kw.get("action") is None and "choices" not in kw:
        kw["metavar"] = meta["flag"].lstrip("-").replace("-", "_").upper()   # argparse's own, from the flag
    kw.update(override)
    return parser.add_argument(meta["flag"], **kw)


def _common(p: argparse.ArgumentParser, out_default: str) -> None:
    p.add_argument("--out", metavar="DIR",
                   help=f"run folder (created; an existing run folder is resumed) (default: {out_default})")
    p.add_argument("--quiet", action="store_true", help="no progress bars and no per-task log lines")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch CPU threads (default 1: the models are tiny and one thread per process is "
                        "fastest on a shared 2-core machine)")


def add_parser(sub) -> None:
    demo = sub.add_parser(
        "demo", help=f"the bundled comparison: {' / '.join(DEMO_METHODS)} and the untuned base on synthetic "
                     "CoIN-like tasks",
        description="Train a tiny Llama per seed on a stage-1 mix that teaches none of the tasks (stage 1), then "
                    "LoRA-tune it task by task with " + ", ".join(DEMO_METHODS) + " on the same tasks, seeds and "
                    "budget, and score the untuned base too; write results.json, report.md (which "
                    "differences exceed the seeds' spread, whether every task was learned) and plots into --out. Nothing is downloaded.",
    )
    demo.add_argument("--quick", action="store_true",
                      help="4 tasks, 1 seed, fewer steps: a check that the pipeline runs (a few minutes), not a "
                           "comparison")
    add_setting(demo, "multimodal",
                      help="the same comparison on pictures: each scene drawn (not written), a tiny LLaVA (CLIP-style "
                           "vision tower + the tiny Llama) trained in stage 1 on them; LoRA on its language model")
    add_setting(demo, "model_family")
    add_setting(demo, "methods",
                      help=f"the methods to compare, any of {', '.join(METHODS)} (space or comma separated; "
                           f"default: {', '.join(DEMO_METHODS)}; with --multimodal also moelora)")
    add_setting(demo, "seeds", default=None,
                      help="override the seeds (default: " + " ".join(map(str, DEMO_FULL["seeds"])) + "; with "
                           "--quick " + " ".join(map(str, DEMO_QUICK["seeds"])) + ")")
    # The model's size and the DEMA settings, declared on RunConfig; the demo's defaults are its
    # preset's (shown here) or, where the preset leaves one, the field's.
    demo_model = demo.add_argument_group("model size (every method) and DEMA (the custom methods; lcia fixes its own)")
    for name in DEMO_SETTINGS:
        text = _FIELDS[name].metadata["help"]
        add_setting(demo_model, name, default=None,
                    help=text if "default" in text else f"{text} ({_demo_default(name)})")
    _common(demo, "demo_out; with --quick runs/demo-quick")
    demo.set_defaults(func=cmd_demo)

    run = sub.add_parser(
        "run", help="continual LoRA tuning on your task files (or the bundled tasks) with a chosen method",
        description="LoRA-tune a causal LM or an image-text model (LLaVA-style, on the records' images) on tasks "
                    "in order, evaluating every task after each one. "
                    "Without --tasks the bundled synthetic benchmark and its tiny model are used.",
    )
    # Every run setting with a flag, grouped by its RunConfig section (written once, in
    # cl_core.continual.config); args.<field> holds each.
    groups = {key: run.add_argument_group(title) for key, title in SECTIONS.items()}
    for f in cli_settings():
        add_setting(groups[f.metadata["section"]], f.name)
    # A preset of methods, not a run setting (the run's identity is its method list).
    groups["methods"].add_argument(
        "--compare", choices=("paper",), default=None,
        help="paper: the LCIA paper's Table 1 rows that cl_core runs (" + ", ".join(PAPER_ROWS) + "), laid out as "
             "its Table 1 in the report; with your --tasks/--model or the bundled tasks; not with --methods/--recipe")
    procs = run.add_argument_group("many processes (start the run with torchrun or accelerate launch; "
                                   "docs/distributed.md)")
    procs.add_argument("--deepspeed", metavar="FILE", default=None,
                       help="train every task under DeepSpeed with this JSON config (ZeRO stage 0 to 3; batch sizes, "
                            "accumulation and clipping \"auto\"); needs a launcher and pip install \".[deepspeed]\"")
    _common(run, "runs/run-YYYYmmdd-HHMMSS")
    run.set_defaults(func=cmd_run)


def _finish(results: dict, out, started: float) -> int:
    from cl_core.metrics import METRIC_LABELS, METRIC_NAMES

    n_seeds = len(results["config"]["seeds"])
    spread = n_seeds > 1  # one seed has no spread: no "± 0.0"
    # every column at least as wide as its label plus a gap ("Forgetting(max)" is 15 characters)
    width = max(16 if spread else 10, 2 + max(len(METRIC_LABELS[m]) for m in METRIC_NAMES))
    print()
    print(f"{'method':<12}" + "".join(f"{METRIC_LABELS[m]:>{width}}" for m in METRIC_NAMES))
    base = results.get("base_metrics")
    if base:
        print(f"{'base':<12}" + "".join(f"{base['avg_acc']:>{width}.2f}" if m == "avg_acc" else f"{'-':>{width}}"
                                        for m in METRIC_NAMES))
    for method, r in results["methods"].items():
        mean, std = r["metrics"], r["metrics_std"]
        cells = (f"{mean[m]:.2f} ± {std[m]:.1f}" if spread else f"{mean[m]:.2f}" for m in METRIC_NAMES)
        print(f"{method:<12}" + "".join(f"{c:>{width}}" for c in cells))
    print()
    if spread:
        print(f"mean ± standard deviation over {n_seeds} seeds; "
              + ("base: the untuned stage-1 model's zero-shot accuracy. " if base else "") + "Details in the report.")
    else:
        print("one seed: no spread to show (give several --seeds for mean ± standard deviation).")
    # The computed conclusions in short (the report has each comparison in full), and whether
    # every task was learned; where each method stayed below is the report's.
    from cl_core.continual.report import LEARNED_AT, out_of_regime, regime_lines, shortfalls, summary

    learned = results.get("learned", [])
    for line in summary(results) + learned[:1]:
        print(line)
    # in which regime each DEMA method ran (its comparison means the method as designed only in it)
    for line in regime_lines(results, out_of_regime(results)):
        print(line)
    short = list(shortfalls(results)) if learned else []
    if short:
        print(f"{', '.join(short)} stayed below {LEARNED_AT:.0f} % on some task right after its training: the report says "
              "where (\"Was every task learned?\").")
    # The run's own measured time (the report states the same number).
    print(f"Finished in {results.get('wall_seconds_this_call', time.time() - started):.0f} s.")
    print(f"Report: {out / 'report.md'}")
    print(f"Results: {out / 'results.json'}")
    return 0


class Terminated(KeyboardInterrupt):
    """SIGTERM (a cluster's preemption, `kill`) taken like Ctrl-C: the atomic write in
    progress is abandoned cleanly, the run says how to resume, and the exit status is 143."""


@contextlib.contextmanager
def _sigterm_as_interrupt():
    def on_term(signum, frame):
        raise Terminated()

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _execute(cfg, out, args) -> int:
    from pathlib import Path

    from cl_core.continual import run as runner
    from cl_core.continual.launch import Launch

    if args.threads is not None and args.threads < 1:  # was: 0 silently became 1, -1 a late traceback
        raise ValueError(f"--threads {args.threads}: give at least 1 (torch CPU threads for this run)")
    out = Path(out)
    started = time.time()
    # Under torchrun / accelerate launch: checked (--deepspeed, --batch-size) before the
    # process group is joined; rank 0 alone logs and prints, the others say only warnings.
    launch = Launch.from_env(getattr(args, "deepspeed", None), flags=FLAGS, cfg=cfg)
    finished = False
    try:
        if not launch.is_main:     # the other ranks would repeat rank 0's every line
            logging.getLogger("cl_core").setLevel(logging.WARNING)
        elif args.quiet:
            logging.getLogger("cl_core").setLevel(logging.WARNING)   # every cl_core module's info lines
        try:
            from tqdm.contrib.logging import logging_redirect_tqdm

            # log lines (warnings included) on their own line, above a progress bar, not glued to it
            with _sigterm_as_interrupt(), logging_redirect_tqdm():
                results = runner.run(cfg, out, quiet=args.quiet,
                                     threads=1 if args.threads is None else args.threads, launch=launch)
        except KeyboardInterrupt as exc:
            terminated = isinstance(exc, Terminated)
            if launch.is_main:
                what = "Stopped by SIGTERM" if terminated else "Interrupted"
                print(f"\n{what}. Finished tasks are saved in {out}; run the same command again to resume.",
                      flush=True)
            return 143 if terminated else 130
        finished = True
        if not launch.is_main:
            return 0
        return _finish(results, out, started)
    finally:
        launch.close(barrier=finished)


def cmd_demo(args) -> int:
    require("runner", "cl-core demo")   # before any work: not a traceback after the base is trained
    preset = dict(DEMO_QUICK if args.quick else DEMO_FULL)
    if args.multimodal:
        preset.update(DEMO_MULTIMODAL, **({} if args.quick else DEMO_MULTIMODAL_FULL))
    if args.seeds:
        preset["seeds"] = _value("seeds", args.seeds)
    for name in DEMO_SETTINGS:
        if getattr(args, name) is not None:
            preset[name] = _value(name, getattr(args, name))
    methods = _methods(args.methods) if args.methods else (
        DEMO_MULTIMODAL_METHODS if args.multimodal else DEMO_METHODS)
    cfg = RunConfig(methods=methods, model_family=args.model_family, **preset)
    cfg.validate(FLAGS)  # errors name the flags (--seeds), before anything is written
    out = args.out or ("runs/demo-quick" if args.quick else "demo_out") + ("-multimodal" if args.multimodal else "")
    # The plan first: a newcomer sees what runs, for how long, and where it goes before the
    # first silent minutes of stage 1.
    logging.getLogger(__name__).info(
        "demo plan: %d seed(s), each a %d-step stage-1 base (cached after the first run), then %d tasks x %d "
        "steps for each of %d methods (%s); expected: %s; output: %s (the report: %s)",
        len(cfg.seeds), cfg.stage1_steps, len(cfg.tasks or ()), cfg.steps, len(cfg.methods), ", ".join(cfg.methods),
        "a few minutes" if args.quick else "about 7 minutes of one free CPU core when measured (docs/runner.md), "
        "several times that on a busy machine", out, f"{out}/report.md")
    return _execute(cfg, out, args)


def config_from_args(args) -> RunConfig:
    """The RunConfig of `cl-core run`'s parsed flags (not yet validated)."""
    if args.task_files and args.tasks:
        raise ValueError("--tasks (your files) and --bundled-tasks cannot be combined")
    values = {f.name: _value(f.name, getattr(args, f.name)) for f in cli_settings()}
    if values["tasks"] == ("all",):   # every bundled task, in the order's preset
        values["tasks"] = None
    if getattr(args, "compare", None) == "paper":
        if values["methods"] is not None or values["recipe"] != "custom":
            raise ValueError("--compare paper runs the paper's rows (" + ", ".join(PAPER_ROWS) + "): drop "
                             "--methods/--recipe, or drop --compare")
        values["methods"] = PAPER_ROWS
    if values["methods"] is None:   # the CLI's default: dema (custom), or the recipe's own method
        values["methods"] = ("dema",) if args.recipe == "custom" else None
    return RunConfig(**values)


def cmd_run(args) -> int:
    require("runner", "cl-core run")   # before any work: not a traceback after the base is trained
    cfg = config_from_args(args)
    cfg.validate(FLAGS)  # errors name the flags (--steps), before anything is written
    if not args.task_files and not args.tasks and args.recipe == "custom":
        # Was: a silent eight-task bundled run (with its 1,200-step base) for a bare `cl-core run`.
        raise ValueError("cl-core run: no tasks given; give your task files (--tasks FILE ... --model DIR), "
                         "bundled tasks (--bundled-tasks sqa textvqa ..., or --bundled-tasks all), or try "
                         "`cl-core demo --quick` first (a few minutes)")
    out = args.out or time.strftime("runs/run-%Y%m%d-%H%M%S")
    return _execute(cfg, out, args)
