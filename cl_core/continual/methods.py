"""The runner's methods and recipes: one table (``TABLE``), the only place a method is defined.
The CLI (choices, help), the run settings' validation, the launcher (DEMA precision), the
report (comparisons, the settings sentence) and ``RunConfig.plan`` read it.

    TABLE["dema+group"].grouping        # True
    plan(cfg, "lcia")                   # MethodPlan: how the method trains under a RunConfig

Kinds. ``custom`` methods take the run's flags (``CUSTOM_SETTINGS``: routing, new-set start,
clipping, averaged tensors, EMA/DEMA constants); under ``--recipe lcia`` / ``cl-next`` they take
that recipe's settings instead. A ``recipe`` fixes every setting (and is a ``--recipe`` value);
an ``own`` method fixes its own settings without being a recipe (moelora). A method's ``reads``
are the run settings it reads: set while no method of the run reads it, a setting is refused.

``RunConfig(recipe="lcia", methods=("dema+group",))`` runs a custom method with a recipe's
settings (routing, new-set start, averaged tensors, clipping, DEMA scale and fallback).

Adding a method is one ``Method`` entry here plus its own module. A method that needs its own
loss term or its own data (issue 32: replay, EWC, LwF, O-LoRA) names that module in ``hooks``
(``"cl_core.continual.baselines.<name>"``): the runner makes one ``Hook`` of it per chain and
calls it around each task (cl_core.continual.baselines: the data, loss and state hooks).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from cl_core.dema.config import DEMAConfig

# The run settings (RunConfig fields) the custom methods read; a recipe fixes them.
CUSTOM_SETTINGS = ("route", "new_set_init", "max_grad_norm", "dema_params", "dema_formula", "dema_scale",
                   "dema_fallback", "ema_beta")
# The method every other one is added to (the report's "plain sequential LoRA forgets ...").
BASELINE = "lora"


@dataclass(frozen=True)
class MethodPlan:
    """How one method trains and evaluates under a run's settings (:func:`plan`)."""

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


@dataclass(frozen=True)
class Method:
    """One method of the runner. ``fixed``: the plan of a recipe / own method (its settings do
    not depend on the run's flags); a custom method's plan is built from the flags and ``ema``."""

    name: str
    kind: str                                # custom | recipe | own (module docstring)
    trains: str                              # what it trains, in words (the report's sentence)
    ema: Optional[str] = None                # custom: None | "fixed" (β) | "dema" (the DEMA flags)
    formula: Optional[str] = None            # custom "dema": this DEMA formula whatever --dema-formula says
    grouping: bool = False                   # custom: instruction grouping (one LoRA set per group)
    fixed: Optional[MethodPlan] = None       # recipe / own: the plan, whatever the flags
    official_precision: bool = False         # under DeepSpeed ZeRO-0 bf16: average the bf16 weights with a
                                             #   bf16 EMA, as the official code (DEMACallback precision)
    compare_with: tuple = ()                 # the report's comparisons: this method against each of these
    reads: tuple = ()                        # run settings this method reads (beside the shared ones)
    hooks: Optional[str] = None              # module of the method's own loss term / data hook (issue 32)

    @property
    def adapter(self) -> str:
        return self.fixed.adapter if self.fixed is not None else "lora"


_TABLE = (
    Method("lora", "custom", "trains one LoRA set, task after task", reads=CUSTOM_SETTINGS),
    Method("ema", "custom", "adds a fixed-β EMA from task 2", ema="fixed", compare_with=("lora",),
           reads=CUSTOM_SETTINGS),
    Method("dema", "custom", "adds DEMA from task 2", ema="dema", compare_with=("lora", "ema"),
           reads=CUSTOM_SETTINGS),
    # The paper's formula (d_t measured each step) where the official code has the constant scale: d_t
    # cancels the tensor size, so α lands inside (0, 1) at the demo's sizes (docs/regime.md).
    Method("dema-paper", "custom", "is `dema` with the paper's formula (d_t measured each step, not the official "
           "constant)", ema="dema", formula="paper", compare_with=("dema",), reads=CUSTOM_SETTINGS),
    Method("group", "custom", "is instruction grouping without any EMA (beside `dema+group` to separate the two effects)", grouping=True,
           compare_with=("lora",), reads=CUSTOM_SETTINGS),
    Method("dema+group", "custom", "adds DEMA to grouping when a task re-trains a set", ema="dema",
           grouping=True, compare_with=("group", "dema"), reads=CUSTOM_SETTINGS),
    # The official LCIA recipe (JingyangQiao/CoIN): a new set starts from the last trained set with DEMA
    # off, a re-trained set continues with DEMA on; every trainable tensor averaged; no clipping
    # (DeepSpeed's default 0); one routing decision per test file; scale 2.0, fallback 0.01.
    Method("lcia", "recipe", "is the official LCIA recipe", official_precision=True, compare_with=("group",),
           fixed=MethodPlan(grouping=True, ema=DEMAConfig(formula="official", scale=2.0, fallback=0.01),
                            new_set_init="latest", params="trainable", max_grad_norm=0.0, route="file")),
    # Continual-NExT: one LoRA set, DEMA from task 2, scale 0.01, fallback 0.001, every trainable
    # tensor averaged, the trainer's default clipping (1.0).
    Method("cl-next", "recipe", "is Continual-NExT's", compare_with=("dema",),
           fixed=MethodPlan(grouping=False, ema=DEMAConfig(formula="official", scale=0.01, fallback=0.001),
                            new_set_init="fresh", params="trainable", max_grad_norm=1.0, route="instance")),
    # CoIN's MoELoRA (cl_core.moelora): one MoELoRA set (experts + a softmax router per layer), no
    # EMA, no grouping, the trainer's default clipping (CoIN's "gradient_clipping": "auto").
    Method("moelora", "own", "is CoIN's MoELoRA (LoRA experts and a learned router per layer, one set, no EMA)",
           compare_with=("lora",), reads=("moe_experts", "moe_top_k"),
           fixed=MethodPlan(grouping=False, ema=None, new_set_init="fresh", params="lora", max_grad_norm=1.0,
                            route="instance", adapter="moelora")),
)
# The paper's baselines (issue 32; cl_core.continual.baselines): one LoRA set (olora: one per task),
# no EMA, the trainer's default clipping; each adds its own loss term or data.
_ONE_SET = MethodPlan(grouping=False, ema=None, new_set_init="fresh", params="lora", max_grad_norm=1.0,
                      route="instance")
