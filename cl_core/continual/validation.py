"""Validation of a RunConfig: ValueError for settings that cannot work, raised before anything
is trained, in the caller's words (the setting for Python callers, the flag it came from for
the CLI: ``_Namer``). ``RunConfig.validate`` calls it.

    validate(cfg)                      # steps=-5 must be a number >= 1
    validate(cfg, {"steps": "--steps"})   # --steps must be a number >= 1, got -5
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Optional

from cl_core.continual import methods as methods_table
from cl_core.continual.methods import CUSTOM_METHODS, CUSTOM_SETTINGS, METHODS, RECIPE_METHODS, RECIPES
from cl_core.continual.model_folder import is_image_text_folder
from cl_core.continual.synthetic import TASK_NAMES
from cl_core.continual.templates import TEMPLATE_SETS


def validate(cfg, flags: Optional[dict] = None) -> None:
    """Raise ValueError for settings that cannot work (before anything is trained).

    ``flags`` maps setting names to the command-line flags they came from (the CLI's
    ``--steps`` for ``steps``): the messages then name what the user typed."""
    from cl_core.continual.evaluation import TASK_TYPES, check_task_type

    say = _Namer(flags)
    methods = list(cfg.methods)
    if not methods:
        raise ValueError("no methods given")
    for m in methods:
        if m not in METHODS:
            _refuse_combination(m)
            raise ValueError(f"unknown method {m!r}; allowed: {', '.join(METHODS)}")
    if len(set(methods)) != len(methods):
        raise ValueError(f"methods listed twice: {methods}")
    if cfg.recipe not in RECIPES:
        raise ValueError(f"unknown recipe {cfg.recipe!r}; allowed: {', '.join(RECIPES)}")
    _custom_flags(cfg, methods, say)
    _baselines(cfg, methods, say)
    _device(cfg, say)
    if not cfg.seeds or len(set(cfg.seeds)) != len(cfg.seeds):
        raise ValueError(f"{say.name('seeds')} must be distinct and at least one: {list(cfg.seeds)}")
    for s in cfg.seeds:
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            raise ValueError(f"{say.name('seeds')}: seed {s!r} must be a whole number >= 0")
    if cfg.order not in _choices(cfg, "order"):
        raise ValueError(f"unknown task order {cfg.order!r}; allowed: {', '.join(_choices(cfg, 'order'))}")
    if cfg.variant not in TEMPLATE_SETS:
        raise ValueError(f"unknown instruction variant {cfg.variant!r}; allowed: {', '.join(TEMPLATE_SETS)}")
    for name in ("n_train", "n_test", "steps", "batch_size", "lora_r", "lora_alpha", "max_length",
                 "eval_batch_size", "stage1_batch_size", "hidden_size", "num_layers", "num_heads", "max_test"):
        _check_positive(name, getattr(cfg, name), say=say)
    _check_positive("stage1_steps", cfg.stage1_steps, 0, say=say)
    s1 = cfg.stage1_seed
    if s1 is not None and (isinstance(s1, bool) or not isinstance(s1, int) or s1 < 0):
        raise ValueError(say("stage1_seed", s1, "must be None (a base per seed) or an int >= 0"))
    _check_positive("warmup_steps", cfg.warmup_steps, 0, say=say)
    if cfg.max_new_tokens is not None:
        _check_positive("max_new_tokens", cfg.max_new_tokens, say=say)
    for name in ("lr", "stage1_lr"):
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v > 0 and math.isfinite(v)):
            raise ValueError(say(name, v, "must be a positive number"))
    if not 0 < cfg.test_fraction < 1:
        raise ValueError(say("test_fraction", cfg.test_fraction, "must be between 0 and 1 (exclusive)"))
    # EMA settings go through DEMAConfig's own validation (the configs the methods will use);
    # its messages name DEMAConfig's fields, which say.dema turns into the run's names.
    for m in (m for m in CUSTOM_METHODS if methods_table.TABLE[m].ema):
        try:
            cfg.ema_config(m)
        except ValueError as exc:
            raise ValueError(say.dema(str(exc))) from None
    _moelora(cfg, methods, say)
    v = cfg.max_grad_norm
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v >= 0 and math.isfinite(v)):
        raise ValueError(say("max_grad_norm", v, "must be a number >= 0 (0: no clipping)"))
    g = cfg.group_threshold
    if g is not None and (isinstance(g, bool) or not isinstance(g, (int, float)) or not 0 <= g <= 1):
        raise ValueError(say("group_threshold", g, "must be a number between 0 and 1"))
    if cfg.bundled:
        _bundled(cfg, )
    else:
        if cfg.test_files and len(cfg.test_files) != len(cfg.task_files):
            raise ValueError(f"{len(cfg.test_files)} test files for {len(cfg.task_files)} task files; "
                             "give one test file per task file, or none")
        if cfg.task_types:
            if len(cfg.task_types) != len(cfg.task_files):
                raise ValueError(f"{len(cfg.task_types)} task types for {len(cfg.task_files)} task files; give one "
                                 f"per task file, in order (types: {', '.join(TASK_TYPES)}), or none to infer them")
            for t in cfg.task_types:
                check_task_type(t)
        if cfg.tasks is not None:
            raise ValueError("bundled task names and task files cannot be mixed")
    _images(cfg, say)
    if cfg.model is not None:
        p = Path(cfg.model)
        if not p.is_dir():
            raise ValueError(f"--model {cfg.model}: not a folder (give a local causal-LM folder "
                             "with config.json, weights and a tokenizer)")
        if not (p / "config.json").is_file():
            raise ValueError(f"--model {cfg.model}: no config.json inside; not a Hugging Face model folder")
        # The tiny model's size would be ignored: the folder's config decides (never silently).
        base = type(cfg)()
        sized = [say.name(f) for f in ("hidden_size", "num_layers") if getattr(cfg, f) != getattr(base, f)]
        if sized:
            raise ValueError(f"{', '.join(sized)} size the tiny model; {say.name('model')} {cfg.model} has its own "
                             f"size (its config.json): drop {', '.join(sized)}")
    _dema_tasks(cfg, methods, say)

def _images(cfg, say: "_Namer") -> None:
    if cfg.multimodal and not cfg.bundled:
        raise ValueError(f"{say.name('multimodal')} draws the bundled tasks' scenes; with task files the "
                         f"{say.name('model')} folder decides: an image-text model (LLaVA-style) reads the "
                         "records' images")
    if cfg.model_family != "llava" and not cfg.multimodal:
        raise ValueError(f"{say.name('model_family')} {cfg.model_family} picks the tiny model of the bundled "
                         f"tasks drawn as pictures: add {say.name('multimodal')} (a {say.name('model')} folder's "
                         "config.json decides its own family)")
    if cfg.image_folder is not None:
        if cfg.bundled:
            raise ValueError(f"{say.name('image_folder')} goes with task files ({say.name('task_files')} FILE "
                             "...): the bundled tasks draw their own images")
        if not Path(cfg.image_folder).is_dir():
            raise ValueError(say("image_folder", cfg.image_folder, "is not a folder"))
    if cfg.train_projector:
        if cfg.model is not None and Path(cfg.model, "config.json").is_file() \
                and not is_image_text_folder(cfg.model):
            raise ValueError(f"{say.name('train_projector')}: {say.name('model')} {cfg.model} is a text model; "
                             "the projector is an image-text model's (LLaVA's mm_projector)")
        if cfg.model is None and not cfg.multimodal:
            raise ValueError(f"{say.name('train_projector')} needs an image-text model: the bundled tasks with "
                             f"{say.name('multimodal')}, or {say.name('model')} DIR of a LLaVA-style model")
        if "moelora" in (cfg.methods or ()):
            # MoELoRASet trains and saves its experts and routers only: a trained projector
            # would be lost at the save and at a resume, so refuse rather than drop it.
            raise ValueError(f"{say.name('train_projector')} cannot be combined with the moelora method (it "
                             "trains and saves LoRA experts and routers only); run moelora without "
                             f"{say.name('train_projector')}, or the other methods with it")

def _device(cfg, say: "_Namer") -> None:
    import torch

    if cfg.device not in _choices(cfg, "device"):
        raise ValueError(say("device", cfg.device, f"must be one of {', '.join(_choices(cfg, 'device'))}"))
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{say.name('device')} cuda: torch sees no CUDA device (torch "
                         f"{torch.__version__}{'' if torch.version.cuda else ', a CPU build'}); "
                         f"use {say.name('device')} cpu, or auto to take a GPU only where there is one")

def _custom_flags(cfg, methods, say: "_Namer") -> None:
    from cl_core.integrations.selection import PARAM_CHOICES

    for name, allowed in (("route", _choices(cfg, "route")), ("new_set_init", _choices(cfg, "new_set_init")),
                          ("dema_params", PARAM_CHOICES)):
        if getattr(cfg, name) not in allowed:
            raise ValueError(say(name, getattr(cfg, name), f"is not known; allowed: {', '.join(allowed)}"))
    base = type(cfg)(recipe=cfg.recipe, methods=cfg.methods)
    changed = [say.name(f) for f in CUSTOM_SETTINGS if getattr(cfg, f) != getattr(base, f)]
    custom = [m for m in methods if m in CUSTOM_METHODS]
    # A recipe's custom methods take the recipe's settings: a flag for them would be ignored
    # (the recipes have no fixed-EMA beta: method ema keeps its own).
    fixed = [say.name(f) for f in CUSTOM_SETTINGS if f != "ema_beta" and getattr(cfg, f) != getattr(base, f)]
    if custom and cfg.recipe in RECIPE_METHODS and fixed:
        raise ValueError(f"{', '.join(fixed)} set with {say.name('recipe')} {cfg.recipe}, which runs "
                         f"{', '.join(custom)} with the {cfg.recipe} settings: drop {', '.join(fixed)}, or drop "
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

# Why a baseline is not offered with an EMA (docs/runner.md, "The paper's baselines").
_NOT_WITH_EMA = {
    "olora": "O-LoRA trains a new set every task and never re-trains one, so an EMA that starts when a set is "
             "re-trained would never run; from task 2 on a fresh set it would average away from the new set's init",
    "ewc": "not offered yet: the EMA replaces the weights at the task's end, and which weights EWC anchors and "
           "estimates its Fisher at (the EMA's or the trained ones) is a choice no paper's row makes",
    "lwf": "not offered yet: LwF's earlier model would be the previous task's EMA weights, a choice no paper's "
           "row makes",
    "replay": "not offered yet: no paper's row runs replay with an EMA",
}


def _refuse_combination(name: str) -> None:
    """ValueError saying why ``<baseline>+<ema method>`` (``ewc+dema``) is not a method."""
    parts = name.split("+")
    base = next((p for p in parts if p in _NOT_WITH_EMA), None)
    if base is not None and len(parts) > 1:
        raise ValueError(f"method {name!r}: {base} does not combine with an EMA ({_NOT_WITH_EMA[base]}); run "
                         f"{base} and the EMA methods side by side instead (--methods {base} dema)")


def _baselines(cfg, methods, say: "_Namer") -> None:
    """The baselines' settings: in range, and set only when their method runs."""
    default = type(cfg)()
    for m in (t for t in methods_table.TABLE.values() if t.hooks is not None):
        changed = [say.name(f) for f in m.reads if getattr(cfg, f) != getattr(default, f)]
        if changed and m.name not in methods:
            raise ValueError(f"{', '.join(changed)} set, but method {m.name} does not run ({', '.join(methods)}): "
                             f"add {m.name} to the methods, or drop {', '.join(changed)}")
    if cfg.replay_sampling not in _choices(cfg, "replay_sampling"):
        raise ValueError(say("replay_sampling", cfg.replay_sampling,
                             f"is not known; allowed: {', '.join(_choices(cfg, 'replay_sampling'))}"))
    _check_positive("replay_size", cfg.replay_size, say=say)
    _check_positive("ewc_samples", cfg.ewc_samples, say=say)
    for name, low, high, what in (("replay_ratio", 0, 1, "between 0 and 1 (exclusive of 1)"),
                                  ("ewc_decay", 0, 1, "between 0 and 1"),
                                  ("ewc_lambda", 0, math.inf, "a number >= 0"),
                                  ("lwf_weight", 0, math.inf, "a number >= 0"),
                                  ("olora_lambda1", 0, math.inf, "a number >= 0"),
                                  ("olora_lambda2", 0, math.inf, "a number >= 0")):
        v = getattr(cfg, name)
        ok = not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v) and low <= v <= high
        if not ok or (name == "replay_ratio" and v >= 1):
            raise ValueError(say(name, v, f"must be {what}"))
    t = cfg.lwf_temperature
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not (t > 0 and math.isfinite(t)):
        raise ValueError(say("lwf_temperature", t, "must be a positive number"))
    if "replay" in methods and cfg.replay_ratio > 0 and round(cfg.replay_ratio * cfg.batch_size) == 0:
        raise ValueError(say("replay_ratio", cfg.replay_ratio, f"gives no buffer record in a batch of "
                             f"{cfg.batch_size} (round({cfg.replay_ratio} × {cfg.batch_size}) = 0): give at least "
                             f"{0.5 / cfg.batch_size:.3g}, or a larger {say.name('batch_size')}"))
    if cfg.replay_per_task is not None:
        _check_positive("replay_per_task", cfg.replay_per_task, say=say)
        if cfg.replay_sampling != "per-task":
            raise ValueError(f"{say.name('replay_per_task')} keeps N records of each task, which "
                             f"{say.name('replay_sampling')} {cfg.replay_sampling} does not: drop one of them")
    if "olora" in methods and cfg.train_projector:
        raise ValueError(f"method olora with {say.name('train_projector')}: O-LoRA sums its LoRA sets, but PEFT keeps "
                         "one trainable projector copy per set and uses one at a time; drop "
                         f"{say.name('train_projector')} for olora (run it in a run of its own)")
    if "replay" in methods and cfg.replay_sampling == "per-task" and cfg.replay_per_task is None \
            and cfg.replay_size < cfg.num_tasks() - 1:
        raise ValueError(say("replay_size", cfg.replay_size, f"leaves no record per task with per-task sampling "
                             f"over {cfg.num_tasks()} tasks: give at least {cfg.num_tasks() - 1}"))


