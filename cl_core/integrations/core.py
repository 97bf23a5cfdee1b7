"""What every trainer integration of DEMA shares, defined once: which tensors to average,
whether the trainer's optimizer can run the one-pass optimizer+DEMA step, the first-step
gradient check, the numbers that go into the training logs, and the callback state file.

`cl_core.integrations.hf` (transformers Trainer, TRL, accelerate) and
`cl_core.integrations.lightning` build on these, so the two callbacks select, refuse and log
alike. Needs torch only: PEFT models are recognised when peft is installed (without peft
there are no tuner layers, hence no PEFT model) and nothing here imports a trainer library.
"""
from __future__ import annotations

import logging
import os
from typing import Iterable

import torch

from cl_core.dema.onepass.step import optimizer_kind
from cl_core.dema.state import is_at_fallback

logger = logging.getLogger(__name__)

# What `params=` takes in both callbacks (a callable too: f(model) -> (name, parameter) pairs).
PARAM_CHOICES = ("lora", "trainable")

# One default for both callbacks: evaluate the live weights unless asked. The Trainer has
# no "evaluation begins" event, so the HF callback swaps the EMA in at the first eval-mode
# forward; switched on by default it would also swap for eval-mode forwards that happen
# inside a training step (generation in RL trainers) and train the EMA instead of the live
# weights. Evaluation on the EMA stays one argument away (eval_with_ema=True).
EVAL_WITH_EMA_DEFAULT = False


# --------------------------------------------------------------------------- arguments


def check_params_arg(params, who: str = "DEMACallback") -> None:
    """Refuse a ``params=`` argument neither callback understands, naming what was written."""
    if not callable(params) and params not in PARAM_CHOICES:
        raise ValueError(f"{who}(params={params!r}): use 'lora' (the adapter tensors of the active adapter), "
                         "'trainable' (every trainable tensor, e.g. LLaVA's projector too, as the official LCIA "
                         "code averages) or a callable returning (name, parameter) pairs")


def check_fused_arg(fused, who: str = "DEMACallback") -> None:
    if fused not in ("auto", True, False):
        raise ValueError(f"{who}(fused={fused!r}): use 'auto', True or False")


# DEMACallback(precision=...) under DeepSpeed: "fp32" (DeepSpeed's fp32 masters and gradients,
# the default) or "official" (the official LCIA run's bf16 weights and gradients at ZeRO-0;
# cl_core.integrations.deepspeed, docs/fidelity.md).
PRECISIONS = ("fp32", "official")


def check_config_arg(config, who: str = "DEMACallback") -> None:
    from cl_core.dema.config import DEMAConfig

    if config is not None and not isinstance(config, DEMAConfig):
        raise TypeError(f"{who}(config=...) takes a cl_core.DEMAConfig, got {type(config).__name__}")


# --------------------------------------------------------------------------- PEFT models


def _tuner_layer_cls():
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except Exception:  # peft missing or broken: no tuner layers can exist
        return None
    return BaseTunerLayer


def unwrap_model(model):
    """Strip DDP / DataParallel / torch.compile wrappers (FSDP is kept: its params are the real ones)."""
    while True:
        if hasattr(model, "_orig_mod") and isinstance(getattr(model, "_orig_mod"), torch.nn.Module):
            model = model._orig_mod
        elif isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            model = model.module
        else:
            return model


def tuner_layers(model) -> list:
    """(name, module) of every PEFT tuner layer (LoraLayer and friends) in ``model``."""
    cls = _tuner_layer_cls()
    if cls is None:
        return []
    return [(n, m) for n, m in model.named_modules() if isinstance(m, cls)]


def is_peft_model(model) -> bool:
    """True for a ``peft.PeftModel`` and for a transformers model with adapters added."""
    return hasattr(model, "peft_config") and bool(tuner_layers(model))


def active_adapter_names(model) -> list[str]:
    """Active adapter names, in first-seen order over the tuner layers."""
    names: list[str] = []
    for _, layer in tuner_layers(model):
        active = layer.active_adapters
        if isinstance(active, str):
            active = [active]
        for a in active:
            if a not in names:
                names.append(a)
    return names


