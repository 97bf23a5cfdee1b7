"""The two-pass DEMA backends: their interface and the selection of the one that runs a
(device, dtype) group of the engine.

Every backend implements one interface (DEMABackend below); the engine never looks
inside one. "reference" is the literal per-tensor maths (cl_core.dema.twopass.reference),
"torch" the native CPU kernels with a pure-torch fallback (torch_backend.py, launching
cl_core.kernels.cpu_dema), "triton" the GPU kernels (triton_backend.py, launching
cl_core.kernels.triton_dema). A backend is built over the engine's GroupState and writes
only that group's state tensors, in place, inside `update`; the engine's counters are
the engine's.
"""
from __future__ import annotations

import os
from typing import Callable, Optional, Protocol, Sequence

import torch

from cl_core.dema.config import DEMAConfig
from cl_core.dema.state import GroupState


class DEMABackend(Protocol):
    """What the engine asks of a backend for one (device, dtype) group."""

    def update(self, thetas: Sequence[torch.Tensor], grads: Sequence[Optional[torch.Tensor]],
               reduce_stats: Optional[Callable[[torch.Tensor], None]] = None) -> None:
        """One DEMA step over the group's local tensors (grads[i] None = no gradient)."""

    def last_stats(self) -> torch.Tensor:
        """float32 [T, 5] (a, b, c, nonfinite, d before the update: the table a `reduce_stats`
        hook sees) of the last `update`, as its α was decided from them; read by the
        engine's regime counters (cl_core/dema/regime.py) right after each update, on the
        device, no host sync. a, b, c may be 0 where the formula did not need them."""

    def canonicalize(self) -> None:
        """Fold any partial sums the backend keeps into the shared GroupState."""

    def state_loaded(self) -> None:
        """A checkpoint was written into the shared GroupState: drop cached partials."""


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# Parameter dtypes the Triton kernels take (float64 groups run the torch backend): the
# kernels' own DTYPES (cl_core/kernels/triton_dema.py), named here without importing triton.
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def resolve_backend(name: str, device: torch.device, dtype: Optional[torch.dtype] = None,
                    ema_dtype: torch.dtype = torch.float32) -> str:
    """The backend that runs tensors of `device` (and `dtype`) for the configured name.
    Every backend keeps θ* and g_prev in float32 or (ema_dtype="param") in the 16-bit
    parameter dtype with that dtype's rounding; `ema_dtype` is checked to be one of them."""
    if ema_dtype not in (torch.float32, dtype):
        raise ValueError(f"DEMA keeps the EMA in float32 or in the parameter dtype, got ema_dtype {ema_dtype} "
                         f"for {dtype} tensors")
    if name == "auto":
        usable = dtype is None or dtype in TRITON_DTYPES
        return "triton" if device.type == "cuda" and usable and triton_available() else "torch"
    if name == "triton":
        if dtype is not None and dtype not in TRITON_DTYPES:
            raise ValueError(f"DEMAConfig.backend='triton' takes float32/bfloat16/float16 tensors, got {dtype}; "
                             "use backend='auto' (float64 groups then run the torch backend)")
        if not triton_available():
            raise ValueError("DEMAConfig.backend='triton' needs the triton package: pip install triton (or use backend='auto')")
        if device.type != "cuda" and not _interpreting():
            raise ValueError(
                f"DEMAConfig.backend='triton' runs on CUDA tensors, got a tensor on {device}; "
                "use backend='auto' or 'torch' (or set TRITON_INTERPRET=1 to run the kernels on CPU for testing)"
            )
    return name


def make_backend(name: str, state: GroupState, config: DEMAConfig, dtype: torch.dtype) -> DEMABackend:
    if name == "reference":
        from cl_core.dema.twopass.reference import ReferenceBackend

        return ReferenceBackend(state, config)
    if name == "triton":
        from cl_core.dema.twopass.triton_backend import TritonBackend

        return TritonBackend(state, config, dtype)
    from cl_core.dema.twopass.torch_backend import TorchBackend

    return TorchBackend(state, config, dtype)
