"""DEMA under DeepSpeed (ZeRO stage 0-3) in the transformers Trainer: where DeepSpeed keeps
the fp32 parameters and the final gradients, and a DEMA engine that reads and writes them.

Used by :class:`cl_core.DEMACallback` when the Trainer runs DeepSpeed
(``TrainingArguments(deepspeed=...)``); needs deepspeed (``pip install ".[deepspeed]"``).
"""
from __future__ import annotations

import contextlib
import logging
import math

import torch

from cl_core.dema.distributed import DEMA_OPTIMIZER_UNDER_DEEPSPEED, StatsReducer, _dist, dist_ready
from cl_core.dema.engine import DEMA
from cl_core.dema.optim import DEMAOptimizer
from cl_core.integrations.attach import PRECISIONS, deepspeed_optimizer
from cl_core.integrations.extras import missing_extra

try:
    import deepspeed  # noqa: F401  (the optimizers read here are DeepSpeed's)
except ImportError as exc:  # an optional extra
    raise missing_extra("cl_core.integrations.deepspeed", "deepspeed", "deepspeed", exc) from exc

__all__ = ["DEMA_OPTIMIZER_UNDER_DEEPSPEED", "PRECISIONS", "DeepSpeedDEMA", "DeepSpeedLink", "attach_deepspeed",
           "deepspeed_optimizer"]

logger = logging.getLogger(__name__)

# What the engine averages under DeepSpeed (DEMACallback(precision=...), PRECISIONS from core):
#   "fp32":     DeepSpeed's fp32 master weights and the fp32 gradients its optimizer steps with
#               (more precise than the published run; every ZeRO stage);
#   "official": what the official LCIA run averaged (DeepSpeed 0.9.5, scripts/zero1.json =
#               ZeRO stage 0, --bf16 True): the engine's bf16 module weights after the step and
#               the bf16 gradients left in p.grad, with a bf16 EMA (DEMAConfig(ema_dtype="param")).

# Under DeepSpeed (the engine LLaVA and CoIN train with) the Trainer never sees a
# gradient: accelerate runs ``engine.step()`` inside ``accelerator.backward``, and the
# step clears every gradient before the Trainer's ``on_optimizer_step``.  What DeepSpeed
# does keep, and where:
#
# * the optimizer's own parameters (θ, fp32): with ZeRO-1/2 (and DeepSpeed's bf16
#   optimizer) a flat fp32 partition per rank; with ZeRO-3 a flat fp32 partition per
#   sub-group; with ZeRO-0 the fp32 master copies (bf16) or the model parameters (fp32).
#   Each DEMA tensor is a fragment (a slice, possibly empty) of one of those, on each rank.
# * the final gradient (reduced across ranks, unscaled and clipped): the ``.grad`` of those
#   same tensors, only while the inner ``torch.optim`` optimizer steps.
#
# :class:`DeepSpeedLink` finds each DEMA tensor's fragment, hooks the inner optimizer's
# ``step`` to copy the gradient fragments out (into one preallocated buffer), and hands
# the engine plain tensors (views of the fp32 fragments, with that buffer as ``.grad``)
# that DeepSpeed never sees.  Where the fragments are partitions, the per-tensor L1
# sums are added across the data-parallel group with one all_reduce per update (as for
# FSDP), so α equals the unpartitioned α; no parameter is gathered per step.  Writing the
# EMA back (EMA replace, ``swap``) goes into the fp32 fragments and then into the model's
# own (bf16 / partitioned) parameters the way DeepSpeed's step does it; exporting the
# adapter gathers the fragments once.


def _torch_optimizer_inside(ds_opt):
    """The ``torch.optim.Optimizer`` that DeepSpeed steps (the "basic optimizer")."""
    inner = ds_opt
    for _ in range(3):
        if isinstance(inner, torch.optim.Optimizer) and not hasattr(inner, "optimizer"):
            return inner          # (a DEMAOptimizer is returned too, to be refused by name)
        inner = getattr(inner, "optimizer", None)
        if inner is None:
            return None
    return None