def _moelora(cfg, methods, say: "_Namer") -> None:
    if "moelora" in methods:
        try:
            cfg.moelora_config()
        except ValueError as exc:
            raise ValueError(say.rename(str(exc), "MoELoRAConfig", _MOELORA_FIELDS)) from None
        return
    own = methods_table.TABLE["moelora"].reads
    changed = [say.name(f) for f in own if getattr(cfg, f) != getattr(type(cfg)(), f)]
    if changed:
        raise ValueError(f"{', '.join(changed)} set, but method moelora does not run ({', '.join(methods)}): "
                         f"add moelora to the methods, or drop {', '.join(changed)}")

def _dema_tasks(cfg, methods, say: "_Namer") -> None:
    if cfg.dema_tasks is None:
        return
    n = cfg.num_tasks()
    flag = say.name("dema_tasks")
    shown = ",".join(str(t) for t in cfg.dema_tasks)
    for t in cfg.dema_tasks:
        if isinstance(t, bool) or not isinstance(t, int) or not 1 <= t <= n:
            raise ValueError(f"{flag} {shown}: task number {t!r} is not between 1 and {n} (the run has {n} "
                             "tasks; numbers are 1-based, e.g. 4,5,7,8 for CoIN's scripts)")
    if len(set(cfg.dema_tasks)) != len(cfg.dema_tasks):
        raise ValueError(f"{flag} {shown}: a task number is listed twice")
    if not any(cfg.plan(m).ema is not None for m in methods):
        raise ValueError(f"{flag} set, but no method of the run has an EMA ({', '.join(methods)}): add one "
                         "(e.g. lcia), or drop the setting")

def _bundled(cfg) -> None:
    if cfg.test_files or cfg.task_types:
        raise ValueError("test files and task types go with task files (--tasks FILE ...)")
    if cfg.tasks is not None:
        if not cfg.tasks:
            raise ValueError("the task list is empty")
        for t in cfg.tasks:
            if t not in TASK_NAMES:
                raise ValueError(f"unknown bundled task {t!r}; the bundled tasks are: {', '.join(TASK_NAMES)}")
        if len(set(cfg.tasks)) != len(cfg.tasks):
            raise ValueError(f"a task is listed twice: {list(cfg.tasks)}")


def _choices(cfg, name: str) -> tuple:
    """The values setting ``name`` allows, as its RunConfig field declares them."""
    return next(f for f in dataclasses.fields(cfg) if f.name == name).metadata["cli"]["choices"]


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
