"""RunConfig: the settings of a continual run, each declared once with its section, flag and
help (the CLI's parser is generated from them), and their validation.

    cfg = RunConfig(methods=("lora", "dema"), seeds=(0, 1))
    cfg.validate()                    # ValueError for settings that cannot work
    cfg.plan("lcia")                  # MethodPlan (cl_core.continual.methods, the method table)
    cfg.ema_config("dema")            # the DEMAConfig the method's tasks use (None for lora)

The methods and recipes are defined in :mod:`cl_core.continual.methods`. ``RunConfig(recipe="lcia")``
runs the lcia method (``recipe`` picks the default method list); ``recipe="custom"`` (the default)
runs the five custom methods. A recipe with custom methods (``RunConfig(recipe="lcia",
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

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from cl_core.continual import methods as methods_table
from cl_core.continual.methods import (  # noqa: F401 - re-exported (the runner's older import site)
    CUSTOM_METHODS, CUSTOM_SETTINGS, METHODS, OWN_METHODS, RECIPE_METHODS, RECIPES, MethodPlan, method_slug)
from cl_core.continual.synthetic import TASK_NAMES
from cl_core.continual.templates import TEMPLATE_SETS
from cl_core.dema.config import FORMULAS, DEMAConfig

DEVICES = ("auto", "cpu", "cuda")
ORDERS = ("origin", "reverse", "alphabet")
ROUTES = ("instance", "file")            # test routing: per test instance, or one decision per test file
NEW_SET_INITS = ("fresh", "latest")      # a new LoRA set: fresh init, or the last trained set's weights
# Averaged tensors: the LoRA tensors, or every trainable one. The rule is the integration's
# PARAM_CHOICES (cl_core.integrations.core), which validate() checks against; this copy only
# lists the --dema-params choices without importing torch into `cl-core --help` (a test keeps
# the two equal).
DEMA_PARAMS = ("lora", "trainable")

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
    "training": "training (every method alike)",
    "ema": "EMA and DEMA",
    "grouping": "instruction grouping",
}


def setting(default, section: str, flag: Optional[str] = None, help: Optional[str] = None, **cli):
    """A RunConfig field that carries its section and, when the CLI sets it, its flag, its
    help and the rest of its ``add_argument`` keywords (``cli``: type, nargs, metavar,
    choices, action). ``cl-core run``'s parser and the flag names in error messages are
    generated from these (cl_core.cli.run.add_setting): a setting is written here only."""
    assert section in SECTIONS, section
    meta = {"section": section, "flag": flag, "help": help, "cli": cli}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def cli_settings() -> list:
    """The RunConfig fields that have a command-line flag, in section order."""
    fields = [f for f in dataclasses.fields(RunConfig) if f.metadata.get("flag")]
    order = list(SECTIONS)
    return sorted(fields, key=lambda f: order.index(f.metadata["section"]))


def setting_flags() -> dict:
    """Setting name -> the flag that sets it (``steps`` -> ``--steps``), for error messages."""
    return {f.name: f.metadata["flag"] for f in cli_settings()}


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
             "(DEMA from task 2, one set, scale 0.01 / fallback 0.001); custom: the methods below "
             "with the flags below (default)")
    seeds: tuple = setting((0,), "methods", "--seeds", type=int, nargs="+", metavar="S",
                           help="run every method once per seed (the report gives mean and spread)")
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
        help="a subset of the bundled tasks, in order (" + " ".join(TASK_NAMES) + ")")
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
    device: str = setting("auto", "model", "--device", choices=DEVICES,
                          help="where training and evaluation run: auto takes CUDA when torch sees a GPU "
                               "(one per process under a launcher), else the CPU")
    hidden_size: int = setting(64, "model")
    num_layers: int = setting(2, "model")
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
        """Raise ValueError for settings that cannot work (before anything is trained).

        ``flags`` maps setting names to the command-line flags they came from (the CLI's
        ``--steps`` for ``steps``): the messages then name what the user typed."""
        from cl_core.continual.evaluation import check_task_type

        say = _Namer(flags)
        methods = list(self.methods)
        if not methods:
            raise ValueError("no methods given")
        for m in methods:
            if m not in METHODS:
                raise ValueError(f"unknown method {m!r}; allowed: {', '.join(METHODS)}")
        if len(set(methods)) != len(methods):
            raise ValueError(f"methods listed twice: {methods}")
        if self.recipe not in RECIPES:
            raise ValueError(f"unknown recipe {self.recipe!r}; allowed: {', '.join(RECIPES)}")
        self._validate_custom_flags(methods, say)
        self._validate_device(say)
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"{say.name('seeds')} must be distinct and at least one: {list(self.seeds)}")
        for s in self.seeds:
            if isinstance(s, bool) or not isinstance(s, int) or s < 0:
                raise ValueError(f"{say.name('seeds')}: seed {s!r} must be a whole number >= 0")
        if self.order not in ORDERS:
            raise ValueError(f"unknown task order {self.order!r}; allowed: {', '.join(ORDERS)}")
        if self.variant not in TEMPLATE_SETS:
            raise ValueError(f"unknown instruction variant {self.variant!r}; allowed: {', '.join(TEMPLATE_SETS)}")
        if self.dema_formula not in FORMULAS:
            raise ValueError(f"unknown DEMA formula {self.dema_formula!r}; allowed: {', '.join(FORMULAS)}")
        for name in ("n_train", "n_test", "steps", "batch_size", "lora_r", "lora_alpha", "max_length",
                     "eval_batch_size", "stage1_batch_size", "hidden_size", "num_layers", "num_heads", "max_test"):
            _check_positive(name, getattr(self, name), say=say)
        _check_positive("stage1_steps", self.stage1_steps, 0, say=say)
        s1 = self.stage1_seed
        if s1 is not None and (isinstance(s1, bool) or not isinstance(s1, int) or s1 < 0):
            raise ValueError(say("stage1_seed", s1, "must be None (a base per seed) or an int >= 0"))
        _check_positive("warmup_steps", self.warmup_steps, 0, say=say)
        if self.max_new_tokens is not None:
            _check_positive("max_new_tokens", self.max_new_tokens, say=say)
        for name in ("lr", "stage1_lr"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v > 0 and math.isfinite(v)):
                raise ValueError(say(name, v, "must be a positive number"))
        if not 0 < self.test_fraction < 1:
            raise ValueError(say("test_fraction", self.test_fraction, "must be between 0 and 1 (exclusive)"))
        # EMA settings go through DEMAConfig's own validation (the configs the methods will use);
        # its messages name DEMAConfig's fields, which say.dema turns into the run's names.
        for m in (m for m in CUSTOM_METHODS if methods_table.TABLE[m].ema):
            try:
                self.ema_config(m)
            except ValueError as exc:
                raise ValueError(say.dema(str(exc))) from None
        self._validate_moelora(methods, say)
        v = self.max_grad_norm
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v >= 0 and math.isfinite(v)):
            raise ValueError(say("max_grad_norm", v, "must be a number >= 0 (0: no clipping)"))
        g = self.group_threshold
        if g is not None and (isinstance(g, bool) or not isinstance(g, (int, float)) or not 0 <= g <= 1):
            raise ValueError(say("group_threshold", g, "must be a number between 0 and 1"))
        if self.bundled:
            self._validate_bundled()
        else:
            if self.test_files and len(self.test_files) != len(self.task_files):
                raise ValueError(f"{len(self.test_files)} test files for {len(self.task_files)} task files; "
                                 "give one test file per task file, or none")
            if self.task_types:
                if len(self.task_types) != len(self.task_files):
                    raise ValueError(f"{len(self.task_types)} task types for {len(self.task_files)} task files")
                for t in self.task_types:
                    check_task_type(t)
            if self.tasks is not None:
                raise ValueError("bundled task names and task files cannot be mixed")
        self._validate_images(say)
        if self.model is not None:
            p = Path(self.model)
            if not p.is_dir():
                raise ValueError(f"--model {self.model}: not a folder (give a local causal-LM folder "
                                 "with config.json, weights and a tokenizer)")
            if not (p / "config.json").is_file():
                raise ValueError(f"--model {self.model}: no config.json inside; not a Hugging Face model folder")
        self._validate_dema_tasks(methods, say)

    def _validate_images(self, say: "_Namer") -> None:
        if self.multimodal and not self.bundled:
            raise ValueError(f"{say.name('multimodal')} draws the bundled tasks' scenes; with task files the "
                             f"{say.name('model')} folder decides: an image-text model (LLaVA-style) reads the "
                             "records' images")
        if self.image_folder is not None:
            if self.bundled:
                raise ValueError(f"{say.name('image_folder')} goes with task files ({say.name('task_files')} FILE "
                                 "...): the bundled tasks draw their own images")
            if not Path(self.image_folder).is_dir():
                raise ValueError(say("image_folder", self.image_folder, "is not a folder"))
        if self.train_projector:
            if self.model is not None and Path(self.model, "config.json").is_file() \
                    and not is_image_text_folder(self.model):
                raise ValueError(f"{say.name('train_projector')}: {say.name('model')} {self.model} is a text model; "
                                 "the projector is an image-text model's (LLaVA's mm_projector)")
            if self.model is None and not self.multimodal:
                raise ValueError(f"{say.name('train_projector')} needs an image-text model: the bundled tasks with "
                                 f"{say.name('multimodal')}, or {say.name('model')} DIR of a LLaVA-style model")
            if "moelora" in (self.methods or ()):
                # MoELoRASet trains and saves its experts and routers only: a trained projector
                # would be lost at the save and at a resume, so refuse rather than drop it.
                raise ValueError(f"{say.name('train_projector')} cannot be combined with the moelora method (it "
                                 "trains and saves LoRA experts and routers only); run moelora without "
                                 f"{say.name('train_projector')}, or the other methods with it")

    def on_cuda(self) -> bool:
        """Whether training and evaluation run on CUDA (``device``: auto picks CUDA when torch
        sees a GPU, as the Trainer does)."""
        import torch

        return self.device == "cuda" or (self.device == "auto" and torch.cuda.is_available())

    def _validate_device(self, say: "_Namer") -> None:
        import torch

        if self.device not in DEVICES:
            raise ValueError(say("device", self.device, f"must be one of {', '.join(DEVICES)}"))
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"{say.name('device')} cuda: torch sees no CUDA device (torch "
                             f"{torch.__version__}{'' if torch.version.cuda else ', a CPU build'}); "
                             f"use {say.name('device')} cpu, or auto to take a GPU only where there is one")

    def _validate_custom_flags(self, methods, say: "_Namer") -> None:
        from cl_core.integrations.core import PARAM_CHOICES

        for name, allowed in (("route", ROUTES), ("new_set_init", NEW_SET_INITS), ("dema_params", PARAM_CHOICES)):
            if getattr(self, name) not in allowed:
                raise ValueError(say(name, getattr(self, name), f"is not known; allowed: {', '.join(allowed)}"))
        base = RunConfig(recipe=self.recipe, methods=self.methods)
        changed = [say.name(f) for f in CUSTOM_SETTINGS if getattr(self, f) != getattr(base, f)]
        custom = [m for m in methods if m in CUSTOM_METHODS]
        # A recipe's custom methods take the recipe's settings: a flag for them would be ignored
        # (the recipes have no fixed-EMA beta: method ema keeps its own).
        fixed = [say.name(f) for f in CUSTOM_SETTINGS if f != "ema_beta" and getattr(self, f) != getattr(base, f)]
        if custom and self.recipe in RECIPE_METHODS and fixed:
            raise ValueError(f"{', '.join(fixed)} set with {say.name('recipe')} {self.recipe}, which runs "
                             f"{', '.join(custom)} with the {self.recipe} settings: drop {', '.join(fixed)}, or drop "
                             f"{say.name('recipe')} to run {', '.join(custom)} with the custom settings")
        if custom:
            return
        # Only recipes (or moelora) run: a custom setting that differs from its default would be ignored.
        if changed:
            which = ("recipe methods" if all(m in RECIPE_METHODS for m in methods)
                     else "methods with fixed settings")
            raise ValueError(f"{', '.join(changed)} set, but only {which} run ({', '.join(methods)}), and such a "
                             f"method fixes its own settings; those settings apply to the custom methods "
                             f"({', '.join(CUSTOM_METHODS)}): add one, or drop the setting")

    def _validate_moelora(self, methods, say: "_Namer") -> None:
        if "moelora" in methods:
            try:
                self.moelora_config()
            except ValueError as exc:
                raise ValueError(say.rename(str(exc), "MoELoRAConfig", _MOELORA_FIELDS)) from None
            return
        own = methods_table.TABLE["moelora"].reads
        changed = [say.name(f) for f in own if getattr(self, f) != getattr(RunConfig(), f)]
        if changed:
            raise ValueError(f"{', '.join(changed)} set, but method moelora does not run ({', '.join(methods)}): "
                             f"add moelora to the methods, or drop {', '.join(changed)}")

    def _validate_dema_tasks(self, methods, say: "_Namer") -> None:
        if self.dema_tasks is None:
            return
        n = self.num_tasks()
        flag = say.name("dema_tasks")
        shown = ",".join(str(t) for t in self.dema_tasks)
        for t in self.dema_tasks:
            if isinstance(t, bool) or not isinstance(t, int) or not 1 <= t <= n:
                raise ValueError(f"{flag} {shown}: task number {t!r} is not between 1 and {n} (the run has {n} "
                                 "tasks; numbers are 1-based, e.g. 4,5,7,8 for CoIN's scripts)")
        if len(set(self.dema_tasks)) != len(self.dema_tasks):
            raise ValueError(f"{flag} {shown}: a task number is listed twice")
        if not any(self.plan(m).ema is not None for m in methods):
            raise ValueError(f"{flag} set, but no method of the run has an EMA ({', '.join(methods)}): add one "
                             "(e.g. lcia), or drop the setting")

    def _validate_bundled(self) -> None:
        if self.test_files or self.task_types:
            raise ValueError("test files and task types go with task files (--tasks FILE ...)")
        if self.tasks is not None:
            if not self.tasks:
                raise ValueError("the task list is empty")
            for t in self.tasks:
                if t not in TASK_NAMES:
                    raise ValueError(f"unknown bundled task {t!r}; the bundled tasks are: {', '.join(TASK_NAMES)}")
            if len(set(self.tasks)) != len(self.tasks):
                raise ValueError(f"a task is listed twice: {list(self.tasks)}")


def model_type(path) -> Optional[str]:
    """The ``model_type`` of a model folder's config.json (None when there is none)."""
    f = Path(path) / "config.json"
    try:
        import json

        return json.loads(f.read_text()).get("model_type")
    except (OSError, ValueError):
        return None


