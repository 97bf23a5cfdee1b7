"""Checkpoint validation of the DEMA engine: every field of a saved state dict and every
parameter handed to the engine, checked before anything changes, each error naming the
tensor and the field and saying how to fix it (docs/engine.md, "Checkpoints")."""
from __future__ import annotations

import numbers
import re

import torch

from cl_core.dema.config import DEMAConfig
from cl_core.dema.state import ema_dtype_for, local_tensor

STATE_FORMAT = "cl_core.DEMA"
STATE_VERSION = 1


def check_state(sd, params, names) -> None:
    """Every field of a DEMA state dict, checked against the engine's params and names
    before anything changes."""
    if not isinstance(sd, dict) or sd.get("format") != STATE_FORMAT:
        raise ValueError("not a cl_core DEMA state dict (missing format tag 'cl_core.DEMA')")
    if sd.get("version") != STATE_VERSION:
        raise ValueError(f"DEMA state version {sd.get('version')!r} is not supported (this cl_core reads {STATE_VERSION})")
    for key in ("config", "shapes", "dtypes", "num_updates", "skipped_steps", "initialized"):
        if key not in sd:
            raise ValueError(f"DEMA state is missing {key!r}; the file is incomplete or was not written by DEMA.state_dict()")
    n = len(params)
    if not isinstance(sd["config"], dict):
        raise ValueError(f"DEMA state 'config' must be a dict, got {type(sd['config']).__name__}")
    for key in ("shapes", "dtypes"):
        if not isinstance(sd[key], (list, tuple)):
            raise ValueError(f"DEMA state {key!r} must be a list, got {type(sd[key]).__name__}")
    if len(sd["shapes"]) != n or len(sd["dtypes"]) != n:
        raise ValueError(
            f"DEMA state holds {len(sd['shapes'])} tensors but this engine has {n}; "
            "was it saved for another model or another set of trainable parameters?"
        )
    check_names(sd.get("names"), names)
    for i, p in enumerate(params):
        name = names[i]
        shape = list(local_tensor(p).shape)
        saved = sd["shapes"][i]
        if not isinstance(saved, (list, tuple)) or list(saved) != shape:
            raise ValueError(f"DEMA state for tensor {i} ({name!r}) has shape {saved!r}, the parameter has {shape}")
        want = str(p.dtype).replace("torch.", "")
        if sd["dtypes"][i] != want:
            raise ValueError(f"DEMA state for tensor {i} ({name!r}) was saved for dtype {sd['dtypes'][i]!r}, the parameter is {want}")
    for key in ("num_updates", "skipped_steps"):
        _check_count(key, sd[key])
    if not isinstance(sd["initialized"], bool):
        raise ValueError(f"DEMA state 'initialized' must be True or False, got {sd['initialized']!r}")
    missing = sd.get("missing_grads")
    if missing is not None:
        _check_vector("missing_grads", missing, n, torch.int64)
        if bool((missing < 0).any()):
            raise ValueError("DEMA state 'missing_grads' holds negative counts; the file is corrupt")
    if not sd["initialized"]:
        return
    for key in ("ema", "grad_prev", "started", "has_prev", "d", "alpha", "skips"):
        if key not in sd:
            raise ValueError(f"DEMA state is missing {key!r}")
    for key in ("ema", "grad_prev"):
        if not isinstance(sd[key], (list, tuple)) or len(sd[key]) != n:
            got = len(sd[key]) if isinstance(sd[key], (list, tuple)) else type(sd[key]).__name__
            raise ValueError(f"DEMA state {key!r} must be a list of {n} tensors, got {got}")
    for i, p in enumerate(params):
        shape = list(local_tensor(p).shape)
        for key in ("ema", "grad_prev"):
            t = sd[key][i]
            if t is None and key == "grad_prev":
                continue
            where = f"DEMA state {key} of tensor {i} ({names[i]!r})"
            if not isinstance(t, torch.Tensor) or list(t.shape) != shape:
                got = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{where} has shape {got}, expected {shape}")
            # float32 or the parameter's half dtype: a state loads across ema_dtype settings
            allowed = {torch.float32, ema_dtype_for(DEMAConfig(ema_dtype="param"), p.dtype)}
            if t.dtype not in allowed:
                raise ValueError(f"{where} has dtype {t.dtype}, expected one of {sorted(map(str, allowed))}")
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{where} holds NaN/inf; the file is corrupt")
    for key, dtype in (("started", torch.uint8), ("has_prev", torch.uint8), ("d", torch.float32),
                       ("alpha", torch.float32), ("skips", torch.int64)):
        _check_vector(key, sd[key], n, dtype)
    started, has_prev = sd["started"], sd["has_prev"]
    for key, t in (("started", started), ("has_prev", has_prev)):
        if bool((t > 1).any()):
            raise ValueError(f"DEMA state {key!r} must hold only 0 and 1, got {t.tolist()}")
    if bool((has_prev > started).any()):
        raise ValueError("DEMA state has a previous gradient for a tensor whose EMA has not started; the file is corrupt")
    d, alpha = sd["d"], sd["alpha"]
    if not bool(torch.isfinite(d).all()) or bool((d < 0).any()):
        raise ValueError("DEMA state 'd' (an L1 distance) must be finite and >= 0")
    if not bool(torch.isfinite(alpha).all()) or bool((alpha < 0).any()) or bool((alpha >= 1).any()):
        raise ValueError("DEMA state 'alpha' must lie in [0, 1)")
    if bool((sd["skips"] < 0).any()):
        raise ValueError("DEMA state 'skips' holds negative counts; the file is corrupt")

