"""Sub-commands `cl-core demo` and `cl-core run` (the continual runner, cl_core.continual.run).

    cl-core demo [--quick] [--out DIR]           the bundled comparison of the custom methods and the base
    cl-core run  [--tasks FILE ...] [--model DIR] [--methods ...] [--out DIR] ...

Both resume an interrupted run when pointed at its folder again. Heavy imports (torch,
transformers) happen inside the commands so `cl-core --help` stays quick.
"""
from __future__ import annotations

import argparse
import logging
import time

# Light imports (no torch): the choices and defaults are the runner's own constants.
from cl_core.continual.config import DEMA_PARAMS, DEVICES, METHODS, NEW_SET_INITS, ORDERS, RECIPES, ROUTES, RunConfig
from cl_core.continual.synthetic import TASK_NAMES
from cl_core.continual.templates import TEMPLATE_SETS
from cl_core.dema.config import FORMULAS

METHOD_CHOICES = METHODS
# The methods `cl-core demo` compares (the top-level help counts them): the custom methods, so
# each effect has its own row (fixed EMA, DEMA, grouping, grouping with DEMA, against plain
# LoRA); the recipes (lcia, cl-next) are left to `cl-core run --recipe ...`. The multimodal demo
# (a 64-wide base, 50 steps: what its pictures need) has CoIN's MoELoRA where the text demo has
# the fixed EMA, so that it keeps to its measured time (docs/runner.md).
DEMO_METHODS = ("lora", "ema", "dema", "group", "dema+group")
DEMO_MULTIMODAL_METHODS = ("lora", "dema", "group", "dema+group", "moelora")
_DEFAULTS = RunConfig()