def is_image_text_folder(path) -> bool:
    """Whether transformers loads the folder's model with AutoModelForImageTextToText."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    return model_type(path) in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES


def defaults() -> RunConfig:
    """A RunConfig with every default (the CLI's defaults are read from it)."""
    return RunConfig()


def _check_positive(name, value, minimum=1, say=None):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= minimum:
        raise ValueError((say or _Namer(None))(name, value, f"must be a number >= {minimum}"))


# DEMAConfig's / MoELoRAConfig's fields -> the RunConfig settings they are built from.
_DEMA_FIELDS = {"beta": "ema_beta", "scale": "dema_scale", "fallback": "dema_fallback", "formula": "dema_formula"}
_MOELORA_FIELDS = {"r": "lora_r", "lora_alpha": "lora_alpha", "num_experts": "moe_experts", "top_k": "moe_top_k",
                   "target_modules": "target_modules"}


class _Namer:
    """Error texts in the caller's words: ``steps=-5 must be ...`` for Python callers,
    ``--steps must be ..., got -5`` when ``flags`` maps the setting to a command-line flag."""

    def __init__(self, flags: Optional[dict]):
        self.flags = flags or {}

    def name(self, field: str) -> str:
        return self.flags.get(field, field)

    def __call__(self, field: str, value, what: str) -> str:
        if field in self.flags:
            return f"{self.flags[field]} {what}, got {value!r}"
        return f"{field}={value!r} {what}"

    def dema(self, message: str) -> str:
        """A DEMAConfig message with its field (``DEMAConfig.beta=1.5``) named as the run's
        setting (``ema_beta=1.5``) or its flag (``--beta 1.5``)."""
        return self.rename(message, "DEMAConfig", _DEMA_FIELDS)

    def rename(self, message: str, cls: str, fields: dict) -> str:
        """A ``cls`` message with its fields (``cls.field=value``) named as the run's settings
        (``fields`` maps them) or their flags."""
        import re

        def swap(m):
            field = fields.get(m.group(1), m.group(1))
            if field in self.flags:
                return f"{self.flags[field]} {m.group(2)}"
            return f"{field}={m.group(2)}"

        return re.sub(re.escape(cls) + r"\.(\w+)=(\S+)", swap, message)
