"""RunConfig: the settings of a continual run, each declared once with its section, flag and
help (the CLI's parser is generated from them), and their validation.

    cfg = RunConfig(methods=("lora", "dema"), seeds=(0, 1))
    cfg.validate()                    # ValueError for settings that cannot work
    cfg.plan("lcia")                  # MethodPlan (cl_core.continual.methods, the method table)
    cfg.ema_config("dema")            # the DEMAConfig the method's tasks use (None for lora)

The methods and recipes are defined in :mod:`cl_core.continual.methods`. ``RunConfig(recipe="lcia")``
runs the lcia method (``recipe`` picks the default method list); ``recipe="custom"`` (the default)
runs the custom methods. A recipe with custom methods (``RunConfig(recipe="lcia",
methods=("dema+group",))``, ``cl-core run --recipe lcia --methods dema+group``) runs them with the
recipe's settings; a custom flag set beside a recipe is refused, since the recipe fixes it.
``moe_experts`` / ``moe_top_k`` apply to method moelora alone.

``dema_tasks`` (``--dema-tasks 4,5,7,8``, 1-based task numbers): DEMA is on for exactly those
tasks, whatever grouping decided, as the official CoIN scripts switch it (``--dema True`` only
for tasks 4, 5, 7, 8 of CoIN's order: ``OFFICIAL_DEMA_TASKS``). None: DEMA is on for a task
that re-trains a set (grouping's decision). The report compares both on the bundled tasks in
CoIN's order with the original templates (``official_switches``).

The EMA defaults come from :class:`cl_core.DEMAConfig` (they are typed there only).
"""
from __future__ import annotations

import argparse

import dataclasses
from dataclasses import dataclass
from typing import Optional

from cl_core.continual import methods as methods_table
from cl_core.continual.methods import CUSTOM_METHODS, METHODS, RECIPES, MethodPlan
from cl_core.continual.synthetic import TASK_NAMES
from cl_core.continual.templates import TEMPLATE_SETS
from cl_core.dema.config import FORMULAS, DEMAConfig

DEVICES = ("auto", "cpu", "cuda")
# The tiny image-text models the bundled multimodal benchmark can train (cl_core.continual.qwen_vl:
# the Qwen-VL family's names -> model_type); a --model folder's own config decides instead.
MODEL_FAMILIES = ("llava", "qwen2-vl", "qwen2.5-vl")
ORDERS = ("origin", "reverse", "alphabet")
ROUTES = ("instance", "file")            # test routing: per test instance, or one decision per test file
NEW_SET_INITS = ("fresh", "latest")      # a new LoRA set: fresh init, or the last trained set's weights
# Averaged tensors: the LoRA tensors, or every trainable one. The rule is the integration's
# PARAM_CHOICES (cl_core.integrations.selection), which validate() checks against; this copy only
# lists the --dema-params choices without importing torch into `cl-core --help` (a test keeps
# the two equal).
DEMA_PARAMS = ("lora", "trainable")
REPLAY_SAMPLING = ("per-task", "reservoir")   # cl_core.continual.baselines.replay.SAMPLING (a test keeps them equal)

_DEMA_DEFAULTS = DEMAConfig()

# The 1-based tasks for which CoIN's training scripts (scripts/CoIN/Train_CIA/<k>_<task>.sh) pass
# --dema True: GQA, VizWiz, VQAv2, OCR-VQA of the origin order; the other four pass --dema False.
OFFICIAL_DEMA_TASKS = (4, 5, 7, 8)


# The sections of the run settings, in the order ``cl-core run --help`` shows them: each is
# the argparse group of its settings' flags.
SECTIONS = {
    "methods": "methods",
    "data": "tasks",
    "model": "model",
    "training": "training",
    "ema": "EMA and DEMA",
    "grouping": "instruction grouping",
    "baselines": "baselines (replay, ewc, lwf, olora)",
}


def setting(default, section: str, flag: Optional[str] = None, help: Optional[str] = None, **cli):
    """A RunConfig field that carries its section and, when the CLI sets it, its flag, its
    help and the rest of its ``add_argument`` keywords (``cli``: type, nargs, metavar,
    choices, action). ``cl-core run``'s parser and the flag names in error messages are
    generated from these (cl_core.cli.run.add_setting): a setting is written here only."""
    assert section in SECTIONS, section
    return dataclasses.field(default=default, metadata={"section": section, "flag": flag, "help": help, "cli": cli})