def check_names(saved, names) -> None:
    """Names are compared only where both sides have real ones: tensors of one shape
    (LoRA A of every layer) would otherwise load into each other silently. Names the
    library makes up from positions (`param_{i}` of an unnamed engine,
    `param_groups.G.params.I` of DEMAOptimizer) say nothing about the tensor and are
    not compared; shapes and dtypes still are."""
    if saved is None:
        return
    if not isinstance(saved, (list, tuple)) or not all(isinstance(x, str) for x in saved):
        raise ValueError("DEMA state 'names' must be a list of strings")
    if len(saved) != len(names):
        raise ValueError(f"DEMA state names {len(saved)} tensors but this engine has {len(names)}")
    if _positional(saved) or _positional(names) or list(saved) == list(names):
        return
    mine = set(names)
    for i, (s, m) in enumerate(zip(saved, names)):
        if s != m:
            how = "the tensors are in another order" if s in mine else "it was saved for another tensor"
            raise ValueError(
                f"DEMA state tensor {i} is {s!r} but this engine's tensor {i} is {m!r} ({how}); "
                "build the engine over the same tensors in the same order as when it was saved"
            )


# Dtypes the EMA maths is defined for (it is computed in float32 or wider).
PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_param(i: int, name, p: torch.Tensor) -> None:
    """Refuse, up front, a tensor the EMA cannot average (naming it and saying why)."""
    what = f"DEMA params[{i}]" + (f" ({name!r})" if name is not None else "")
    if p.dtype not in PARAM_DTYPES:
        kind = "complex" if p.is_complex() else "boolean" if p.dtype == torch.bool else \
            "integer" if not p.is_floating_point() else "low-precision float"
        raise TypeError(
            f"{what} has dtype {p.dtype} ({kind}): an EMA of it cannot be written back exactly "
            f"(it would be truncated or lose a part); DEMA averages float32, bfloat16, float16 and "
            f"float64 tensors; leave this tensor out of params"
        )
    if local_tensor(p).device.type == "meta":
        raise ValueError(f"{what} is a meta tensor (no data): materialise the model (e.g. "
                         f"model.to_empty(device=...) and load the weights) before building DEMA")
    if p.layout != torch.strided:
        raise ValueError(f"{what} has layout {p.layout}: DEMA averages dense (strided) tensors")


_POSITIONAL = re.compile(r"param_\d+|param_groups\.\d+\.params\.\d+")


def _positional(names) -> bool:
    """True when every name is one the library made up from a position."""
    return all(_POSITIONAL.fullmatch(n) for n in names)


def _check_count(key: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"DEMA state {key!r} must be a non-negative integer, got {value!r}")


def _check_vector(key: str, t, n: int, dtype: torch.dtype) -> None:
    if not isinstance(t, torch.Tensor) or tuple(t.shape) != (n,) or t.dtype != dtype:
        got = f"{t.dtype} of shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"DEMA state {key!r} must be a {dtype} tensor of shape ({n},), got {got}")
