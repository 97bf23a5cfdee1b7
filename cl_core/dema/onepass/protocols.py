"""The interfaces of the one-pass optimizer+DEMA step (docs/design.md §7, Layers): what the
engine is handed (`OnePassStep`), what FusedStep drives per engine group (`FusedDriver`),
the data passed between them, and the tensor check both drivers run every step.

Implemented by cl_core/dema/onepass/step.py (FusedStep), cpu_driver.py (CpuFusedDriver) and
triton_driver.py (TritonFusedDriver); this module imports none of them.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Optional, Protocol, Sequence

import torch

_DTYPE = operator.attrgetter("dtype")
_DEVICE = operator.attrgetter("device")
_LAYOUT = operator.attrgetter("layout")
_CONTIG = torch.Tensor.is_contiguous


@dataclass
class GroupMembers:
    """What a driver is built from: one engine group's tensors and their optimizer side.
    Lists are in engine order (position k of the group = engine.params[indices[k]])."""

    state: object  # the engine group's GroupState (θ*, g_prev, per-tensor state), updated in place
    device: object  # torch.device of the group
    dtype: object  # torch.dtype of the group's parameters when the engine was built
    indices: list  # positions of the group's tensors in engine.params
    params: list  # the parameters (torch.nn.Parameter)
    param_group: list  # per tensor: index of its optimizer param group (row of StepBatch.hyper)
    exp_avg: list  # per tensor: exp_avg (Adam) / momentum_buffer (SGD) or None (no state yet)
    exp_avg_sq: list  # per tensor: exp_avg_sq (Adam) or None
    steps: Optional[torch.Tensor]  # Adam: float32 CPU [T], torch's state["step"] are its elements
    stateless: list = field(default_factory=list)  # positions whose optimizer state starts at their first gradient
    version: int = 0  # bumped whenever an optimizer-state tensor above was created or replaced


@dataclass
class StepBatch:
    """What one step hands a driver (built by FusedStep, O(param groups) + the grads)."""

    kind: int  # KIND_* of every tensor this step
    consts: tuple  # DEMAConfig.kernel_scalars(): (formula code, scale, fallback, beta)
    hyper: torch.Tensor  # float64 CPU [optimizer param groups, N_HYPER] (H_* slots)
    grads: list  # per tensor: its gradient this step, None = none (torch skips the tensor)
    has_all_grads: bool  # no None in grads (the common case: fewer per-tensor checks)
    first: list = field(default_factory=list)  # SGD: positions whose momentum buffer starts now


@dataclass
class OnePassResult:
    """What `OnePassStep.step` tells the engine."""

    refused: Optional[str] = None  # why this step cannot run fused (nothing changed); None: it ran
    missing: list = field(default_factory=list)  # engine positions that had no gradient at this step


class FusedDriver(Protocol):
    """The one-pass kernels of one engine group (CpuFusedDriver, TritonFusedDriver). Numbers
    and slots are named in kernels/layouts.py."""

    members: GroupMembers  # replaced by FusedStep when the optimizer state was collected again

    def prepare(self, batch: StepBatch) -> Optional[str]:
        """Cheap check, every step, that what this step hands over (parameter storage, dtype,
        device, contiguity, gradient dtype/device/contiguity) is what the tables were built
        for; rebuilds the tables when they can be rebuilt (new storage, a new common dtype).
        None when the step can run fused, else a sentence saying why not (the whole step
        then takes the generic path). Changes no state the generic path would see."""

    def step(self, batch: StepBatch) -> None:
        """The fused sweep of this step: finish the pending EMA update, the optimizer
        update, this step's statistics (a new EMA update is then pending)."""

    def flush(self) -> None:
        """Finish the pending EMA update (reads the parameters' current storage, never
        memory the tables assumed); a no-op when none is pending, so never applied twice."""

    def pending_stats(self):
        """This step's (alpha, skips) from the pending state, computed on the device
        without finishing the EMA; None when nothing is pending."""

    def pending_inputs(self):
        """What the pending decision is made from, for the regime counters
        (cl_core/dema/regime.py): (tag, fields, convert) — the driver's pending-state tensors
        as they are (copied by the counters, a few copies per step, no host sync) and a
        picklable function turning a batch of them into `classify`'s (stats [..., 5]: a, b,
        c, nonfinite, d; use [...]: the formula's α applies); None when nothing is pending.
        A tensor that started at this step has use False (and nonfinite 1 when its start was
        skipped)."""


class OnePassStep(Protocol):
    """The one-pass optimizer+DEMA implementation the engine is handed (FusedStep)."""

    def step(self, groups: Sequence, consts: tuple) -> OnePassResult:
        """One optimizer step and one DEMA update over the engine's `groups` (EngineGroup,
        state created) with the config's kernel scalars, or a refusal that changed nothing."""

    def flush(self) -> None:
        """Finish the EMA update the last `step` left pending."""

    def pending_stats(self) -> list:
        """Per engine group: (alpha, skips) of the pending update, or None for a group that
        cannot tell without finishing it."""

    def pending_inputs(self) -> list:
        """Per engine group: the FusedDriver.pending_inputs of this step (or None)."""


def check_tensors(params, grads, dtype, device, has_all_grads: bool,
                  ema_dtype: torch.dtype = torch.float32) -> str | None:
    """Why the kernels must not read these tensors as `dtype` on `device` (with θ* and
    g_prev of `ema_dtype`: float32, or the parameters' own dtype), or None.
    `map` over C-implemented methods: a few hundred ns per tensor."""
    if ema_dtype != torch.float32 and dtype != ema_dtype:
        # the kernels would read the 16-bit EMA as numbers of the new dtype
        return (f"the EMA is kept in {ema_dtype} (ema_dtype='param') but the parameters are now {dtype}; "
                "the fused kernels keep θ* and g_prev in the parameters' own dtype")
    if set(map(_DTYPE, params)) != {dtype}:
        return f"the parameters are no longer all {dtype} (dtype changed after the optimizer was built)"
    if set(map(_DEVICE, params)) != {device}:
        return f"the parameters are no longer all on {device} (moved after the optimizer was built)"
    if not all(map(_CONTIG, params)):
        return "a parameter is no longer contiguous"
    present = grads if has_all_grads else [g for g in grads if g is not None]
    if not present:
        return None
    if set(map(_LAYOUT, present)) != {torch.strided}:
        return "a gradient is sparse"
    if set(map(_DTYPE, present)) != {dtype}:
        return f"a gradient is not {dtype} (the parameter dtype)"
    if set(map(_DEVICE, present)) != {device}:
        return f"a gradient is not on {device} (the parameters' device)"
    if not all(map(_CONTIG, present)):
        return "a gradient is not contiguous"
    return None
