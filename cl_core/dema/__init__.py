"""The DEMA engine (docs/design.md §2, §3, §7): its config, per-group state, the engine
itself (the one owner of the state), its checkpoint validation, the two-pass backends
and their selection (twopass/: reference, torch, triton), DEMAOptimizer with the
one-pass step, its protocols and drivers (onepass/), and the distributed helpers. The
kernels that sweep data live in `cl_core.kernels`, below this layer."""
from cl_core.dema.config import DEMAConfig

__all__ = ["DEMA", "DEMAConfig", "DEMAOptimizer"]


def __getattr__(name):
    # Lazy, like cl_core itself: importing the config must not import torch's optimizers.
    if name == "DEMA":
        from cl_core.dema.engine import DEMA

        return DEMA
    if name == "DEMAOptimizer":
        from cl_core.dema.optim import DEMAOptimizer

        return DEMAOptimizer
    raise AttributeError(f"module 'cl_core.dema' has no attribute {name!r}")