def cli_settings() -> list:
    """The RunConfig fields that have a command-line flag, in section order."""
    fields = [f for f in dataclasses.fields(RunConfig) if f.metadata.get("flag")]
    order = list(SECTIONS)
    return sorted(fields, key=lambda f: order.index(f.metadata["section"]))


def setting_flags() -> dict:
    """Setting name -> the flag that sets it (``steps`` -> ``--steps``), for error messages."""
    return {f.name: f.metadata["flag"] for f in cli_settings()}



def seed_numbers(text: str) -> tuple:
    """``--seeds`` text: "0,1" or "0" -> whole numbers (commas accepted as --methods accepts them)."""
    parts = [v.strip() for v in str(text).split(",") if v.strip()]
    try:
        return tuple(int(v) for v in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds takes whole numbers (0 1, or 0,1), got {text!r}") from None

@dataclass
class RunConfig:
    """Settings of a continual run. Everything here is part of the run's identity: a
    folder is only resumed with an equal config. Flat keywords (``RunConfig(steps=50)``);
    each field is tagged with its section, flag and help (:func:`setting`)."""

    # ---- methods
    methods: Optional[tuple] = setting(
        None, "methods", "--methods", nargs="+", metavar="M",
        help=f"one or more of {', '.join(METHODS)} (space or comma separated; default: dema, "
             "or the --recipe's own method)")   # None: the recipe's (custom: CUSTOM_METHODS)
    recipe: str = setting(
        "custom", "methods", "--recipe", choices=RECIPES,
        help="lcia: the official LCIA recipe (grouping, new sets warm-started from the last trained "
             "set, DEMA when a set is re-trained, every trainable tensor averaged, no clipping, one "
             "routing decision per test file, scale 2 / fallback 0.01); cl-next: Continual-NExT's "
             "(DEMA from task 2, one set, scale 0.01 / fallback 0.001); custom: the --methods with "
             "the flags below (default)")
    seeds: tuple = setting((0,), "methods", "--seeds", type=seed_numbers, nargs="+", metavar="S",
                           help="run every method once per seed (the report gives mean and spread); "
                                "separated by spaces or commas (0 1, or 0,1)")
    moe_experts: int = setting(2, "methods", "--moe-experts", type=int,
                               help="method moelora: LoRA experts per layer, --lora-r split across them "
                                    "(CoIN's scripts: 2)")
    moe_top_k: Optional[int] = setting(None, "methods", "--moe-top-k", type=int,
                                       help="method moelora: use each token's k most weighted experts, "
                                            "renormalised (default: every expert, CoIN's dense router)")
    # ---- data: the bundled benchmark (cl_core.continual.synthetic) unless task_files is given.
    task_files: tuple = setting((), "data", "--tasks", nargs="+", metavar="FILE",
                                help="task files in training order: LLaVA/CoIN conversation JSON or "
                                     "{\"instruction\",\"input\",\"output\"} JSON/JSONL")
    test_files: tuple = setting((), "data", "--test-tasks", nargs="+", metavar="FILE",
                                help="one test file per task file (default: hold out --test-fraction of each)")
    task_types: tuple = setting((), "data", "--task-types", nargs="+", metavar="TYPE",
                                help="scoring rule per task file: mc | short | cls | exact | count | box "
                                     "(default: inferred from the answers)")
    test_fraction: float = setting(0.1, "data", "--test-fraction", type=float,
                                   help="share of each task file held out for testing when no --test-tasks "
                                        "are given")
    max_test: int = setting(500, "data")   # at most this many held-out test samples per task
    skip_bad: bool = setting(False, "data", "--skip-bad", action="store_true",
                             help="skip malformed records, and records whose image is missing or unreadable, "
                                  "instead of failing (they are counted in the report)")
    image_folder: Optional[str] = setting(
        None, "data", "--image-folder", metavar="DIR",
        help="the records' relative \"image\" paths are under DIR (LLaVA's flag; an image-text --model)")
    multimodal: bool = setting(False, "data", "--multimodal", action="store_true",
                               help="bundled tasks as pictures (the scene is drawn, not written) on a tiny LLaVA")
    tasks: Optional[tuple] = setting(
        None, "data", "--bundled-tasks", nargs="+", metavar="NAME",   # None: the order preset
        help="a subset of the bundled tasks, in order (" + " ".join(TASK_NAMES) + "), or all")
    order: str = setting("origin", "data", "--order", choices=ORDERS,
                         help="task order preset (CoIN's): as given, reversed, or by name")
    variant: str = setting("original", "data", "--templates", choices=tuple(TEMPLATE_SETS),
                           help="instruction templates of the bundled tasks")
    n_train: int = setting(1600, "data", "--n-train", type=int, help="bundled: training samples per task")
    n_test: int = setting(100, "data", "--n-test", type=int, help="bundled: test samples per task")
    # ---- model: a local causal-LM folder, or (None) the tiny Llama trained in stage 1.
    model: Optional[str] = setting(
        None, "model", "--model", metavar="DIR",
        help="a local causal-LM folder, or an image-text-to-text one (LLaVA-style, with its processor) "
             "(default: the tiny Llama, trained in stage 1)")
    train_projector: bool = setting(
        False, "model", "--train-projector", action="store_true",
        help="image-text models: train the multi-modal projector too (the official mm_projector; "
             "averaged with --dema-params trainable); LoRA goes on the language model only")
    model_family: str = setting(
        "llava", "model", "--model-family", choices=MODEL_FAMILIES, metavar="NAME",
        help="--multimodal: the tiny image-text model trained on the pictures: llava (CLIP-style tower, MLP "
             "projector), qwen2-vl or qwen2.5-vl (patches merged 2 x 2, M-RoPE), each with 16 image tokens "
             "per picture (a --model folder's own config.json decides its family)")
    device: str = setting("auto", "model", "--device", choices=DEVICES,
                          help="where training and evaluation run: auto takes CUDA when torch sees a GPU "
                               "(one per process under a launcher), else the CPU")
    hidden_size: int = setting(64, "model", "--hidden-size", type=int,
                               help="tiny model: width (its LoRA tensors are width x --lora-r)")
    num_layers: int = setting(2, "model", "--num-layers", type=int, help="tiny model: transformer layers")
    num_heads: int = setting(4, "model")
    stage1_steps: int = setting(1200, "model", "--stage1-steps", type=int, help="tiny model: stage-1 steps")
    stage1_seed: Optional[int] = setting(None, "model")  # None: a base per seed; S: one base (trained with
                                                          # seed S) for every seed, as LLaVA is one model
    stage1_batch_size: int = setting(32, "model")
    stage1_lr: float = setting(3e-3, "model")
    # ---- training (stage 2, per task): the same for every method.
    steps: int = setting(100, "training", "--steps", type=int, help="optimizer steps per task")
    batch_size: int = setting(16, "training", "--batch-size", type=int, help="training examples per step")
    lr: float = setting(5e-3, "training", "--lr", type=float, help="peak learning rate (cosine schedule)")
    warmup_steps: int = setting(4, "training")
    lora_r: int = setting(8, "training", "--lora-r", type=int, help="LoRA rank")
    lora_alpha: int = setting(16, "training", "--lora-alpha", type=int, help="LoRA alpha (scaling)")
    target_modules: str = setting("all-linear", "training")
    max_length: int = setting(256, "training", "--max-length", type=int, help="tokens per training example")
    max_new_tokens: Optional[int] = setting(None, "training", "--max-new-tokens", type=int,
                                            help="generation length at evaluation (default: longest test "
                                                 "answer + 2)")
    eval_batch_size: int = setting(128, "training")
    max_grad_norm: float = setting(1.0, "training", "--max-grad-norm", type=float,
                                   help="gradient clipping of the custom methods (0: none, as the official runs)")
    # ---- EMA and DEMA (defaults: DEMAConfig's; the custom methods' settings, the recipes fix their own).
    ema_beta: float = setting(_DEMA_DEFAULTS.beta, "ema", "--beta", type=float,
                              help="fixed EMA weight of method ema")
    dema_formula: str = setting(_DEMA_DEFAULTS.formula, "ema", "--dema-formula", choices=FORMULAS,
                                help="how DEMA computes its weight α each step")
    dema_scale: float = setting(_DEMA_DEFAULTS.scale, "ema", "--dema-scale", type=float,
                                help="DEMA's scale constant")
    dema_fallback: float = setting(_DEMA_DEFAULTS.fallback, "ema", "--dema-fallback", type=float,
                                   help="the α DEMA uses when its formula leaves (0, 1) or cannot be computed")
    dema_params: str = setting("lora", "ema", "--dema-params", choices=DEMA_PARAMS,
                               help="tensors the EMA averages: the LoRA tensors, or every trainable one (official)")
    dema_tasks: Optional[tuple] = setting(
        None, "ema", "--dema-tasks", metavar="K,K,...",   # None: grouping decides
        help="DEMA on for exactly these 1-based tasks, whatever grouping decides (CoIN's scripts: "
             "4,5,7,8); default: on when a task re-trains a set")
    # ---- instruction grouping
    group_threshold: Optional[float] = setting(
        None, "grouping", "--threshold", type=float,   # None: the official 0.9 (original) / 0.3 (diverse, 10type)
        help="grouping threshold (default: 0.9 for original templates, 0.3 for diverse/10type)")
    route: str = setting("instance", "grouping", "--route", choices=ROUTES,
                         help="dema+group test routing: per test instance, or one decision per test file (official)")
    new_set_init: str = setting("fresh", "grouping", "--new-set-init", choices=NEW_SET_INITS,
                                help="dema+group: a new LoRA set starts fresh, or from the last trained set "
                                     "(official)")
    # ---- the paper's baselines (cl_core.continual.baselines; docs/runner.md says where each default is from)
    replay_size: int = setting(200, "baselines", "--replay-size", type=int,
                               help="method replay: records the buffer holds in total")
    replay_per_task: Optional[int] = setting(
        None, "baselines", "--replay-per-task", type=int, metavar="N",
        help="method replay, per-task sampling: keep N records of every finished task instead of sharing "
             "--replay-size among them (default: share --replay-size)")
    replay_sampling: str = setting("per-task", "baselines", "--replay-sampling", choices=REPLAY_SAMPLING,
                                   help="method replay: an equal share of every finished task (seeded draw), "
                                        "or a reservoir sample of every record seen")
    replay_ratio: float = setting(0.2, "baselines", "--replay-ratio", type=float,
                                  help="method replay: share of each later task's batches drawn from the buffer")
    ewc_lambda: float = setting(5000.0, "baselines", "--ewc-lambda", type=float,
                                help="method ewc: λ of the penalty λ·Σ F·(θ − θ*)²")
    ewc_samples: int = setting(64, "baselines", "--ewc-samples", type=int,
                               help="method ewc: examples of each task its Fisher is estimated from")
    ewc_decay: float = setting(1.0, "baselines", "--ewc-decay", type=float,
                               help="method ewc: online EWC's γ in F ← γ·F + F_task (1: the tasks' sum)")
    lwf_temperature: float = setting(2.0, "baselines", "--lwf-temperature", type=float,
                                     help="method lwf: distillation temperature T")
    lwf_weight: float = setting(1.0, "baselines", "--lwf-weight", type=float,
                                help="method lwf: weight of the distillation term")
    olora_lambda1: float = setting(0.5, "baselines", "--olora-lambda1", type=float,
                                   help="method olora: weight of the orthogonality loss Σ‖A_oldᵀ A_new‖²")
    olora_lambda2: float = setting(0.0, "baselines", "--olora-lambda2", type=float,
                                   help="method olora: weight of the new set's L2 term (default 0: off, as "
                                        "O-LoRA's scripts)")

    def __post_init__(self):
        if self.methods is None:
            self.methods = CUSTOM_METHODS if self.recipe == "custom" else (self.recipe,)
        elif isinstance(self.methods, list):
            self.methods = tuple(self.methods)
        if isinstance(self.dema_tasks, list):
            self.dema_tasks = tuple(self.dema_tasks)

    # ------------------------------------------------------------ (de)serialising
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        """The config of a ``config.json``; settings an older run folder lacks take their
        defaults (the value those runs used)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown run settings {sorted(unknown)}")
        kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()}
        return cls(**kw)

    # ------------------------------------------------------------ derived settings
    @property
    def bundled(self) -> bool:
        return not self.task_files

    def threshold(self) -> float:
        if self.group_threshold is not None:
            return float(self.group_threshold)
        from cl_core.continual.templates import THRESHOLDS

        return THRESHOLDS.get(self.variant, 0.9) if self.bundled else 0.9

    def num_tasks(self) -> int:
        """How many tasks the run trains, in order."""
        if not self.bundled:
            return len(self.task_files)
        if self.tasks is not None:
            return len(self.tasks)
        from cl_core.continual.synthetic import ORDERS as TASK_ORDERS

        return len(TASK_ORDERS.get(self.order, ()))

    def official_switches(self) -> Optional[tuple]:
        """Per task, whether the official CoIN scripts trained it with DEMA on, when the run is
        theirs: the bundled tasks, all eight in CoIN's (origin) order, original templates. Else None."""
        if not self.bundled or self.order != "origin" or self.variant != "original":
            return None
        if self.tasks is not None and tuple(self.tasks) != tuple(TASK_NAMES):
            return None
        return tuple(k + 1 in OFFICIAL_DEMA_TASKS for k in range(len(TASK_NAMES)))

    def dema_on(self, method: str, task_index: int, reused: bool) -> bool:
        """Does ``method`` train task ``task_index`` (0-based) with its EMA? ``dema_tasks`` when
        given, else when the task re-trains a set."""
        if self.plan(method).ema is None:
            return False
        if self.dema_tasks is not None:
            return task_index + 1 in self.dema_tasks
        return bool(reused)

    def describe(self, method: str) -> dict:
        """``method``'s settings in words, for the report (its plan, and ``dema_tasks``)."""
        d = self.plan(method).describe()
        if self.plan(method).adapter == "moelora":
            d["LoRA sets"] = self.moelora_config().describe()
        own = methods_table.method(method)
        if own.hooks is not None:   # the baselines: their own settings, as the flags name them
            if method == "olora":
                d["LoRA sets"] = "one per task (earlier ones frozen; inference sums them)"
            d["own settings"] = ", ".join(f"{setting_flags()[f]} {getattr(self, f)}" for f in own.reads)
        if self.dema_tasks is not None and self.plan(method).ema is not None:
            d["EMA on"] = "tasks " + ", ".join(str(t) for t in self.dema_tasks) + " (`--dema-tasks`)"
        return d

    def plan(self, method: str) -> MethodPlan:
        """How ``method`` trains and evaluates under this config (cl_core.continual.methods.plan)."""
        return methods_table.plan(self, method)

    def moelora_config(self):
        """The MoELoRAConfig of method moelora (ValueError naming MoELoRAConfig's fields)."""
        from cl_core.moelora import MoELoRAConfig

        return MoELoRAConfig(r=self.lora_r, lora_alpha=self.lora_alpha, num_experts=self.moe_experts,
                             top_k=self.moe_top_k, dropout=0.0, target_modules=self.target_modules)

    def ema_config(self, method: str) -> Optional[DEMAConfig]:
        """The EMA settings of ``method``'s tasks with an EMA (None: the method has none)."""
        return self.plan(method).ema

    # ------------------------------------------------------------ validation
    def validate(self, flags: Optional[dict] = None) -> None:
        """Raise ValueError for settings that cannot work (before anything is trained);
        ``flags`` maps settings to the flags they came from (cl_core.continual.validation)."""
        from cl_core.continual.validation import validate

        validate(self, flags)

    def on_cuda(self) -> bool:
        """Whether training and evaluation run on CUDA (``device``: auto picks CUDA when torch
        sees a GPU, as the Trainer does)."""
        import torch

        return self.device == "cuda" or (self.device == "auto" and torch.cuda.is_available())


def defaults() -> RunConfig:
    """A RunConfig with every default (the CLI's defaults are read from it)."""
    return RunConfig()
