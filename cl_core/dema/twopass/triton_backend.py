"""The "triton" DEMA backend: one (device, dtype) group of the engine on the Triton
kernels of cl_core/kernels/triton_dema.py (three launches per update whatever the tensor
count: stats, decide, apply; see that module). This class owns the group's tables (block
map, address tables, partials) and hands them to the kernels' launchers with the
config's scalars; the per-tensor state is the engine's GroupState.

Nothing here reads a device value on the host. Under TRITON_INTERPRET=1 the same kernels
run on CPU tensors, which is how the tests check them (CUDA tensors are then refused).
Every call that launches or touches the tables runs under the group's device, refuses
CUDA-graph capture and orders its stream after the one that last used the tables
(cl_core/dema/cuda_launch.py).
"""
from __future__ import annotations

import functools
import logging
import operator

import torch

from cl_core.dema.config import DEMAConfig
from cl_core.dema.cuda_launch import LaunchGuard, refuse_interpreter_on_cuda
from cl_core.dema.state import GroupState
from cl_core.kernels import layouts as L
from cl_core.kernels import triton_dema as K

log = logging.getLogger(__name__)

_PTR = torch.Tensor.data_ptr


def _check_ema_dtype(state: GroupState, dtype: torch.dtype) -> None:
    """The kernels keep θ* and g_prev in float32 or in the parameter dtype; an EMA kept in
    a half dtype other than the parameters' (the model's dtype changed after the engine
    started with ema_dtype="param") has no kernel."""
    if state.ema_dtype not in (torch.float32, dtype):
        raise ValueError(
            f"the triton DEMA backend keeps this group's EMA in {state.ema_dtype} (ema_dtype='param', the "
            f"parameters' dtype when it started), but the parameters are now {dtype}; create the DEMA engine "
            "after changing the model's dtype, or use ema_dtype='float32'")


