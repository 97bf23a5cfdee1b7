"""How a trainer callback attaches DEMA to the trainer's optimizer, written once for every
integration (the Hugging Face and the Lightning callbacks): the callbacks' shared arguments,
the one engine choice (the user's DEMAOptimizer, else a DEMAOptimizer wrapped around the
trainer's AdamW/Adam/SGD for the one-pass step, else a refusal under ``fused=True``, else a
separate DEMA pass after each optimizer step), the first-step gradient check, ``swap`` and
the EMA adapter export. A new trainer integration finds its optimizer and its parameters
and calls :func:`choose_engine`; everything else here is the same for all.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from cl_core.dema.config import DEMAConfig
from cl_core.dema.engine import DEMA
from cl_core.dema.onepass.step import optimizer_kind
from cl_core.dema.optim import DEMAOptimizer, check_fused_arg

logger = logging.getLogger(__name__)

# One default for both callbacks: evaluate the live weights unless asked. The Trainer has
# no "evaluation begins" event, so the HF callback swaps the EMA in at the first eval-mode
# forward; switched on by default it would also swap for eval-mode forwards that happen
# inside a training step (generation in RL trainers) and train the EMA instead of the live
# weights. Evaluation on the EMA stays one argument away (eval_with_ema=True).
EVAL_WITH_EMA_DEFAULT = False

# DEMACallback(precision=...) under DeepSpeed: "fp32" (DeepSpeed's fp32 masters and gradients,
# the default) or "official" (the official LCIA run's bf16 weights and gradients at ZeRO-0;
# cl_core.integrations.deepspeed, docs/fidelity.md).
PRECISIONS = ("fp32", "official")

__all__ = ["EVAL_WITH_EMA_DEFAULT", "PRECISIONS", "Attached", "check_config_arg", "check_fused_arg",
           "check_first_step_gradients", "choose_engine", "deepspeed_optimizer", "save_ema_adapter", "swap",
           "why_not_fusable"]


# --------------------------------------------------------------------------- arguments


def check_config_arg(config, who: str = "DEMACallback") -> None:
    if config is not None and not isinstance(config, DEMAConfig):
        raise TypeError(f"{who}(config=...) takes a cl_core.DEMAConfig, got {type(config).__name__}")


# --------------------------------------------------------------------------- one pass or two


def why_not_fusable(optimizer, named, *, fused_arg="auto", sharded: bool = False, hint: str = "") -> str | None:
    """Why a DEMAOptimizer cannot be wrapped around the trainer's ``optimizer`` for the one-pass
    step over the averaged tensors ``named``, or None when it can.

    Which optimizer types have a one-pass kernel is the engine's answer
    (``cl_core.dema.onepass.step.optimizer_kind``); what is checked here is what a trainer adds: the
    optimizer updates exactly the averaged tensors (a DEMAOptimizer averages every tensor it
    updates) and they are not shards. The settings of the optimizer (amsgrad, tensor lr, ...)
    are the DEMAOptimizer's to judge when it is built.
    """
    if fused_arg is False:
        return "fused=False"
    if sharded:
        return "the parameters are sharded (FSDP)"
    if optimizer_kind(optimizer) is None:
        return f"the optimizer is a {type(optimizer).__name__}, which has no one-pass kernel{hint}"
    selected = {id(p) for _, p in named}
    trained = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
    extra = [p for p in trained if id(p) not in selected]
    if extra:
        return (f"the optimizer also updates {len(extra)} trainable tensor(s) that are not averaged "
                "(params='trainable' averages them all)")
    trained_ids = {id(p) for p in trained}
    outside = [n for n, p in named if id(p) not in trained_ids]
    if outside:
        return f"{len(outside)} averaged tensor(s) are not updated by the optimizer (e.g. {outside[0]!r})"
    return None


@dataclass
class Attached:
    """What :func:`choose_engine` decided for a callback."""

    engine: DEMA
    stepper: torch.optim.Optimizer   # the optimizer whose steps drive the EMA
    owns_update: bool                # True: the callback runs engine.update() after each step (two passes)
    fused: bool                      # the optimizer step runs optimizer + DEMA in one pass
    not_fused_reason: Optional[str]
    names: list = field(default_factory=list)   # the engine's tensors, named as the callback's model names them


def choose_engine(named, optimizer, config: DEMAConfig, *, fused_arg, install: Callable, canonical: dict,
                  user: Optional[DEMAOptimizer] = None, owner: str = "the Trainer's", who: str = "DEMACallback",
                  sharded: bool = False, reduce_stats=None, hint: str = "") -> Attached:
    """The one engine choice of every trainer callback, for the averaged tensors ``named``
    ((name, parameter) pairs) and the torch ``optimizer`` that updates them:

    1. ``user``, the user's own DEMAOptimizer (found by the callback): its engine, updated by
       its step (one engine per tensor, never two);
    2. ``optimizer`` can run the one-pass step (:func:`why_not_fusable`): a DEMAOptimizer
       wrapped around it, handed to ``install(wrapper)`` (which puts it where the trainer
       steps it), and its engine;
    3. ``fused_arg is True``: refused, saying why;
    4. else a :class:`cl_core.DEMA` over ``named`` that the callback updates after each step,
       with one log line saying why it is not one pass.

    ``canonical`` maps ``id(parameter)`` to the name the callback's model gives it.
    """
    def names_of(engine):
        return [canonical.get(id(p), n) for p, n in zip(engine.params, engine.names)]

    if user is not None:
        reason = None if user.fused else f"{owner} DEMAOptimizer takes its two-pass path (its log line says why)"
        if reason is not None:
            logger.info("%s: not one pass: %s", who, reason)
        return Attached(user.engine, user, owns_update=False, fused=user.fused, not_fused_reason=reason,
                        names=names_of(user.engine))
    reason = why_not_fusable(optimizer, named, fused_arg=fused_arg, sharded=sharded, hint=hint)
    if reason is None:
        wrapper = DEMAOptimizer(optimizer, config, fused=fused_arg, reduce_stats=None)
        if wrapper.fused:
            install(wrapper)
            return Attached(wrapper.engine, wrapper, owns_update=False, fused=True, not_fused_reason=None,
                            names=names_of(wrapper.engine))
        reason = "the fused kernel does not cover this optimizer's settings (DEMAOptimizer's log line says why)"
    if fused_arg is True:
        raise ValueError(f"{who}(fused=True): no one-pass step possible: {reason}")
    logger.info("%s: not one pass (optimizer step, then a separate DEMA pass): %s", who, reason)
    engine = DEMA([p for _, p in named], config, names=[n for n, _ in named], reduce_stats=reduce_stats)
    return Attached(engine, optimizer, owns_update=True, fused=False, not_fused_reason=reason,
                    names=[n for n, _ in named])


def deepspeed_optimizer(optimizer):
    """The DeepSpeed optimizer behind the Trainer's optimizer (accelerate's
    ``DeepSpeedOptimizerWrapper``), or None when the Trainer does not run DeepSpeed. Known by
    its class name, so a run without DeepSpeed installed never imports it."""
    if optimizer is None or type(optimizer).__name__ != "DeepSpeedOptimizerWrapper":
        return None
    return optimizer.optimizer


# --------------------------------------------------------------------------- the first step


def check_first_step_gradients(engine, names, seen: bool, who: str = "DEMACallback", hint: str = "") -> None:
    """At the first optimizer step some averaged tensor must have a gradient (``seen``):
    refuse rather than let DEMA degrade into a fixed EMA at the fallback α."""
    if seen:
        return
    example = f", e.g. {names[0]!r}" if names else ""
    raise RuntimeError(f"{who}: at the first optimizer step no averaged tensor has a gradient "
                       f"({len(engine.params)} tensors{example}), so DEMA cannot compute its α{hint}")


# --------------------------------------------------------------------------- the EMA, read


def swap(engine, who: str = "DEMACallback"):
    """``with callback.swap(): ...``: the EMA weights live inside, the live ones after."""
    if engine is None:
        raise RuntimeError(f"{who}.swap: training has not begun (no engine yet)")
    return engine.swap()


def save_ema_adapter(engine, model, out_dir: str, adapter_name: str | None = None, *, who: str = "DEMACallback",
                     gather_group=None) -> str:
    """Write the EMA of ``model``'s PEFT adapter as an adapter folder (cl_core.integrations.peft;
    needs peft: ``pip install ".[hf]"``). ``gather_group``: the process group over which
    the EMA is partitioned (DeepSpeed ZeRO-1/2/3 across ranks); every rank of it must call
    this, the partitions are gathered once, the main rank writes and the others wait."""
    if engine is None or model is None:
        raise RuntimeError(f"{who}.save_ema_adapter: training has not begun (no engine yet)")
    from cl_core.integrations.peft import save_ema_adapter as export

    if gather_group is None:
        return export(model, engine, out_dir, adapter_name)
    from cl_core.dema import distributed as cl_dist

    out = export(model, engine, out_dir, adapter_name, write=cl_dist.rank() == 0)
    cl_dist._dist().barrier(group=gather_group)
    return out