# The run setting each flag sets: validation errors name the flag the user typed.
FLAGS = {
    "seeds": "--seeds", "tasks": "--bundled-tasks", "order": "--order", "variant": "--templates",
    "n_train": "--n-train", "n_test": "--n-test", "task_files": "--tasks", "test_files": "--test-tasks",
    "task_types": "--task-types", "test_fraction": "--test-fraction", "model": "--model",
    "stage1_steps": "--stage1-steps", "steps": "--steps", "batch_size": "--batch-size", "lr": "--lr",
    "lora_r": "--lora-r", "lora_alpha": "--lora-alpha", "max_length": "--max-length",
    "max_new_tokens": "--max-new-tokens", "ema_beta": "--beta", "dema_formula": "--dema-formula",
    "dema_scale": "--dema-scale", "dema_fallback": "--dema-fallback", "group_threshold": "--threshold",
    "route": "--route", "new_set_init": "--new-set-init", "dema_params": "--dema-params",
    "max_grad_norm": "--max-grad-norm", "recipe": "--recipe", "dema_tasks": "--dema-tasks",
    "moe_experts": "--moe-experts", "moe_top_k": "--moe-top-k", "deepspeed": "--deepspeed", "device": "--device",
    "image_folder": "--image-folder", "multimodal": "--multimodal", "train_projector": "--train-projector",
}

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
    demo.add_argument("--multimodal", action="store_true",
                      help="the same comparison on pictures: each scene drawn (not written), a tiny LLaVA (CLIP-style "
                           "vision tower + the tiny Llama) trained in stage 1 on them; LoRA on its language model")
    demo.add_argument("--methods", nargs="+", default=None, metavar="M",
                      help=f"the methods to compare, any of {', '.join(METHODS)} (space or comma separated; "
                           f"default: {', '.join(DEMO_METHODS)}; with --multimodal also moelora)")
    demo.add_argument("--seeds", type=int, nargs="+", metavar="S",
                      help="override the seeds (default: " + " ".join(map(str, DEMO_FULL["seeds"])) + "; with "
                           "--quick " + " ".join(map(str, DEMO_QUICK["seeds"])) + ")")
    _common(demo, "demo_out; with --quick runs/demo-quick")
    demo.set_defaults(func=cmd_demo)

    run = sub.add_parser(
        "run", help="continual LoRA tuning on your task files (or the bundled tasks) with a chosen method",
        description="LoRA-tune a causal LM or an image-text model (LLaVA-style, on the records' images) on tasks "
                    "in order, evaluating every task after each one. "
                    "Without --tasks the bundled synthetic benchmark and its tiny model are used.",
    )
    data = run.add_argument_group("tasks")
    data.add_argument("--tasks", nargs="+", metavar="FILE", default=[],
                      help="task files in training order: LLaVA/CoIN conversation JSON or "
                           "{\"instruction\",\"input\",\"output\"} JSON/JSONL")
    data.add_argument("--test-tasks", nargs="+", metavar="FILE", default=[],
                      help="one test file per task file (default: hold out --test-fraction of each)")
    data.add_argument("--task-types", nargs="+", default=[], metavar="TYPE",
                      help="scoring rule per task file: mc | short | cls | exact | count | box "
                           "(default: inferred from the answers)")
    data.add_argument("--test-fraction", type=float, default=_DEFAULTS.test_fraction,
                      help="share of each task file held out for testing when no --test-tasks are given")
    data.add_argument("--skip-bad", action="store_true",
                      help="skip malformed records, and records whose image is missing or unreadable, instead of "
                           "failing (they are counted in the report)")
    data.add_argument("--image-folder", metavar="DIR", default=None,
                      help="the records' relative \"image\" paths are under DIR (LLaVA's flag; an image-text --model)")
    data.add_argument("--multimodal", action="store_true",
                      help="bundled tasks as pictures (the scene is drawn, not written) on a tiny LLaVA")
    data.add_argument("--bundled-tasks", nargs="+", metavar="NAME",
                      help="a subset of the bundled tasks, in order (" + " ".join(TASK_NAMES) + ")")
    data.add_argument("--order", choices=ORDERS, default=_DEFAULTS.order,
                      help="task order preset (CoIN's): as given, reversed, or by name")
    data.add_argument("--templates", choices=tuple(TEMPLATE_SETS), default=_DEFAULTS.variant,
                      help="instruction templates of the bundled tasks")
    data.add_argument("--n-train", type=int, default=_DEFAULTS.n_train, help="bundled: training samples per task")
    data.add_argument("--n-test", type=int, default=_DEFAULTS.n_test, help="bundled: test samples per task")
    model = run.add_argument_group("model and training")
    model.add_argument("--model", metavar="DIR",
                       help="a local causal-LM folder, or an image-text-to-text one (LLaVA-style, with its processor) "
                            "(default: the tiny Llama, trained in stage 1)")
    model.add_argument("--train-projector", action="store_true",
                       help="image-text models: train the multi-modal projector too (the official mm_projector; "
                            "averaged with --dema-params trainable); LoRA goes on the language model only")
    model.add_argument("--device", choices=DEVICES, default=_DEFAULTS.device,
                       help="where training and evaluation run: auto takes CUDA when torch sees a GPU "
                            "(one per process under a launcher), else the CPU")
    model.add_argument("--recipe", choices=RECIPES, default=_DEFAULTS.recipe,
                       help="lcia: the official LCIA recipe (grouping, new sets warm-started from the last trained "
                            "set, DEMA when a set is re-trained, every trainable tensor averaged, no clipping, one "
                            "routing decision per test file, scale 2 / fallback 0.01); cl-next: Continual-NExT's "
                            "(DEMA from task 2, one set, scale 0.01 / fallback 0.001); custom: the methods below "
                            "with the flags below (default)")
    model.add_argument("--methods", nargs="+", default=None, metavar="M",
                       help=f"one or more of {', '.join(METHODS)} (space or comma separated; default: dema, "
                            "or the --recipe's own method)")
    model.add_argument("--seeds", type=int, nargs="+", default=list(_DEFAULTS.seeds), metavar="S",
                       help="run every method once per seed (the report gives mean and spread)")
    model.add_argument("--steps", type=int, default=_DEFAULTS.steps, help="optimizer steps per task")
    model.add_argument("--batch-size", type=int, default=_DEFAULTS.batch_size, help="training examples per step")
    model.add_argument("--lr", type=float, default=_DEFAULTS.lr, help="peak learning rate (cosine schedule)")
    model.add_argument("--lora-r", type=int, default=_DEFAULTS.lora_r, help="LoRA rank")
    model.add_argument("--lora-alpha", type=int, default=_DEFAULTS.lora_alpha, help="LoRA alpha (scaling)")
    model.add_argument("--moe-experts", type=int, default=_DEFAULTS.moe_experts,
                       help="method moelora: LoRA experts per layer, --lora-r split across them (CoIN's scripts: 2)")
    model.add_argument("--moe-top-k", type=int, default=None,
                       help="method moelora: use each token's k most weighted experts, renormalised (default: "
                            "every expert, CoIN's dense router)")
    model.add_argument("--max-length", type=int, default=_DEFAULTS.max_length, help="tokens per training example")
    model.add_argument("--max-new-tokens", type=int, default=None,
                       help="generation length at evaluation (default: longest test answer + 2)")
    model.add_argument("--stage1-steps", type=int, default=_DEFAULTS.stage1_steps, help="tiny model: stage-1 steps")
    ema = run.add_argument_group("EMA and grouping")
    ema.add_argument("--beta", type=float, default=_DEFAULTS.ema_beta, help="fixed EMA weight of method ema")
    ema.add_argument("--dema-formula", choices=FORMULAS, default=_DEFAULTS.dema_formula,
                     help="how DEMA computes its weight α each step")
    ema.add_argument("--dema-scale", type=float, default=_DEFAULTS.dema_scale, help="DEMA's scale constant")
    ema.add_argument("--dema-fallback", type=float, default=_DEFAULTS.dema_fallback,
                     help="the α DEMA uses when its formula leaves (0, 1) or cannot be computed")
    ema.add_argument("--threshold", type=float, default=None,
                     help="grouping threshold (default: 0.9 for original templates, 0.3 for diverse/10type)")
    ema.add_argument("--route", choices=ROUTES, default=_DEFAULTS.route,
                     help="dema+group test routing: per test instance, or one decision per test file (official)")
    ema.add_argument("--new-set-init", choices=NEW_SET_INITS, default=_DEFAULTS.new_set_init,
                     help="dema+group: a new LoRA set starts fresh, or from the last trained set (official)")
    ema.add_argument("--dema-params", choices=DEMA_PARAMS, default=_DEFAULTS.dema_params,
                     help="tensors the EMA averages: the LoRA tensors, or every trainable one (official)")
    ema.add_argument("--dema-tasks", metavar="K,K,...", default=None,
                     help="DEMA on for exactly these 1-based tasks, whatever grouping decides (CoIN's scripts: "
                          "4,5,7,8); default: on when a task re-trains a set")
    ema.add_argument("--max-grad-norm", type=float, default=_DEFAULTS.max_grad_norm,
                     help="gradient clipping of the custom methods (0: none, as the official runs)")
    procs = run.add_argument_group("many processes (start the run with torchrun or accelerate launch; "
                                   "docs/distributed.md)")
    procs.add_argument("--deepspeed", metavar="FILE", default=None,
                       help="train every task under DeepSpeed with this JSON config (ZeRO stage 0 to 3; batch sizes, "
                            "accumulation and clipping \"auto\"); needs a launcher and pip install cl_core[deepspeed]")
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
    from cl_core.continual.report import LEARNED_AT, shortfalls, summary

    learned = results.get("learned", [])
    for line in summary(results) + learned[:1]:
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
            logging.getLogger("cl_core.continual.run").setLevel(logging.WARNING)
        try:
            results = runner.run(cfg, out, quiet=args.quiet, threads=1 if args.threads is None else args.threads,
                                 launch=launch)
        except KeyboardInterrupt:
            if launch.is_main:
                print(f"\nInterrupted. Finished tasks are saved in {out}; run the same command again to resume.")
            return 130
        finished = True
        if not launch.is_main:
            return 0
        return _finish(results, out, started)
    finally:
        launch.close(barrier=finished)


