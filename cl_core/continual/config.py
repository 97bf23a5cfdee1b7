"""RunConfig: the settings of a continual run, their validation, and the EMA settings each
method trains with (the one place a run's DEMAConfig is built).

    cfg = RunConfig(methods=("lora", "dema"), seeds=(0, 1))
    cfg.validate()                    # ValueError for settings that cannot work
    cfg.ema_config("dema")            # the DEMAConfig the method's tasks use (None for lora)

The EMA defaults come from :class:`cl_core.DEMAConfig` (they are typed there only).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from cl_core.dema.config import FORMULAS, DEMAConfig

METHODS = ("lora", "ema", "dema", "dema+group")
ORDERS = ("origin", "reverse", "alphabet")

_DEMA_DEFAULTS = DEMAConfig()


@dataclass
class RunConfig:
    """Settings of a continual run. Everything here is part of the run's identity: a
    folder is only resumed with an equal config."""

    methods: tuple = METHODS
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
    skip_bad: bool = False                 # skip malformed records instead of failing
    # Model: a local causal-LM folder, or (None) the tiny Llama trained in stage 1.
    model: Optional[str] = None
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    stage1_steps: int = 1200
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
    eval_batch_size: int = 128
    # EMA settings (defaults: DEMAConfig's).
    ema_beta: float = _DEMA_DEFAULTS.beta
    dema_formula: str = _DEMA_DEFAULTS.formula
    dema_scale: float = _DEMA_DEFAULTS.scale
    dema_fallback: float = _DEMA_DEFAULTS.fallback
    group_threshold: Optional[float] = None  # None: the official 0.9 (original) / 0.3 (diverse, 10type)

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

    def ema_config(self, method: str) -> Optional[DEMAConfig]:
        """The EMA settings of ``method``'s tasks with an EMA (None: the method has none)."""
        if method == "lora":
            return None
        if method == "ema":
            return DEMAConfig(formula="fixed", beta=self.ema_beta)
        return DEMAConfig(formula=self.dema_formula, scale=self.dema_scale, fallback=self.dema_fallback)

    # ------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise ValueError for settings that cannot work (before anything is trained)."""
        from cl_core.continual.evaluation import check_task_type
        from cl_core.continual.templates import TEMPLATE_SETS

        methods = list(self.methods)
        if not methods:
            raise ValueError("no methods given")
        for m in methods:
            if m not in METHODS:
                raise ValueError(f"unknown method {m!r}; allowed: {', '.join(METHODS)}")
        if len(set(methods)) != len(methods):
            raise ValueError(f"methods listed twice: {methods}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct and at least one: {list(self.seeds)}")
        for s in self.seeds:
            if isinstance(s, bool) or not isinstance(s, int) or s < 0:
                raise ValueError(f"seed {s!r} must be an int >= 0")
        if self.order not in ORDERS:
            raise ValueError(f"unknown task order {self.order!r}; allowed: {', '.join(ORDERS)}")
        if self.variant not in TEMPLATE_SETS:
            raise ValueError(f"unknown instruction variant {self.variant!r}; allowed: {', '.join(TEMPLATE_SETS)}")
        if self.dema_formula not in FORMULAS:
            raise ValueError(f"unknown DEMA formula {self.dema_formula!r}; allowed: {', '.join(FORMULAS)}")
        for name in ("n_train", "n_test", "steps", "batch_size", "lora_r", "lora_alpha", "max_length",
                     "eval_batch_size", "stage1_batch_size", "hidden_size", "num_layers", "num_heads", "max_test"):
            _check_positive(name, getattr(self, name))
        _check_positive("stage1_steps", self.stage1_steps, 0)
        _check_positive("warmup_steps", self.warmup_steps, 0)
        if self.max_new_tokens is not None:
            _check_positive("max_new_tokens", self.max_new_tokens)
        for name in ("lr", "stage1_lr"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v > 0 and math.isfinite(v)):
                raise ValueError(f"{name}={v!r} must be a positive number")
        if not 0 < self.test_fraction < 1:
            raise ValueError(f"test_fraction={self.test_fraction!r} must be in (0, 1)")
        # EMA settings go through DEMAConfig's own validation (the configs the methods will use).
        for m in ("ema", "dema"):
            self.ema_config(m)
        if self.group_threshold is not None and not 0 <= self.group_threshold <= 1:
            raise ValueError(f"group_threshold={self.group_threshold!r} must be in [0, 1]")
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
        if self.model is not None:
            p = Path(self.model)
            if not p.is_dir():
                raise ValueError(f"--model {self.model}: not a folder (give a local causal-LM folder "
                                 "with config.json, weights and a tokenizer)")
            if not (p / "config.json").is_file():
                raise ValueError(f"--model {self.model}: no config.json inside; not a Hugging Face model folder")

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


def defaults() -> RunConfig:
    """A RunConfig with every default (the CLI's defaults are read from it)."""
    return RunConfig()


def method_slug(method: str) -> str:
    return method.replace("+", "_")


def _check_positive(name, value, minimum=1):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= minimum:
        raise ValueError(f"{name}={value!r} must be a number >= {minimum}")