def _grad_buffer(holders, dtype):
    """One flat ``dtype`` buffer for a step's gradients of ``holders`` (allocated once), and a
    view of it shaped like each holder, in order."""
    total = sum(h.numel() for h in holders)
    dev = holders[0].device if holders else torch.device("cpu")
    buf = torch.zeros(total, dtype=dtype, device=dev)
    views, start = [], 0
    for h in holders:
        views.append(buf.narrow(0, start, h.numel()).view(h.shape))
        start += h.numel()
    return buf, views

class _Frag:
    """Where one DEMA tensor lives: ``flat`` (the optimizer's fp32 tensor), the slice
    [offset, offset + numel) of its flattened view, and where that slice sits in the
    flattened full parameter (``full_start``) of ``full_shape``."""

    __slots__ = ("flat", "offset", "numel", "full_start", "full_shape", "whole")

    def __init__(self, flat, offset, numel, full_start, full_shape, whole=False):
        self.flat, self.offset, self.numel = flat, int(offset), int(numel)
        self.full_start, self.full_shape, self.whole = int(full_start), tuple(full_shape), whole


class DeepSpeedLink:
    """DEMA tensors ↔ DeepSpeed's fp32 optimizer tensors and gradients (see above).

    ``holders``: what the engine averages (views of DeepSpeed's fp32 tensors; ``.grad`` is
    set by :meth:`feed`).  ``reduce_stats``: a :class:`StatsReducer` over the data-parallel
    group where the holders are partitions, else None.  ``partitioned``: each rank holds
    a different fragment of each tensor (ZeRO-1/2/3) — per-rank state files.
    """

    def __init__(self, ds_optimizer, named_params, precision: str = "fp32"):
        if precision not in PRECISIONS:
            raise ValueError(f"DEMA under DeepSpeed: precision={precision!r} is not known; allowed: "
                             f"{', '.join(map(repr, PRECISIONS))}")
        self.precision = precision
        named = list(named_params)
        self.ds_opt = ds_optimizer
        self.inner = _torch_optimizer_inside(ds_optimizer)
        kind = type(ds_optimizer).__name__
        if self.inner is None:
            raise RuntimeError(
                f"DEMA under DeepSpeed: DeepSpeed's optimizer {kind} holds no torch.optim optimizer the callback can "
                "read gradients from; DEMA would never see a gradient. Supported: ZeRO stage 0-3 with a "
                "torch optimizer (the Trainer's default, no \"optimizer\" section in the DeepSpeed config)")
        if isinstance(self.inner, DEMAOptimizer):
            raise RuntimeError(DEMA_OPTIMIZER_UNDER_DEEPSPEED)
        if getattr(ds_optimizer, "zenflow", False) or getattr(ds_optimizer, "swap_optimizer", False) \
                or getattr(ds_optimizer, "offload_param", False):
            raise RuntimeError(
                f"DEMA under DeepSpeed: {kind} with ZenFlow, NVMe optimizer swapping or ZeRO-3 parameter offload "
                "is not supported (DeepSpeed moves the fp32 tensors DEMA reads); use ZeRO 0-3 without them, or "
                "offload_optimizer to the CPU")
        self.group = getattr(ds_optimizer, "dp_process_group", None)
        if hasattr(ds_optimizer, "fp32_partitioned_groups_flat"):          # ZeRO-3
            self.mode = "zero3"
            frags = [self._zero3_frag(p) for _, p in named]
        elif any(hasattr(p, "_hp_mapping") for _, p in named):             # ZeRO-1/2, bf16 optimizer
            self.mode = "fragments"
            frags = [self._hp_frag(p) for _, p in named]
        elif hasattr(ds_optimizer, "fp16_groups") and hasattr(ds_optimizer, "fp32_groups"):   # ZeRO-0, bf16
            self.mode = "master"
            pairs = {id(lp): hp for lg, hg in zip(ds_optimizer.fp16_groups, ds_optimizer.fp32_groups)
                     for lp, hp in zip(lg, hg)}
            self._lp_hp = []
            frags = []
            for n, p in named:
                hp = pairs.get(id(p))
                if hp is None:
                    raise RuntimeError(f"DEMA under DeepSpeed: parameter {n!r} is not in DeepSpeed's optimizer; is it "
                                       "trainable (requires_grad) before the Trainer starts?")
                self._lp_hp.append((p, hp))
                frags.append(_Frag(hp, 0, hp.numel(), 0, p.shape, whole=True))
        elif ds_optimizer is self.inner:                                     # ZeRO-0, fp32
            self.mode = "direct"
            in_opt = {id(q) for g in self.inner.param_groups for q in g["params"]}
            for n, p in named:
                if id(p) not in in_opt:
                    raise RuntimeError(f"DEMA under DeepSpeed: parameter {n!r} is not in DeepSpeed's optimizer")
            frags = [_Frag(p, 0, p.numel(), 0, p.shape, whole=True) for _, p in named]
        else:
            raise RuntimeError(f"DEMA under DeepSpeed: DeepSpeed optimizer {kind} is not supported (cannot tell "
                               "where it keeps the gradients); supported: ZeRO stage 0-3 with a torch optimizer")
        self.frags = frags
        if precision == "official":
            self._check_official(named)
        self.partitioned = self.mode in ("zero3", "fragments")
        ws = _dist().get_world_size(self.group) if dist_ready() else 1
        self.reduce_stats = StatsReducer(self.group) if self.partitioned and ws > 1 else None

        if precision == "official":
            self._init_official()
            return
        # What the engine averages: views of the fp32 tensors, never seen by DeepSpeed.
        self.holders = []
        for f in frags:
            if f.whole:
                h = f.flat.detach()
            elif f.flat is None:
                h = torch.zeros(0, dtype=torch.float32)
            else:
                h = f.flat.detach().view(-1).narrow(0, f.offset, f.numel)
            self.holders.append(h)
        # One buffer for the gradient fragments of a step, allocated once.
        self._grad_buf, self._grad_views = _grad_buffer(self.holders, torch.float32)
        self._by_flat: dict[int, list[int]] = {}
        for k, f in enumerate(frags):
            if f.flat is not None:
                self._by_flat.setdefault(id(f.flat), []).append(k)
        self._flat_ptrs = {id(f.flat): f.flat.data_ptr() for f in frags if f.flat is not None}
        self._captured = [False] * len(frags)
        self.captures = 0            # inner optimizer steps seen (for the tests and the checks)
        self._hook = self.inner.register_step_post_hook(self._capture)

    # ---------------------------------------------------------------- the official run's precision

    def _check_official(self, named) -> None:
        # The official ema_update reads p.grad after DeepSpeed's step. Only with bf16 at ZeRO
        # stage 0 is it there (DeepSpeed 0.9.5's BF16_Optimizer leaves the bf16 gradients in
        # p.grad); elsewhere p.grad is None, the official code's bare except runs, and what it
        # computes is a fixed beta=0.99 EMA, not DEMA: nothing to reproduce with this mode.
        why = None
        if self.mode in ("fragments", "zero3"):
            why = (f"at ZeRO stage {'3' if self.mode == 'zero3' else '1/2'} the official code finds p.grad None "
                   "and runs a fixed beta=0.99 EMA")
        elif self.mode == "direct":
            why = "in fp32 at ZeRO stage 0 the official code finds p.grad None and runs a fixed beta=0.99 EMA"
        else:
            bad = [n for n, p in named if p.dtype != torch.bfloat16]
            if bad:
                why = (f"the model's weights are {dict(named)[bad[0]].dtype} (e.g. {bad[0]!r}), the official run's "
                       "are bfloat16 (bf16 true)")
        if why is not None:
            raise RuntimeError(
                f"DEMACallback(precision='official') reproduces the official LCIA run, which averages only under "
                f"DeepSpeed ZeRO stage 0 with bf16: {why}; run ZeRO stage 0 with bf16, or use the default "
                "precision='fp32'")

    def _init_official(self) -> None:
        # The engine averages the model's own bf16 parameters (DeepSpeed writes the new
        # weights into them after its inner step) with the bf16 gradients, copied inside the
        # step: 0.19 clears p.grad right after it, where 0.9.5 left it for the official code.
        self.holders = [lp.detach() for lp, _ in self._lp_hp]
        self._grad_buf, self._grad_views = _grad_buffer(self.holders, torch.bfloat16)
        self._captured = [False] * len(self.holders)
        self.captures = 0
        self.reduce_stats = None
        self._hook = self.inner.register_step_post_hook(self._capture_official)

    def _capture_official(self, optimizer, args, kwargs):
        # After the inner optimizer stepped the fp32 masters, before DeepSpeed copies them into
        # the bf16 weights: p.grad is the bf16 gradient, all-reduced, not clipped (DeepSpeed
        # clips the fp32 copy) and unscaled (bf16 has no loss scale).
        with torch.no_grad():
            for k, (lp, _) in enumerate(self._lp_hp):
                if lp.grad is not None:
                    self._grad_views[k].copy_(lp.grad.view(self._grad_views[k].shape))
                    self._captured[k] = True
        self.captures += 1

    # ---------------------------------------------------------------- where things live

    def _hp_frag(self, p):
        m = getattr(p, "_hp_mapping", None)
        if m is None:        # none of this tensor lies in this rank's partition
            return _Frag(None, 0, 0, 0, p.shape)
        hp = m.get_hp_fragment()
        flat = self._flat_holding(hp)
        return _Frag(flat, hp.storage_offset() - flat.storage_offset(), m.lp_fragment_address.numel,
                     m.lp_fragment_address.start, p.shape)

    def _flat_holding(self, view):
        for g in self.inner.param_groups:
            for flat in g["params"]:
                if flat.untyped_storage().data_ptr() == view.untyped_storage().data_ptr():
                    return flat
        raise RuntimeError("DEMA under DeepSpeed: a DeepSpeed fp32 fragment is not in the optimizer's parameters; "
                           "this DeepSpeed version lays out its optimizer differently (tested: 0.19)")

    def _zero3_frag(self, p):
        opt = self.ds_opt
        sub, offset, _ = opt.grad_position[opt.get_param_id(p)]
        flat = opt.fp32_partitioned_groups_flat[sub]
        part = p.ds_tensor.ds_numel
        r = _dist().get_rank(group=p.ds_process_group) if dist_ready() else 0
        start = r * part
        valid = max(0, min(part, p.ds_numel - start))      # the last rank's partition is padded
        return _Frag(flat, offset, valid, start, p.ds_shape)

    # ---------------------------------------------------------------- per step

    def _capture(self, optimizer, args, kwargs):
        # Inside DeepSpeed's step, right after the inner optimizer stepped one (sub-)group:
        # the gradients there are reduced, unscaled and clipped; copy this rank's fragments.
        with torch.no_grad():
            for g in optimizer.param_groups:
                for flat in g["params"]:
                    ks = self._by_flat.get(id(flat))
                    if not ks or flat.grad is None:
                        continue
                    if flat.data_ptr() != self._flat_ptrs[id(flat)]:
                        raise RuntimeError("DEMA under DeepSpeed: DeepSpeed re-allocated its fp32 parameters after "
                                           "training began; the EMA lost track of them")
                    grad = flat.grad
                    for k in ks:
                        f = self.frags[k]
                        src = grad if f.whole else grad.view(-1).narrow(0, f.offset, f.numel)
                        self._grad_views[k].copy_(src.view(self._grad_views[k].shape))
                        self._captured[k] = True
        self.captures += 1

    def feed(self) -> bool:
        """Give the holders this step's gradients (None where none was captured);
        returns whether any was. Call once per optimizer step, before the engine update."""
        any_grad = any(self._captured)
        for k, h in enumerate(self.holders):
            # a rank with nothing of a tensor still takes part (its empty slice has a gradient)
            got = self._captured[k] or (any_grad and self.frags[k].flat is None)
            h.grad = self._grad_views[k] if got else None
            self._captured[k] = False
        return any_grad

    def close(self) -> None:
        self._hook.remove()

    # ---------------------------------------------------------------- writing back, gathering

    @torch.no_grad()
    def sync_model(self, replaced: bool = True) -> None:
        """The holders (fp32) were written (EMA replace / swap): put the values into the
        model's own parameters the way DeepSpeed's step does. Collective for ZeRO-1/2/3.
        ``replaced=False``: a swap put the holders back as they were."""
        if self.mode == "direct":
            return
        if self.precision == "official":
            # The holders are the model's bf16 weights. After the EMA replace DeepSpeed's fp32
            # masters take the EMA too, so a further step continues from it; a swap leaves the
            # masters alone (copying bf16 back would drop their fp32 digits).
            if replaced:
                for lp, hp in self._lp_hp:
                    hp.data.copy_(lp.data)
            return
        if self.mode == "master":
            for lp, hp in self._lp_hp:
                lp.data.copy_(hp.data)
        elif self.mode == "fragments":
            self.ds_opt.update_lp_params()
        else:  # ZeRO-3: fp32 partitions -> the low-precision partitions -> persistent full copies
            opt = self.ds_opt
            for i in range(len(opt.fp16_groups)):
                opt._reassign_or_swap_out_partitioned_parameters(i)
            persistent = getattr(opt, "persistent_parameters", None)
            if persistent:
                persistent[0].all_gather(persistent)

    @torch.no_grad()
    def full_tensors(self, fragments) -> list[torch.Tensor]:
        """Full tensors (fp32, the parameters' shapes) from this rank's ``fragments`` (one per
        holder, e.g. the EMA): one all_reduce of the concatenation when partitioned.
        Collective: every rank of the data-parallel group must call it."""
        if not self.partitioned:
            return [t.detach().reshape(f.full_shape).clone() for t, f in zip(fragments, self.frags)]
        sizes = [math.prod(f.full_shape) for f in self.frags]
        dev = self._grad_buf.device
        buf = torch.zeros(sum(sizes), dtype=torch.float32, device=dev)
        base = 0
        for t, f, n in zip(fragments, self.frags, sizes):
            if f.numel:
                buf.narrow(0, base + f.full_start, f.numel).copy_(t.detach().reshape(-1))
            base += n
        if self.reduce_stats is not None:
            dist = _dist()
            dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=self.group)
        out, base = [], 0
        for f, n in zip(self.frags, sizes):
            out.append(buf.narrow(0, base, n).view(f.full_shape).clone())
            base += n
        return out