def adapter_named_parameters(model, adapter_name: str | Iterable[str] | None = None, *,
                             trainable_only: bool = True) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) of the adapter tensors of ``adapter_name`` (default: the active adapters).

    Names are the full ``model.named_parameters()`` names; the order is the module order,
    so it is the same on every rank and on every run.
    """
    if adapter_name is None:
        adapters = active_adapter_names(model)
    elif isinstance(adapter_name, str):
        adapters = [adapter_name]
    else:
        adapters = list(adapter_name)
    wanted = set()
    for _, layer in tuner_layers(model):
        for attr in getattr(layer, "adapter_layer_names", ()):
            container = getattr(layer, attr, None)
            if container is None:
                continue
            for a in adapters:
                if a not in container:
                    continue
                item = container[a]
                if isinstance(item, torch.nn.Parameter):
                    wanted.add(id(item))
                elif isinstance(item, torch.nn.Module):
                    for p in item.parameters():
                        wanted.add(id(p))
    out, seen = [], set()
    # named_parameters gives canonical names (and de-duplicates tied tensors)
    for name, p in model.named_parameters():
        if id(p) in wanted and id(p) not in seen and (p.requires_grad or not trainable_only):
            seen.add(id(p))
            out.append((name, p))
    return out


def select_dema_parameters(model) -> list[tuple[str, torch.nn.Parameter]]:
    """What DEMA averages for ``model``: the trainable adapter tensors of the active adapter
    of a PEFT model, else every parameter with ``requires_grad``.

    Raises ``ValueError`` when that is nothing.
    """
    model = unwrap_model(model)
    if is_peft_model(model):
        active = active_adapter_names(model)
        named = adapter_named_parameters(model, active)
        if not named:
            raise ValueError(
                f"DEMA: the PEFT model has no trainable adapter parameters for its active adapter(s) "
                f"{active}; make the adapter trainable (e.g. set_adapter(name) / is_trainable=True) "
                "before training with DEMA")
        return named
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError(
            f"DEMA: {type(model).__name__} has no trainable parameters (every parameter has "
            "requires_grad=False), so there is nothing to average; add a LoRA adapter or unfreeze "
            "the parameters to train")
    return named


def outer_peft_models(module) -> list[tuple[str, torch.nn.Module]]:
    """(name prefix, model) of the outermost PEFT models inside ``module`` (itself included)."""
    found = []
    for name, m in module.named_modules():
        if any(p == "" or name == p or name.startswith(p + ".") for p, _ in found):
            continue                                  # inside a PEFT model already found
        if hasattr(m, "peft_config") and is_peft_model(m):
            found.append((name, m))
    return [(f"{name}." if name else "", m) for name, m in found]


def select_parameters(module, params="lora", who: str = "DEMACallback") -> list[tuple[str, torch.nn.Parameter]]:
    """The (name, parameter) pairs a trainer callback averages, named as ``module`` names them.

    ``"lora"``: the trainable tensors of the active adapter of every (outermost) PEFT model in
    ``module`` (``module`` itself when it is one), or every trainable parameter when there is
    no PEFT model; ``"trainable"``: every parameter with ``requires_grad``; a callable:
    ``params(module)`` returning parameters or (name, parameter) pairs.
    """
    check_params_arg(params, who)
    canonical = {}
    for n, p in module.named_parameters():
        canonical.setdefault(id(p), n)
    if callable(params):
        named = []
        for item in params(module):
            if isinstance(item, torch.Tensor):
                item = (canonical.get(id(item), f"param_{len(named)}"), item)
            if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], torch.Tensor)):
                raise TypeError(f"{who}(params=callable): the callable must return parameters or "
                                f"(name, parameter) pairs, got {type(item).__name__}")
            named.append(item)
        what = "tensors to average (the params= callable returned none)"
    elif params == "trainable":
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        what = "trainable parameters (every parameter has requires_grad=False)"
    else:
        peft_models = outer_peft_models(module)
        named = []
        for prefix, model in peft_models:
            named += [(canonical.get(id(p), prefix + n), p) for n, p in select_dema_parameters(model)]
        if not peft_models:
            logger.info("%s(params='lora'): %s holds no PEFT model; averaging every trainable parameter",
                         who, type(module).__name__)
            named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        what = ("LoRA tensors of the active adapter" if peft_models
                else "trainable parameters (every parameter has requires_grad=False)")
    if not named:
        raise ValueError(f"{who}(params={params!r}): {type(module).__name__} has no {what}, so there is nothing "
                         "to average; add a LoRA adapter or unfreeze the parameters to train")
    if len({id(p) for _, p in named}) != len(named):
        raise ValueError(f"{who}: the selected parameters hold the same tensor twice")
    return named


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


# --------------------------------------------------------------------------- the first step


def check_first_step_gradients(engine, names, seen: bool, who: str = "DEMACallback", hint: str = "") -> None:
    """At the first optimizer step some averaged tensor must have a gradient (``seen``):
    refuse rather than let DEMA degrade into a fixed EMA at the fallback α."""
    if seen:
        return
    example = f", e.g. {names[0]!r}" if names else ""
    raise RuntimeError(f"{who}: at the first optimizer step no averaged tensor has a gradient "
                       f"({len(engine.params)} tensors{example}), so DEMA cannot compute its α{hint}")


# --------------------------------------------------------------------------- logged numbers


class LogWindow:
    """The α of every update since the last log line, summed on the device (no host sync per
    step); :meth:`metrics` turns the window and the engine's counters into the logged numbers.

    A tensor counts as "at the fallback" when its α equals the configured fallback exactly
    (as float32, the dtype the engine keeps α in): the engine writes that very value whenever
    the formula leaves (0, 1) or cannot be computed, so equality counts exactly those updates,
    where a tolerance would also count dynamic α that merely lie close to the fallback.
    """

    # A window counts as "in effect a fixed EMA" when at least this share of at least
    # FALLBACK_MIN_UPDATES tensor-updates used the fallback α.
    FALLBACK_SHARE = 0.95
    FALLBACK_MIN_UPDATES = 16

    def __init__(self):
        self.fallback_windows = 0  # logged windows in effect a fixed EMA (dema/fallback_windows)
        self._warned_fallback = False
        self.reset()

    def reset(self) -> None:
        self._sums = None          # device tensor [2]: Σα, number at the fallback
        self.count = 0             # tensor-updates in the window

    def add(self, engine) -> None:
        """One update's α (after the engine's update of this optimizer step)."""
        alpha = engine.stats.alpha.float()
        row = torch.stack([alpha.sum(), is_at_fallback(alpha, engine.config).sum().float()])
        self._sums = row if self._sums is None else self._sums + row
        self.count += alpha.numel()

    def __bool__(self) -> bool:
        return self._sums is not None

    def metrics(self, engine) -> dict:
        """The logged numbers, then a fresh window: ``dema/alpha_mean`` and ``dema/fallback_share``
        over the tensor-updates of the window, and the running counts ``dema/nonfinite_skips``,
        ``dema/missing_grads``, ``dema/skipped_steps``, ``dema/updates``, and ``dema/fallback_windows``
        (windows in which nearly every α sat at the fallback: warned once). One host sync."""
        stats = engine.stats
        skips = stats.nonfinite_skips.sum().float().to(self._sums.device if self._sums is not None else "cpu")
        parts = torch.cat([self._sums, skips.view(1)]) if self._sums is not None else skips.view(1)
        values = parts.tolist()
        n = max(self.count, 1)
        out = {}
        if self._sums is not None:
            out["dema/alpha_mean"] = values[0] / n
            out["dema/fallback_share"] = values[1] / n
        if self._sums is not None:
            self._check_fallback(engine, int(values[1]), self.count)
        out.update({"dema/nonfinite_skips": int(values[-1]), "dema/missing_grads": int(stats.missing_grads.sum()),
                    "dema/skipped_steps": int(stats.skipped_steps), "dema/updates": int(stats.updates),
                    "dema/fallback_windows": self.fallback_windows})
        self.reset()
        return out

    def _check_fallback(self, engine, at_fallback: int, updates: int) -> None:
        """Never degrade silently: a dynamic EMA whose α nearly always sits at the fallback is a
        fixed EMA of β = 1 − fallback. Counted per logged window, said once per run."""
        config = engine.config
        if config.formula == "fixed" or updates < self.FALLBACK_MIN_UPDATES:
            return
        if at_fallback < self.FALLBACK_SHARE * updates:
            return
        self.fallback_windows += 1
        if not self._warned_fallback:
            self._warned_fallback = True
            logger.warning(
                "DEMA is in effect a fixed EMA (beta %.4g): %d of the %d tensor updates since the last log "
                "line used the fallback alpha %.4g, because the formula's alpha fell outside (0, 1) or had "
                "no previous gradient. On small tensors scale*(1+|g|)/(|theta-ema|*|g-g_prev|) is usually "
                ">= 1; try a smaller DEMAConfig(scale=...) (Continual-NExT uses scale=0.01, fallback=0.001), "
                "or use formula='fixed' knowingly. Counted in dema/fallback_windows; said once.",
                1.0 - config.fallback, at_fallback, updates, config.fallback)


# --------------------------------------------------------------------------- state files


def names_mismatch(saved, current, *, current_what: str, saved_what: str) -> str | None:
    """Why a saved DEMA state's tensor names differ from the current ones (None when equal):
    what is missing on each side, or that the order differs. Shared by the trainer callbacks."""
    saved, current = list(saved), list(current)
    if saved == current:
        return None
    lack = [n for n in current if n not in saved]
    extra = [n for n in saved if n not in current]
    detail = []
    if lack:
        detail.append(f"{len(lack)} {current_what} not in it, e.g. {lack[0]!r}")
    if extra:
        detail.append(f"{len(extra)} tensor(s) in it {saved_what}, e.g. {extra[0]!r}")
    if not detail:
        detail.append("the tensors are in a different order")
    return "; ".join(detail)


def atomic_save(obj, path: str) -> str:
    """``torch.save(obj, path)`` through a temporary file + fsync + ``os.replace``."""
    from cl_core.atomic_io import torch_save_atomic

    return str(torch_save_atomic(obj, path))


def load_state_file(path: str):
    """Load a file written by :func:`atomic_save` (tensors to CPU, ``weights_only``).

    A file that cannot be loaded raises ValueError saying which of these it is: empty, cut
    short (torch.save writes a zip archive; a truncated copy has its start but not the
    directory at its end, and torch then reports "[Errno 22] Invalid argument" or a miniz
    error), or not a torch.save file at all."""
    import zipfile

    if not os.path.isfile(path):
        raise FileNotFoundError(f"DEMA state file not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt / foreign file: say which one and what to do
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(4)
        fix = ("copy it again from where it was saved, or delete it to resume with the EMA restarted "
               "from the current weights")
        zip_start = b"PK\x03\x04".startswith(head) if len(head) < 4 else head == b"PK\x03\x04"
        if size == 0:
            why = f"is empty (0 bytes); {fix}"
        elif zip_start and not zipfile.is_zipfile(path):
            why = f"is truncated ({size} bytes, the end of the archive is missing: an interrupted copy or write); {fix}"
        elif not zip_start and not head.startswith(b"\x80"):  # neither zip nor legacy pickle format
            why = f"is not a torch.save file (it starts with {head!r}); point to the dema_state.pt that cl_core wrote"
        else:
            why = f"could not be read ({type(exc).__name__}: {exc})"
        raise ValueError(f"DEMA state file {path} {why}") from exc


def missing_extra(module: str, extra: str, package: str, exc: ImportError) -> ImportError:
    """The ImportError an integration raises when importing its optional ``package`` failed with
    ``exc``: one naming the pip extra when ``package`` itself is missing; ``exc`` unchanged when
    something else is (an installed package whose own dependency is broken must say so, not be
    reported as absent)."""
    missing = getattr(exc, "name", None) or ""
    top = package.split(".")[0]
    if missing and missing.split(".")[0] != top:
        return exc
    return ImportError(f"{module} needs {top}; install it with: pip install cl_core[{extra}] "
                       f"(from a checkout: pip install -e '.[{extra}]')")


def transformers_adapter_support() -> "str | None":
    """None when transformers' own adapter API (``model.load_adapter``, ``PeftAdapterMixin``)
    accepts the installed peft; otherwise one line naming which transformers needs which peft
    and how to fix it. transformers refuses an older peft with a long traceback deep inside
    ``load_adapter``; callers (and tests) ask here first to say it in one line instead."""
    try:
        import peft
        import transformers
        from transformers.integrations import peft as hf_peft
    except ImportError as exc:
        return f"transformers' adapter API needs transformers and peft ({exc}); install them with: pip install cl_core[hf]"
    required = getattr(hf_peft, "MIN_PEFT_VERSION", None)
    if required is None:  # older transformers without a declared floor: nothing to compare
        return None
    from packaging.version import Version
    if Version(peft.__version__) >= Version(str(required)):
        return None
    return (f"transformers {transformers.__version__} needs peft >= {required} for its adapter API, "
            f"peft {peft.__version__} is installed; fix with: pip install 'peft>={required}' "
            f"(or a transformers release that accepts peft {peft.__version__})")
