"""RunConfig: the settings of a continual run, their validation, and the EMA settings each
method trains with (the one place a run's DEMAConfig is built).

    cfg = RunConfig(methods=("lora", "dema"), seeds=(0, 1))
    cfg.validate()                    # ValueError for settings that cannot work
    cfg.plan("lcia")                  # MethodPlan: grouping, EMA settings, new-set start,
                                      # averaged tensors, clipping, test routing
    cfg.ema_config("dema")            # the DEMAConfig the method's tasks use (None for lora)

Methods and recipes. ``lora``, ``ema``, ``dema``, ``group`` (instruction grouping without
any EMA: the ablation that separates grouping's effect from DEMA's) and ``dema+group`` are
the "custom" methods:
they take the run's flags (``route``, ``new_set_init``, ``max_grad_norm``, ``dema_params``,
``dema_*``). ``lcia`` and ``cl-next`` are recipes with fixed settings:

    lcia     the official LCIA recipe (JingyangQiao/CoIN): instruction grouping; a task that
             opens a new LoRA set starts from the most recently trained set's weights with
             DEMA off, a task that re-trains a set starts from that set's latest weights with
             DEMA on; every trainable tensor averaged; no gradient clipping (DeepSpeed's
             default 0); one routing decision per test file; scale 2.0, fallback 0.01.
    cl-next  the Continual-NExT toolkit: one LoRA set, DEMA from task 2, scale 0.01,
             fallback 0.001, every trainable tensor averaged, the trainer's default
             clipping (1.0).

``RunConfig(recipe="lcia")`` runs the lcia method (``recipe`` picks the default method list);
``recipe="custom"`` (the default) runs the five custom methods. A recipe with custom methods
(``RunConfig(recipe="lcia", methods=("dema+group",))``, ``cl-core run --recipe lcia --methods
dema+group``) runs them with the recipe's settings (routing, new-set start, averaged tensors,
clipping, DEMA scale and fallback); a custom flag set beside a recipe is refused, since the
recipe fixes it.

``moelora`` is CoIN's own method (cl_core.moelora), with fixed settings of its own: one MoELoRA
adapter set (``moe_experts`` LoRA experts of rank ``lora_r / moe_experts`` and a softmax router
in every adapted layer; CoIN's scripts: 2 experts, dense) trained task after task, no EMA, no
grouping, the trainer's default clipping (1.0, as the scripts' DeepSpeed "gradient_clipping":
"auto"). It is neither custom nor a recipe: the custom flags do not apply to it, and
``moe_experts`` / ``moe_top_k`` apply to it alone.

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

from cl_core.dema.config import FORMULAS, DEMAConfig

CUSTOM_METHODS = ("lora", "ema", "dema", "group", "dema+group")
RECIPE_METHODS = ("lcia", "cl-next")
OWN_METHODS = ("moelora",)               # methods with fixed settings of their own that are no recipe
METHODS = CUSTOM_METHODS + RECIPE_METHODS + OWN_METHODS
RECIPES = ("custom",) + RECIPE_METHODS
DEVICES = ("auto", "cpu", "cuda")
ORDERS = ("origin", "reverse", "alphabet")
ROUTES = ("instance", "file")            # test routing: per test instance, or one decision per test file
NEW_SET_INITS = ("fresh", "latest")      # a new LoRA set: fresh init, or the last trained set's weights
DEMA_PARAMS = ("lora", "trainable")      # averaged tensors: the LoRA tensors, or every trainable one

_DEMA_DEFAULTS = DEMAConfig()

# The 1-based tasks for which CoIN's training scripts (scripts/CoIN/Train_CIA/<k>_<task>.sh) pass
# --dema True: GQA, VizWiz, VQAv2, OCR-VQA of the origin order; the other four pass --dema False.
OFFICIAL_DEMA_TASKS = (4, 5, 7, 8)


@dataclass(frozen=True)
class MethodPlan:
    """How one method trains and evaluates (RunConfig.plan)."""

    grouping: bool                  # instruction grouping (several LoRA sets) or one set
    ema: Optional[DEMAConfig]       # the EMA of a task that re-trains a set (None: never)
    new_set_init: str               # fresh | latest (only matters with grouping)
    params: str                     # lora | trainable: the tensors the EMA averages
    max_grad_norm: float            # gradient clipping (0: none)
    route: str                      # instance | file (only matters with grouping)
    adapter: str = "lora"           # lora (PEFT LoRA sets) | moelora (one MoELoRA set, cl_core.moelora)

    def describe(self) -> dict:
        """The plan in words, for the report."""
        if self.ema is None:
            ema = "none"
        elif self.ema.formula == "fixed":
            ema = f"fixed β = {self.ema.beta}"
        else:
            ema = f"DEMA `{self.ema.formula}`, scale {self.ema.scale}, fallback {self.ema.fallback}"
        return {
            "LoRA sets": "grouping (one per instruction group)" if self.grouping else "one",
            "a new set starts from": ("the last trained set" if self.new_set_init == "latest" else "fresh init")
                                     if self.grouping else "fresh init (task 1)",
            "EMA": ema,
            "EMA on": "-" if self.ema is None else "when a task re-trains a set" if self.grouping else "from task 2",
            "averaged tensors": "-" if self.ema is None else
                                ("every trainable tensor" if self.params == "trainable" else "LoRA A/B"),
            "gradient clipping": f"max norm {self.max_grad_norm:g}" if self.max_grad_norm > 0 else "none",
            "test routing": ("one decision per test file" if self.route == "file" else "per instance")
                            if self.grouping else "-",
        }


@dataclass
class RunConfig:
    """Settings of a continual run. Everything here is part of the run's identity: a
    folder is only resumed with an equal config."""

    methods: Optional[tuple] = None        # None: the recipe's (custom: CUSTOM_METHODS)
    recipe: str = "custom"                 # custom | lcia | cl-next (see the module docstring)
    seeds: tuple = (0,)
    # Data: the bundled benchmark (cl_core.continual.synthetic) unless task_files is given.
    tasks: Optional[tuple] = None          # bundled task names, in order (None: the order preset)
    order: str = "origin"                  # origin | reverse | alphabet (CoIN's presets)
    variant: str = "original"              # instruction templates: original | diverse | 10type
    n_train: int = 1600                    # bundled: training samples per task
    n_test: int = 100                      # bundled: test samples per task
    task_files: tuple = ()                 # your own tasks: LLaVA/CoIN or instruction JSON/JSONL
    test_files: tuple = ()                 # optional test files, one per task file
    task_types: tuple = ()                 # optional scoring rule per task file (else inferred)
    test_fraction: float = 0.1             # held out of each task file when no test files
    max_test: int = 500                    # at most this many held-out test samples per task
    skip_bad: bool = False                 # skip malformed records (and records with a bad image) instead of failing
    image_folder: Optional[str] = None     # task files: relative "image" paths are under this folder (LLaVA's flag)
    multimodal: bool = False               # bundled: draw the scenes (cl_core.continual.images), tiny LLaVA
    train_projector: bool = False          # image-text models: the multi-modal projector is trained too
    # Model: a local causal-LM folder, or (None) the tiny Llama trained in stage 1.
    model: Optional[str] = None
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    stage1_steps: int = 1200
    stage1_seed: Optional[int] = None      # None: a base per seed; S: one base (trained with seed S)
                                           #   for every seed, as LLaVA is one pre-trained model
    stage1_batch_size: int = 32
    stage1_lr: float = 3e-3
    # Stage 2 (per task): the same for every method.
    steps: int = 100
    batch_size: int = 16
    lr: float = 5e-3
    warmup_steps: int = 4
    lora_r: int = 8
    lora_alpha: int = 16
    target_modules: str = "all-linear"
    max_length: int = 256
    max_new_tokens: Optional[int] = None   # None: from the longest test answer (+2)
    device: str = "auto"                   # auto (CUDA when torch sees a GPU) | cpu | cuda
    eval_batch_size: int = 128
    # EMA settings (defaults: DEMAConfig's).
    ema_beta: float = _DEMA_DEFAULTS.beta
    dema_formula: str = _DEMA_DEFAULTS.formula
    dema_scale: float = _DEMA_DEFAULTS.scale
    dema_fallback: float = _DEMA_DEFAULTS.fallback
    group_threshold: Optional[float] = None  # None: the official 0.9 (original) / 0.3 (diverse, 10type)
    # Settings of the custom methods (the recipes fix their own).
    route: str = "instance"                # test routing of dema+group: instance | file
    new_set_init: str = "fresh"            # a new LoRA set of dema+group: fresh | latest
    max_grad_norm: float = 1.0             # gradient clipping (0: none)
    dema_params: str = "lora"              # tensors the EMA averages: lora | trainable
    dema_tasks: Optional[tuple] = None     # 1-based tasks with DEMA on (None: grouping decides)
    # Settings of method moelora (CoIN's scripts: --expert_num 2, every expert for every token).
    moe_experts: int = 2                   # LoRA experts per layer; lora_r is split across them
    moe_top_k: Optional[int] = None        # None: dense softmax over every expert (official)

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
        from cl_core.continual.synthetic import TASK_NAMES

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
        """How ``method`` trains and evaluates under this config. A custom method under a
        recipe (``recipe="lcia"``) takes the recipe's settings."""
        if method in CUSTOM_METHODS and self.recipe in RECIPE_METHODS:
            return self._custom_plan(method, self.plan(self.recipe))
        if method == "lcia":
            return MethodPlan(grouping=True, ema=DEMAConfig(formula="official", scale=2.0, fallback=0.01),
                              new_set_init="latest", params="trainable", max_grad_norm=0.0, route="file")
        if method == "cl-next":
            return MethodPlan(grouping=False, ema=DEMAConfig(formula="official", scale=0.01, fallback=0.001),
                              new_set_init="fresh", params="trainable", max_grad_norm=1.0, route="instance")
        if method == "moelora":
            return MethodPlan(grouping=False, ema=None, new_set_init="fresh", params="lora", max_grad_norm=1.0,
                              route="instance", adapter="moelora")
        if method not in CUSTOM_METHODS:
            raise ValueError(f"unknown method {method!r}; allowed: {', '.join(METHODS)}")
        return self._custom_plan(method, None)

    def _custom_plan(self, method: str, recipe: Optional[MethodPlan]) -> MethodPlan:
        # The custom methods: this config's flags, or (recipe) the recipe's settings.
        ema = None
        if method == "ema":
            ema = DEMAConfig(formula="fixed", beta=self.ema_beta)
        elif method not in ("lora", "group"):
            ema = (recipe.ema if recipe is not None else
                   DEMAConfig(formula=self.dema_formula, scale=self.dema_scale, fallback=self.dema_fallback))
        src = recipe
        return MethodPlan(grouping=method in ("group", "dema+group"), ema=ema,
                          new_set_init=src.new_set_init if src else self.new_set_init,
                          params=src.params if src else self.dema_params,
                          max_grad_norm=float(src.max_grad_norm if src else self.max_grad_norm),
                          route=src.route if src else self.route)

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
        from cl_core.continual.templates import TEMPLATE_SETS

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
        for m in ("ema", "dema"):
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
        for name, allowed in (("route", ROUTES), ("new_set_init", NEW_SET_INITS), ("dema_params", DEMA_PARAMS)):
            if getattr(self, name) not in allowed:
                raise ValueError(say(name, getattr(self, name), f"is not known; allowed: {', '.join(allowed)}"))
        base = RunConfig(recipe=self.recipe, methods=self.methods)
        changed = [say.name(f) for f in _CUSTOM_FLAGS if getattr(self, f) != getattr(base, f)]
        custom = [m for m in methods if m in CUSTOM_METHODS]
        # A recipe's custom methods take the recipe's settings: a flag for them would be ignored
        # (the recipes have no fixed-EMA beta: method ema keeps its own).
        fixed = [say.name(f) for f in _CUSTOM_FLAGS if f != "ema_beta" and getattr(self, f) != getattr(base, f)]
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
        changed = [say.name(f) for f in ("moe_experts", "moe_top_k") if getattr(self, f) != getattr(RunConfig(), f)]
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
            from cl_core.continual.synthetic import TASK_NAMES

            if not self.tasks:
                raise ValueError("the task list is empty")
            for t in self.tasks:
                if t not in TASK_NAMES:
                    raise ValueError(f"unknown bundled task {t!r}; the bundled tasks are: {', '.join(TASK_NAMES)}")
            if len(set(self.tasks)) != len(self.tasks):
                raise ValueError(f"a task is listed twice: {list(self.tasks)}")


# Settings that only the custom methods use (validate refuses them when only recipes run).
_CUSTOM_FLAGS = ("route", "new_set_init", "max_grad_norm", "dema_params", "dema_formula", "dema_scale",
                 "dema_fallback", "ema_beta")


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


def method_slug(method: str) -> str:
    return method.replace("+", "_")


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