class DeepSpeedDEMA(DEMA):
    """The DEMA engine over DeepSpeed's fp32 fragments (a :class:`DeepSpeedLink`'s holders):
    its EMA writes (``copy_to_params``, ``swap``) also reach the model's own parameters, and
    ``export_ema()`` gathers the EMA whole (collective when the fragments are partitions)."""

    _in_swap = False

    def __init__(self, link: DeepSpeedLink, config, names, model_params):
        super().__init__(link.holders, config, names=names, reduce_stats=link.reduce_stats)
        self.deepspeed_link = link
        self._model_params = list(model_params)

    @property
    def model_params(self) -> list:
        return self._model_params

    def copy_to_params(self) -> None:
        super().copy_to_params()
        self.deepspeed_link.sync_model(replaced=not self._in_swap)

    @contextlib.contextmanager
    def swap(self):
        try:
            self._in_swap = True
            with super().swap():       # EMA into the fragments (+ model), then back
                yield self
        finally:
            self._in_swap = False
            self.deepspeed_link.sync_model(replaced=False)

    def export_ema(self) -> list[torch.Tensor]:
        """θ* of every tensor, whole (collective when the fragments are partitions)."""
        return self.deepspeed_link.full_tensors(self.ema_tensors())


def attach_deepspeed(ds_optimizer, named, config, precision: str = "fp32"):
    """The callback's engine under DeepSpeed: a :class:`DeepSpeedLink` to ``ds_optimizer``
    (the gradients live inside DeepSpeed's step only: they are read there) and the
    :class:`DeepSpeedDEMA` over it; returns ``(link, engine)``, with one log line."""
    link = DeepSpeedLink(ds_optimizer, named, precision=precision)
    engine = DeepSpeedDEMA(link, config, [n for n, _ in named], [p for _, p in named])
    logger.info("DEMACallback: DeepSpeed %s (%s): DEMA reads the %s and the gradients inside "
                "DeepSpeed's step%s", type(ds_optimizer).__name__, link.mode,
                "model's bf16 weights (precision='official')" if precision == "official"
                else "fp32 partitions" if link.partitioned else "fp32 parameters",
                "; statistics summed across ranks, one all_reduce per step" if link.reduce_stats else "")
    return link, engine
