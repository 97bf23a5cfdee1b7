"""How the Triton host code (twopass/triton_backend.py, onepass/triton_driver.py) enters a CUDA
device before it launches: the device guard, the refusals (CUDA-graph capture, the Triton
interpreter on CUDA tensors) and the stream ordering of the buffers a driver keeps.

- Device. Triton launches on `torch.cuda.current_device()` and its current stream; the
  tables hold addresses on the group's device. Every launch (and the torch ops around it)
  therefore runs under `torch.cuda.device(group device)`: parameters on cuda:1 without
  `set_device(1)`, or a model spread over GPUs (one engine group, so one set of tables,
  per device) launch where their memory is.
- Capture. The host keeps the step count, the gradient addresses and the double-buffer
  parity, and uploads them per step: a captured step would replay the capture step's
  values. A launch while the current stream is capturing is refused.
- Streams. The buffers a driver keeps between calls (tables, partials, flags, the engine's
  EMA state) are ordered only on the stream that last used them. When a call comes from
  another stream (a step on a side stream, an EMA read from an evaluation stream), that
  stream first waits for the last one, and the buffers are marked as used on it
  (`record_stream`), so the caching allocator does not hand their memory to another
  stream while this one may still use it (when a rebuild frees them).
- Interpreter. TRITON_INTERPRET=1 runs kernels on the host, copying the tensor arguments
  to the CPU; the addresses in the tables would still point into device memory and be
  dereferenced on the host. Refused.

Only a GPU shows the device, capture and stream behaviour itself (`make gpu-check` runs the
CUDA tests, tests/engine/test_triton_host.py and tests/fused/test_triton_fused_host.py);
on the CPU the tests drive the same logic through `_is_cuda`, `_enter_device`,
`_capturing`, `_current_stream` and `_record_use`, which they replace.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Callable, Iterable

import torch

log = logging.getLogger(__name__)


def _is_cuda(device: torch.device) -> bool:
    return device.type == "cuda"


def _enter_device(device: torch.device):
    return torch.cuda.device(device)


def _capturing(device: torch.device) -> bool:
    """Whether the current stream (of the current device, entered by the caller) is
    being captured into a CUDA graph."""
    return torch.cuda.is_current_stream_capturing()


def _current_stream(device: torch.device):
    return torch.cuda.current_stream(device)


def _record_use(tensor: torch.Tensor, stream) -> None:
    if tensor.device.type == "cuda":
        tensor.record_stream(stream)


def kernels_interpreted(kernel) -> bool:
    """Whether `kernel` (a @triton.jit function) runs in Triton's interpreter: decided
    when its module was imported (TRITON_INTERPRET read then), not by the environment now."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # no interpreter in this Triton
        return False
    return isinstance(kernel, InterpretedFunction)


def refuse_interpreter_on_cuda(device: torch.device, kernel, what: str) -> None:
    """Raise when the kernels are interpreted but the group's tensors are on a GPU."""
    if _is_cuda(device) and kernels_interpreted(kernel):
        raise RuntimeError(
            f"{what}: the Triton kernels were loaded with TRITON_INTERPRET=1, which runs them on the CPU, "
            f"but this group's tensors are on {device}: the interpreter would read their device addresses as "
            "host memory. Unset TRITON_INTERPRET (and restart Python) to run the compiled kernels on the GPU, "
            "or keep the tensors on the CPU to use the interpreter (it is meant for testing)")


class LaunchGuard:
    """The device entry of one driver (one engine group, one device): `with guard(what):`
    around every call that launches kernels or touches the driver's buffers."""

    def __init__(self, device: torch.device, buffers: Callable[[], Iterable[torch.Tensor]], owner: str):
        self.device = device
        self.buffers = buffers  # the tensors the driver keeps between calls (read at each stream change)
        self.owner = owner
        self.last_stream = None
        self.stream_changes = 0  # calls that came from another stream than the previous one
        if _is_cuda(device):
            with _enter_device(device):
                # the buffers are allocated on this stream (the driver builds them right after)
                self.last_stream = _current_stream(device)

    @contextlib.contextmanager
    def __call__(self, what: str):
        if not _is_cuda(self.device):
            yield
            return
        with _enter_device(self.device):
            if _capturing(self.device):
                raise RuntimeError(
                    f"{self.owner}: {what} was called while the current CUDA stream is being captured into a "
                    "CUDA graph. It cannot be replayed: the host keeps the step count, the gradient addresses and "
                    "the double-buffer parity and uploads them at each call, so a replay would repeat the "
                    "captured step's values. Capture only the forward and backward pass (e.g. "
                    "torch.cuda.make_graphed_callables) and call optimizer.step() / engine.update() and the EMA "
                    "reads outside the graph")
            self._order()
            yield

    def _order(self) -> None:
        cur = _current_stream(self.device)
        last = self.last_stream
        if last is not None and cur != last:
            cur.wait_stream(last)
            for b in self.buffers():
                if b is not None:
                    _record_use(b, cur)
            self.stream_changes += 1
            if self.stream_changes == 1:
                log.info("%s: called from another CUDA stream than before; that stream waits for the previous "
                         "one before using the group's buffers", self.owner)
        self.last_stream = cur