_BASELINES = (
    Method("replay", "own", "mixes a buffer of earlier tasks' records into each later task's batches",
           compare_with=("lora",), reads=("replay_size", "replay_per_task", "replay_sampling", "replay_ratio"), fixed=_ONE_SET,
           hooks="cl_core.continual.baselines.replay"),
    Method("ewc", "own", "adds EWC's Fisher-weighted penalty on the LoRA tensors (online EWC)",
           compare_with=("lora",), reads=("ewc_lambda", "ewc_samples", "ewc_decay"), fixed=_ONE_SET,
           hooks="cl_core.continual.baselines.ewc"),
    Method("lwf", "own", "adds LwF's distillation from the model before the task",
           compare_with=("lora",), reads=("lwf_temperature", "lwf_weight"), fixed=_ONE_SET,
           hooks="cl_core.continual.baselines.lwf"),
    Method("olora", "own", "is O-LoRA (a new LoRA set per task, orthogonal to the frozen earlier ones; "
           "inference sums them)", compare_with=("lora",), reads=("olora_lambda1", "olora_lambda2"),
           fixed=_ONE_SET, hooks="cl_core.continual.baselines.olora"),
)
_TABLE = _TABLE + _BASELINES
TABLE = {m.name: m for m in _TABLE}
# The LCIA paper's Table 1 rows that exist here, in its order (``--compare paper``).
PAPER_ROWS = ("lora", "moelora", "lwf", "ewc", "replay", "olora", "lcia")

METHODS = tuple(TABLE)
CUSTOM_METHODS = tuple(m.name for m in _TABLE if m.kind == "custom")
RECIPE_METHODS = tuple(m.name for m in _TABLE if m.kind == "recipe")
OWN_METHODS = tuple(m.name for m in _TABLE if m.kind == "own")
RECIPES = ("custom",) + RECIPE_METHODS
# The report's comparisons, in table order: each method against what it is added to.
COMPARISONS = tuple((m.name, other) for m in _TABLE for other in m.compare_with)


def method(name: str) -> Method:
    """The table entry of ``name`` (ValueError naming the allowed methods)."""
    if name not in TABLE:
        raise ValueError(f"unknown method {name!r}; allowed: {', '.join(METHODS)}")
    return TABLE[name]


def method_slug(name: str) -> str:
    """The method's name as a file or folder name (``dema+group`` -> ``dema_group``)."""
    return name.replace("+", "_")


def plan(cfg, name: str) -> MethodPlan:
    """How method ``name`` trains and evaluates under the RunConfig ``cfg``. A custom method
    under a recipe (``recipe="lcia"``) takes the recipe's settings (its fixed EMA keeps β)."""
    m = method(name)
    if m.fixed is not None:
        return m.fixed
    recipe = TABLE[cfg.recipe].fixed if cfg.recipe in RECIPE_METHODS else None
    ema = None
    if m.ema == "fixed":
        ema = DEMAConfig(formula="fixed", beta=cfg.ema_beta)
    elif m.ema == "dema":
        ema = (recipe.ema if recipe is not None else
               DEMAConfig(formula=cfg.dema_formula, scale=cfg.dema_scale, fallback=cfg.dema_fallback))
        if m.formula is not None:
            ema = dataclasses.replace(ema, formula=m.formula)
    src = recipe
    return MethodPlan(grouping=m.grouping, ema=ema,
                      new_set_init=src.new_set_init if src else cfg.new_set_init,
                      params=src.params if src else cfg.dema_params,
                      max_grad_norm=float(src.max_grad_norm if src else cfg.max_grad_norm),
                      route=src.route if src else cfg.route)


def dema_precision(name: str, zero_stage: Optional[int], bf16: bool) -> str:
    """DEMACallback(precision=...) of method ``name`` under a launch: "official" (the official
    run's bf16 weights and gradients, a bf16 EMA) for a method that averages as the official
    code did, where that code averaged (DeepSpeed ZeRO-0 with bf16); "fp32" everywhere else."""
    if method(name).official_precision and zero_stage == 0 and bf16:
        return "official"
    return "fp32"