def cmd_demo(args) -> int:
    preset = dict(DEMO_QUICK if args.quick else DEMO_FULL)
    if args.multimodal:
        preset.update(DEMO_MULTIMODAL, **({} if args.quick else DEMO_MULTIMODAL_FULL))
    if args.seeds:
        preset["seeds"] = tuple(args.seeds)
    methods = _methods(args.methods) if args.methods else (
        DEMO_MULTIMODAL_METHODS if args.multimodal else DEMO_METHODS)
    cfg = RunConfig(methods=methods, **preset)
    cfg.validate(FLAGS)  # errors name the flags (--seeds), before anything is written
    out = args.out or ("runs/demo-quick" if args.quick else "demo_out") + ("-multimodal" if args.multimodal else "")
    return _execute(cfg, out, args)


def cmd_run(args) -> int:
    if args.tasks and args.bundled_tasks:
        raise ValueError("--tasks (your files) and --bundled-tasks cannot be combined")
    cfg = RunConfig(
        methods=_methods(args.methods) if args.methods else (("dema",) if args.recipe == "custom" else None),
        recipe=args.recipe, seeds=tuple(args.seeds),
        tasks=tuple(args.bundled_tasks) if args.bundled_tasks else None, order=args.order,
        variant=args.templates, n_train=args.n_train, n_test=args.n_test,
        task_files=tuple(args.tasks), test_files=tuple(args.test_tasks), task_types=tuple(args.task_types),
        test_fraction=args.test_fraction, skip_bad=args.skip_bad, image_folder=args.image_folder,
        multimodal=args.multimodal, train_projector=args.train_projector,
        model=args.model, stage1_steps=args.stage1_steps,
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, lora_r=args.lora_r, lora_alpha=args.lora_alpha,
        max_length=args.max_length, max_new_tokens=args.max_new_tokens, device=args.device,
        ema_beta=args.beta, dema_formula=args.dema_formula, dema_scale=args.dema_scale,
        dema_fallback=args.dema_fallback, group_threshold=args.threshold, route=args.route,
        new_set_init=args.new_set_init, dema_params=args.dema_params, max_grad_norm=args.max_grad_norm,
        dema_tasks=_dema_tasks(args.dema_tasks), moe_experts=args.moe_experts, moe_top_k=args.moe_top_k,
    )
    cfg.validate(FLAGS)  # errors name the flags (--steps), before anything is written
    out = args.out or time.strftime("runs/run-%Y%m%d-%H%M%S")
    return _execute(cfg, out, args)