class TritonBackend:
    """Runs one (device, dtype) group of the engine through the kernels of triton_dema.py."""

    def __init__(self, state: GroupState, config: DEMAConfig, dtype: torch.dtype):
        if dtype not in K.DTYPES:
            raise ValueError(f"the triton DEMA backend supports float32/bfloat16/float16 parameters, got {dtype}")
        _check_ema_dtype(state, dtype)  # (GroupState allocates θ* and g_prev in state.ema_dtype)
        refuse_interpreter_on_cuda(state.device, K._dema_stats_kernel, "the triton DEMA backend")
        self.state, self.config = state, config
        self.dpart = None
        self.copied_tensor_updates = 0  # non-contiguous θ/g read through contiguous copies
        self.guard = LaunchGuard(state.device, self._buffers, "the triton DEMA backend")
        with self.guard("building its tables"):
            self._build(dtype)

    def _buffers(self):
        """The tensors kept between calls: the tables and the group's state."""
        s = self.state
        return [self.numel, self.e_tab, self.gp_tab, self.dyn_tab, self.stats, self.mode, self.blk_tensor,
                self.blk0, self.partials, self.dpart, s.ema_flat, s.gprev_flat, s.started, s.has_prev, s.d,
                s.alpha, s.skips]

    def _build(self, dtype: torch.dtype) -> None:
        state = self.state
        self.ema_dtype = state.ema_dtype
        s, dev = state, state.device
        self.numel = torch.tensor(s.numels, dtype=torch.int64, device=dev)
        e = [v.data_ptr() for v in s.ema_views]
        gp = [v.data_ptr() for v in s.gprev_views] if s.gprev_views is not None else e
        self.e_tab = torch.tensor(e, dtype=torch.int64, device=dev)
        self.gp_tab = torch.tensor(gp, dtype=torch.int64, device=dev)
        self._ema_addresses = e + gp
        self.dyn_tab = torch.zeros(L.N_DT, max(1, len(s)), dtype=torch.int64, device=dev)
        self.stats = torch.zeros(len(s), L.N_DSTAT, dtype=torch.float32, device=dev)
        self.mode = torch.zeros(len(s), dtype=torch.int8, device=dev)
        self._dyn_key = None
        self._aligned = False
        self._bind(dtype)

    def _bind(self, dtype: torch.dtype) -> None:
        """Block tables for parameters of `dtype` (again when the parameters' dtype changed
        after the engine was built, e.g. model.to(torch.bfloat16))."""
        s, dev = self.state, self.state.device
        self.dtype = dtype
        self.vec, self.block = K.launch_shape(torch.empty(0, dtype=dtype).element_size(),
                                              torch.empty(0, dtype=s.ema_dtype).element_size())
        counts = [(n + self.block - 1) // self.block for n in s.numels]
        blk0 = [0]
        for c in counts:
            blk0.append(blk0[-1] + c)
        if self.dpart is not None:  # pending d partials belong to the old blocks: fold them first
            self.canonicalize()
        self.n_blocks = blk0[-1]
        self.blk_tensor = torch.tensor([t for t, c in enumerate(counts) for _ in range(c)], dtype=torch.int32, device=dev)
        self.blk0 = torch.tensor(blk0, dtype=torch.int32, device=dev)
        # θ* and g_prev views are aligned when every numel is a multiple of VEC
        self._static_aligned = (functools.reduce(operator.or_, self._ema_addresses, 0) & 15) == 0 and all(
            n % self.vec == 0 for n in s.numels)
        # float64 partial sums for an EMA in the parameter dtype: its norms are exact sums
        # rounded once (kernels/triton_dema.py round_sum)
        part_dtype = torch.float32 if self.ema_dtype == torch.float32 else torch.float64
        self.partials = torch.zeros(max(1, self.n_blocks), L.N_STAT, dtype=part_dtype, device=dev)
        self.dpart = torch.zeros(max(1, self.n_blocks), dtype=part_dtype, device=dev)
        self._dyn_key = None

    def _set_pointers(self, thetas, grads) -> None:
        th = list(map(_PTR, thetas))
        g = [th[i] if x is None else x.data_ptr() for i, x in enumerate(grads)]
        key = (th, g)
        if key != self._dyn_key:  # grads are re-created by zero_grad(set_to_none=True)
            rows = [None] * L.N_DT
            rows[L.DT_PARAM], rows[L.DT_GRAD] = th, g
            rows[L.DT_HAS_GRAD] = [0 if x is None else 1 for x in grads]
            host = torch.tensor(rows, dtype=torch.int64)
            cuda = self.dyn_tab.device.type == "cuda"
            # pinned + non_blocking: no host sync (torch's host allocator keeps the block
            # until the copy has run)
            self.dyn_tab.copy_(host.pin_memory() if cuda else host, non_blocking=cuda)
            self._dyn_key = key
            self._aligned = self._static_aligned and (functools.reduce(operator.or_, th + g, 0) & 15) == 0

    def update(self, thetas, grads, reduce_stats=None) -> None:
        self._check_numels(thetas, grads)  # before anything changes (a dtype rebind included)
        with self.guard("update()"):
            self._update(thetas, grads, reduce_stats)

    def _check_numels(self, thetas, grads) -> None:
        """The blocks were laid out for the element counts the group started with: a
        tensor given other storage of another size (p.data = x[:k]) would be swept past
        its end (or partly), so it is refused, naming it."""
        numels = self.state.numels
        for k, (x, g) in enumerate(zip(thetas, grads)):
            for what, t in (("parameter", x), ("gradient", g)):
                if t is not None and t.numel() != numels[k]:
                    raise ValueError(
                        f"the triton DEMA backend: the {what} of tensor {k} of this group ({self.state.device}, "
                        f"{self.dtype}) has {t.numel()} elements (shape {tuple(t.shape)}), but its EMA was built "
                        f"for {numels[k]} (shape {self.state.shapes[k]}); its storage was replaced by one of "
                        "another size. Give it back its size, or build a new DEMA engine for the resized model")

    def _contiguous(self, thetas, grads):
        """Non-contiguous θ or g (only read here) as contiguous copies, counted and warned
        once: the fused step sends a step with such a gradient to the generic path, which
        lands here (issue 28's gpu-check found it refused instead)."""
        odd = [i for i, (t, g) in enumerate(zip(thetas, grads))
               if not t.is_contiguous() or (g is not None and not g.is_contiguous())]
        if not odd:
            return thetas, grads
        if not self.copied_tensor_updates:
            log.warning("triton DEMA backend: %d tensor(s) with a non-contiguous parameter or gradient are read "
                        "through contiguous copies (warned once; backend.copied_tensor_updates counts them)", len(odd))
        self.copied_tensor_updates += len(odd)
        thetas, grads = list(thetas), list(grads)
        for i in odd:
            thetas[i] = thetas[i].contiguous()
            grads[i] = None if grads[i] is None else grads[i].contiguous()
        return thetas, grads

    def _update(self, thetas, grads, reduce_stats) -> None:
        s = self.state
        dtypes = {x.dtype for x in thetas}
        if len(dtypes) == 1 and self.dtype not in dtypes and next(iter(dtypes)) in K.DTYPES:
            _check_ema_dtype(s, next(iter(dtypes)))  # before anything changes
            log.info("triton DEMA backend: parameters are now %s (built for %s); block tables rebuilt",
                     next(iter(dtypes)), self.dtype)
            self._bind(next(iter(dtypes)))
        thetas, grads = self._contiguous(thetas, grads)
        for x in list(thetas) + [g for g in grads if g is not None]:
            if not x.is_contiguous() or x.dtype != self.dtype or x.device != s.device:
                raise ValueError(
                    f"the triton DEMA backend was built for contiguous {self.dtype} tensors on {s.device}; got a "
                    f"{'non-contiguous ' if not x.is_contiguous() else ''}{x.dtype} tensor on {x.device}"
                )
        if len(s) == 0:
            return
        self._set_pointers(thetas, grads)
        need_gp = int(s.needs_grad_prev)
        n = len(s)
        sweep = dict(dtype=self.dtype, ema_dtype=self.ema_dtype, aligned=self._aligned, vec=self.vec, block=self.block)
        K.dema_stats(self.n_blocks, self.blk_tensor, self.blk0, self.numel, self.dyn_tab, self.e_tab, self.gp_tab,
                     self.partials, n, need_gp, **sweep)
        halves = [K.DECIDE_ALL] if reduce_stats is None else [K.DECIDE_REDUCE_ONLY, K.DECIDE_ONLY]
        for k, half in enumerate(halves):
            if k == 1:
                reduce_stats(self.stats)
            self._decide(*half)
        K.dema_apply(self.n_blocks, self.blk_tensor, self.blk0, self.numel, self.dyn_tab, self.e_tab, self.gp_tab,
                     self.mode, s.alpha, self.dpart, n, need_gp, **sweep)

    def _decide(self, reduce: bool, decide: bool) -> None:
        s = self.state
        K.dema_decide(self.blk0, self.partials, self.dpart, self.stats, self.mode, s.started, s.has_prev, s.d,
                      s.alpha, s.skips, self.dyn_tab, len(s), int(s.needs_grad_prev), *self.config.kernel_scalars(),
                      reduce=reduce, decide=decide, ema_dtype=self.ema_dtype)

    def last_stats(self) -> torch.Tensor:
        """The decide kernel's per-tensor statistics (DS_* columns) of the last update."""
        return self.stats

    def canonicalize(self) -> None:
        """Fold the pending d partials into state.d (for checkpoints and reads). The
        reducing half of `decide` does it, the very sum (and rounding) the next update
        would form: reading the state never changes the trajectory (summed on the host
        in another order, d could differ in its last bit, and α with it). Its other
        output, the statistics table, is only read within an update."""
        with self.guard("an EMA read (canonicalize)"):  # the read is ordered after the last update too
            if len(self.state) == 0 or self.n_blocks == 0:
                return
            self._decide(*K.DECIDE_REDUCE_ONLY)
            self.mode.zero_()  # MODE_SKIP: the next decide keeps the folded d

    def state_loaded(self) -> None:
        """A checkpoint was written into the shared state: drop pending partials."""
        with self.guard("loading a state"):
            self.mode.zero_()
            self.dpart.zero_()
