"""The DEMA engine (docs/design.md §2, §3): its config, per-group state, backend
selection, the reference backend, the engine itself, DEMAOptimizer with the one-pass
fused step, and the distributed helpers. The kernels that sweep data live in
`cl_core.kernels`."""
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
