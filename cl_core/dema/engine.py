"""cl_core.DEMA: the dynamic-EMA engine over a list of tensors (docs/design.md §2, §6).

The engine owns the EMA θ* of each tensor (fp32), its previous gradient and a few
per-tensor numbers. Tensors are grouped by (device, dtype); each group runs on one
backend: "reference" (literal per-tensor maths, the test oracle), "torch" (native
CPU kernels, or pure torch on other devices) or "triton" (fused GPU kernels, a
fixed number of launches per update whatever the tensor count).

The engine is the one owner of the DEMA state, its counters and the flag "an EMA update
is pending from the one-pass step". Its implementations sit behind one interface each
and are dispatched to, as torch.optim dispatches `adam()`: the two-pass backends
(`DEMABackend`, cl_core/dema/twopass) run `update()`; a one-pass optimizer+DEMA step
(`OnePassStep`, cl_core/dema/onepass/protocols.py) is handed to the engine once
(`attach_one_pass`, by DEMAOptimizer) and run by `one_pass_update()`. The engine decides
when a pending update is finished (`flush`: every EMA read, the next `update`, a copy).
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
from dataclasses import dataclass
from typing import Optional

import torch

from cl_core.dema.checkpoint import STATE_FORMAT, STATE_VERSION, check_param, check_state
from cl_core.dema.config import DEMAConfig
from cl_core.dema.regime import RegimeTracker
from cl_core.dema.state import GroupState, ema_dtype_for, local_tensor
from cl_core.dema.twopass import DEMABackend, make_backend, resolve_backend

log = logging.getLogger(__name__)


@dataclass
class EngineGroup:
    """The tensors of one (device, dtype) that one backend updates together.

    `state` and `backend` exist once the engine has started (the lazy start of
    docs/design.md §2); before that they are None.
    """

    indices: list  # positions in engine.params
    device: torch.device
    dtype: torch.dtype
    backend_name: str  # "reference" | "torch" | "triton"
    state: Optional[GroupState] = None
    backend: Optional[DEMABackend] = None


@dataclass
class DEMAStats:
    """Per-tensor numbers of the last update, in parameter order (device tensors)."""

    alpha: torch.Tensor  # fp32 [T]: α applied (0 where the tensor was skipped)
    nonfinite_skips: torch.Tensor  # int64 [T]: updates skipped for NaN/inf, in total
    missing_grads: torch.Tensor  # int64 [T] on CPU: updates that found no gradient, in total
    updates: int  # update() calls
    skipped_steps: int  # optimizer steps skipped (AMP overflow), not averaged
    regime: Optional[RegimeTracker] = None  # the engine's regime counters (cl_core/dema/regime.py)

    def to_dict(self) -> dict:
        """Python numbers, for logging (synchronises with the device); "regime": the whole
        run's regime (`RegimeReport.to_dict`), judged by `RegimeTracker.check` (which warns
        once when the run is out of regime)."""
        out = {
            "alpha": self.alpha.float().cpu().tolist(),
            "nonfinite_skips": self.nonfinite_skips.cpu().tolist(),
            "missing_grads": self.missing_grads.tolist(),
            "updates": self.updates,
            "skipped_steps": self.skipped_steps,
        }
        if self.regime is not None:
            out["regime"] = self.regime.check().to_dict()
        return out


class DEMA:
    """Dynamic EMA of a list of tensors; call `update()` after every optimizer step."""

    def __init__(self, params, config: DEMAConfig | None = None, *, names=None, reduce_stats=None):
        params = list(params)
        if params and isinstance(params[0], tuple):
            if names is not None:
                raise ValueError("DEMA got (name, tensor) pairs and names=; give one or the other")
            names = [n for n, _ in params]
            params = [p for _, p in params]
        for i, p in enumerate(params):
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"DEMA params[{i}] is a {type(p).__name__}, expected a torch.Tensor")
        if len({id(p) for p in params}) != len(params):
            raise ValueError("DEMA got the same tensor twice in params; pass each parameter once")
        if names is None:
            names = [f"param_{i}" for i in range(len(params))]
        names = [str(n) for n in names]
        if len(names) != len(params):
            raise ValueError(f"DEMA got {len(names)} names for {len(params)} tensors")
        for i, p in enumerate(params):
            check_param(i, names[i], p)
        self.params = params
        self.names = names
        self.config = config if config is not None else DEMAConfig()
        if not isinstance(self.config, DEMAConfig):
            raise TypeError(f"DEMA config must be a cl_core.DEMAConfig, got {type(self.config).__name__}")
        self.reduce_stats = reduce_stats
        keys: dict[tuple, list[int]] = {}
        for i, p in enumerate(params):
            keys.setdefault((local_tensor(p).device, p.dtype), []).append(i)
        # Fail early on an unusable backend, before any training step.
        self.groups = [
            EngineGroup(indices, dev, dtype, resolve_backend(self.config.backend, dev, dtype, ema_dtype_for(self.config, dtype)))
            for (dev, dtype), indices in keys.items()
        ]
        self._started = False  # the groups' state and backends exist (first update)
        self.num_updates = 0
        self.skipped_steps = 0
        # Updates that found p.grad None, per tensor. Host-side knowledge, so a Python
        # list (no device sync); docs/design.md §2: a trainer hiding gradients must be seen.
        self._missing = [0] * len(params)
        self._warned_no_grads = False
        self.densified_grads = 0  # sparse gradients made dense (tensor-updates)
        self._warned_sparse = False
        self._one_pass = None  # the OnePassStep handed over by attach_one_pass (not copied)
        self._folded = True  # False after a two-pass update, until its partials are folded
        self._update_pending = False  # the last one-pass step left its EMA update to finish
        # Where α sits and why (cl_core/dema/regime.py): fed by every update, read when logging.
        self.regime = RegimeTracker(self.config)

    # ------------------------------------------------------------------ lifecycle
    @property
    def initialized(self) -> bool:
        return self._started

    def _locals(self, indices) -> list[torch.Tensor]:
        # non-contiguous θ/g: each backend reads them itself (the triton backend through
        # counted contiguous copies, the torch backend on its counted slow path)
        return [local_tensor(self.params[i]).detach() for i in indices]

    def _grads(self, indices, missing: list) -> list:
        if self.config.formula == "fixed":
            # 1 − β needs no gradient: the fixed EMA reads none (θ alone decides a skip)
            # and counts none missing (issue 28: it warned about gradients it never used)
            return [None] * len(indices)
        out = []
        for i in indices:
            g = self.params[i].grad
            if g is None:
                missing.append(i)
                out.append(None)
                continue
            g = local_tensor(g).detach()
            if g.layout != torch.strided:
                g = self._densify(i, g)
            out.append(g)
        return out

    def _densify(self, i: int, g: torch.Tensor) -> torch.Tensor:
        # A sparse gradient (nn.Embedding(sparse=True)) is averaged like its dense
        # equivalent: a full-size copy per update, the slower path (counted, logged once).
        self.densified_grads += 1
        if not self._warned_sparse:
            self._warned_sparse = True
            log.warning("DEMA: tensor %d (%r) has a %s gradient; it is made dense for every update "
                        "(a full-size copy; warned once, counted in engine.densified_grads)",
                        i, self.names[i], g.layout)
        return g.to_dense()

    def ensure_groups(self) -> None:
        """Create each group's state and backend (the EMA starts as the parameters now)."""
        if self._started:
            for g in self.groups:
                if g.backend is None:  # dropped by pickling / deepcopy: rebuilt on the copy's buffers
                    g.backend = make_backend(g.backend_name, g.state, self.config, g.dtype)
            return
        with torch.no_grad():
            for g in self.groups:
                g.state = GroupState(self._locals(g.indices), self.config)
                g.backend = make_backend(g.backend_name, g.state, self.config, g.dtype)
        self._started = True

    # ------------------------------------------------------------------ the one-pass step
    def attach_one_pass(self, impl) -> None:
        """Hand the engine its one-pass optimizer+DEMA implementation (an `OnePassStep`,
        cl_core/dema/onepass/protocols.py); DEMAOptimizer does it once, when it builds the engine or
        after a copy. None detaches it (after finishing what it left pending)."""
        self.flush()
        self._one_pass = impl

    @property
    def update_pending(self) -> bool:
        """True while the last one-pass step's EMA update is not finished (the EMA in memory
        lags one step; every read of it finishes it first)."""
        return self._update_pending

    def one_pass_update(self) -> Optional[str]:
        """One optimizer step and one DEMA update in one sweep, by the attached one-pass
        implementation. Returns None when it ran, else why it could not (nothing changed,
        any pending update finished): the caller then runs the optimizer step and `update()`."""
        impl = self._one_pass
        if impl is None:
            raise RuntimeError("DEMA.one_pass_update: no one-pass implementation is attached "
                               "(DEMAOptimizer attaches one; call update() after optimizer.step() otherwise)")
        self.ensure_groups()
        if self._folded is False:
            # the last update was a two-pass one: its backend may keep partial sums (Triton);
            # the one-pass step starts from the canonical state (d, started, has_prev)
            self._canonicalize()
        self._folded = True
        result = impl.step(self.groups, self.config.kernel_scalars())
        if result.refused is not None:
            self.flush()
            return result.refused
        self._update_pending = True
        for k, (g, pending) in enumerate(zip(self.groups, impl.pending_inputs())):
            if pending is not None:
                self.regime.record(k, g.state, *pending)
        self.regime.count_update()
        self.count_missing(result.missing)
        self.num_updates += 1
        return None

    def count_missing(self, indices) -> None:
        """At this update, the tensors at `indices` (positions in `self.params`) had no
        gradient. `update()` and `one_pass_update()` call it once per update with every
        such position (an empty list included). Host-side only."""
        counts = self._missing
        n = len(counts)
        indices = list(indices)
        for i in indices:
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n:
                raise ValueError(f"DEMA.count_missing: {i!r} is not a tensor position (0..{n - 1})")
        if self.config.formula == "fixed":
            return  # no gradient is used, so none is missing
        for i in indices:
            counts[i] += 1
        if n and not self._warned_no_grads and len(set(indices)) == n:
            self._warned_no_grads = True
            log.warning(
                "DEMA update found no gradient on any of its %d tensors: every tensor got the fallback "
                "alpha (a fixed EMA). Call update() after backward() and optimizer.step(), before "
                "zero_grad(); a trainer that frees gradients early hides them (warned once; "
                "stats.missing_grads counts per tensor)", n,
            )

    def update(self) -> None:
        """One DEMA step over all tensors; call right after `optimizer.step()`."""
        self.flush()
        self.ensure_groups()
        missing: list = []
        regime = self.regime
        with torch.no_grad():
            for k, g in enumerate(self.groups):
                grads = self._grads(g.indices, missing)
                regime.before_update(k, g.state)
                g.backend.update(self._locals(g.indices), grads, self.reduce_stats)
                regime.after_update(k, g.state, g.backend.last_stats(), [j for j, x in enumerate(grads) if x is None])
        regime.count_update()
        self._folded = False  # see one_pass_update
        self.count_missing(missing)
        self.num_updates += 1

    def skip_step(self) -> None:
        """The optimizer step was skipped (e.g. AMP overflow): count it, average nothing."""
        self.skipped_steps += 1

    def flush(self) -> None:
        """Finish the EMA update the last one-pass step left pending (no-op otherwise). If
        finishing raises, it stays pending (never dropped silently)."""
        if self._update_pending:
            self._one_pass.flush()
            self._update_pending = False

    # ------------------------------------------------------------------ the regime
    def mark_start(self) -> None:
        """Remember the parameters now as the start of a task, for `lag()` (a copy of each
        local tensor, kept until the next mark)."""
        self.regime.mark_start(self._locals(range(len(self.params))))

    def lag(self) -> Optional[float]:
        """‖θ* − θ‖₁ / ‖θ_start − θ‖₁ over every tensor since `mark_start()` (None before one,
        or when θ has not moved): how far back towards the start the EMA sits. One host sync."""
        return self.regime.lag(self.ema_tensors(), self._locals(range(len(self.params))))

    # ------------------------------------------------------------------ reading the EMA
    def _per_param(self, pick) -> list:
        out = [None] * len(self.params)
        for g in self.groups:
            for k, i in enumerate(g.indices):
                out[i] = pick(g.state, k)
        return out

    def ema_tensors(self) -> list[torch.Tensor]:
        """θ* per tensor (parameter shape; float32, or the parameter dtype with
        ema_dtype="param"); before the first update, the parameters."""
        self.flush()
        if not self._started:
            return [local_tensor(p).detach().to(ema_dtype_for(self.config, p.dtype)).clone() for p in self.params]
        self._canonicalize()
        return self._per_param(lambda s, k: s.ema_views[k].view(s.shapes[k]))

    def export_ema(self) -> list[torch.Tensor]:
        """θ* for export: one whole (parameter-shape) tensor per averaged parameter, in
        parameter order, the pending one-pass update finished. Here `ema_tensors()`; an
        engine over pieces of the parameters (DeepSpeedDEMA over ZeRO partitions) gathers
        them whole (then every rank of the partition group must call it)."""
        return self.ema_tensors()

    @property
    def model_params(self) -> list:
        """The model's own parameters the EMA belongs to, in parameter order: `params`; an
        engine over copies or fragments of them (DeepSpeedDEMA) names the originals."""
        return self.params

    def copy_to_params(self) -> None:
        """EMA replace: θ ← θ* (cast to each parameter's dtype)."""
        if not self._started and not self._update_pending:
            return
        with torch.no_grad():
            for p, e in zip(self.params, self.ema_tensors()):
                local_tensor(p).detach().copy_(e)

    @contextlib.contextmanager
    def swap(self):
        """Context manager: the parameters hold θ* inside, their own values after."""
        if not self._started and not self._update_pending:
            yield self
            return
        with torch.no_grad():
            backup = [local_tensor(p).detach().clone() for p in self.params]
            self.copy_to_params()
        try:
            yield self
        finally:
            with torch.no_grad():
                for p, b in zip(self.params, backup):
                    local_tensor(p).detach().copy_(b)

    @property
    def stats(self) -> DEMAStats:
        pending = self._pending_decision()
        if pending is not None:
            alpha, skips = pending
        elif not self._started:
            dev = local_tensor(self.params[0]).device if self.params else torch.device("cpu")
            alpha = torch.zeros(len(self.params), dtype=torch.float32, device=dev)
            skips = torch.zeros(len(self.params), dtype=torch.int64, device=dev)
        else:
            self._canonicalize()
            alpha = self._gather("alpha")
            skips = self._gather("skips")
        missing = torch.tensor(self._missing, dtype=torch.int64)
        return DEMAStats(alpha=alpha, nonfinite_skips=skips, missing_grads=missing,
                         updates=self.num_updates, skipped_steps=self.skipped_steps, regime=self.regime)

    def _pending_decision(self):
        """(alpha, skips) in parameter order from a fused step's pending state, or None."""
        if not self._update_pending or not self._started:
            return None
        per_group = self._one_pass.pending_stats()
        if len(per_group) != len(self.groups) or any(x is None for x in per_group):
            self.flush()  # a group cannot tell without finishing the update
            return None
        if len(self.groups) == 1:  # the one group holds every tensor, in order
            return per_group[0][0].clone(), per_group[0][1].clone()
        dev = self.groups[0].device
        alpha = torch.zeros(len(self.params), dtype=torch.float32, device=dev)
        skips = torch.zeros(len(self.params), dtype=torch.int64, device=dev)
        for g, (a, k) in zip(self.groups, per_group):
            idx = torch.tensor(g.indices, device=dev)
            alpha.index_copy_(0, idx, a.to(dev, torch.float32))
            skips.index_copy_(0, idx, k.to(dev, torch.int64))
        return alpha, skips

    def _gather(self, field: str) -> torch.Tensor:
        if not self.groups:
            dtype = {"started": torch.uint8, "has_prev": torch.uint8, "skips": torch.int64}.get(field, torch.float32)
            return torch.zeros(0, dtype=dtype)
        if len(self.groups) == 1:  # the one group holds every tensor, in order
            return getattr(self.groups[0].state, field).clone()
        dev = self.groups[0].device
        vals = self._per_param(lambda s, k: getattr(s, field)[k : k + 1].to(dev))
        return torch.cat(vals)

    def _canonicalize(self) -> None:
        # Backends that keep partial sums (Triton) fold them into the shared state.
        for g in self.groups:
            if g.backend is not None:  # a rebuilt backend has nothing to fold yet
                g.backend.canonicalize()

    # ------------------------------------------------------------------ copy.deepcopy / pickle
    def __getstate__(self) -> dict:
        """Everything but the backends (they hold native handles and pointer tables into
        this engine's buffers); the copy rebuilds them at its first use. A pending fused
        EMA update is finished first, so the copy continues exactly like the original."""
        self.flush()
        if self._started:
            self._canonicalize()
        state = dict(self.__dict__)
        state["groups"] = [dataclasses.replace(g, backend=None) for g in self.groups]
        state["_one_pass"] = None  # the copy's optimizer attaches its own (DEMAOptimizer does)
        state["_update_pending"] = False
        return state

    def __setstate__(self, state: dict) -> None:
        # copies written before the one-pass interface carried two closure slots, always
        # empty in a copy (the update was finished first)
        state.pop("_pending_flush", None)
        state.pop("_pending_stats", None)
        state.setdefault("_one_pass", None)
        state.setdefault("_folded", False)
        state.setdefault("_update_pending", False)
        self.__dict__.update(state)
        if "regime" not in state:  # copies written before the regime counters existed
            self.regime = RegimeTracker(self.config)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """Everything needed to continue exactly; tensors on CPU, in parameter order."""
        sd = {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "config": self.config.to_dict(),
            "names": list(self.names),
            "shapes": [list(local_tensor(p).shape) for p in self.params],
            "dtypes": [str(p.dtype).replace("torch.", "") for p in self.params],
            "num_updates": self.num_updates,
            "skipped_steps": self.skipped_steps,
            "missing_grads": torch.tensor(self._missing, dtype=torch.int64),
            "initialized": self._started,
        }
        if not self._started:
            return sd
        self.flush()
        self._canonicalize()
        sd["ema"] = [t.detach().cpu().clone() for t in self.ema_tensors()]
        sd["grad_prev"] = self._per_param(
            lambda s, k: s.gprev_views[k].view(s.shapes[k]).cpu().clone() if s.gprev_views is not None else None
        )
        for field in ("started", "has_prev", "d", "alpha", "skips"):
            sd[field] = self._gather(field).cpu()
        return sd

    def load_state_dict(self, sd: dict) -> None:
        """Restore a `state_dict()`; checks everything before changing anything."""
        check_state(sd, self.params, self.names)
        if {**DEMAConfig().to_dict(), **sd["config"]} != self.config.to_dict():  # older states lack newer fields
            log.warning("DEMA state was saved with config %s; continuing with %s", sd["config"], self.config.to_dict())
        self.flush()
        if not sd["initialized"]:
            self._started = False
            for g in self.groups:
                g.state = g.backend = None
        else:
            self.ensure_groups()
            with torch.no_grad():
                for g in self.groups:
                    state = g.state
                    for k, i in enumerate(g.indices):
                        state.ema_views[k].copy_(sd["ema"][i].reshape(-1))
                        gp = sd["grad_prev"][i]
                        if state.gprev_views is not None:
                            if gp is None:
                                state.gprev_views[k].zero_()
                            else:
                                state.gprev_views[k].copy_(gp.reshape(-1))
                        for field in ("started", "has_prev", "d", "alpha", "skips"):
                            getattr(state, field)[k] = sd[field][i]
                        if state.gprev_views is not None and gp is None:
                            state.has_prev[k] = 0
                    g.backend.state_loaded()
        self.num_updates = int(sd["num_updates"])
        self.skipped_steps = int(sd["skipped_steps"])
        # States saved before missing_grads existed load with zero counts.
        missing = sd.get("missing_grads")
        self._missing = [0] * len(self.params) if missing is None else [int(v) for v in missing.tolist()]
