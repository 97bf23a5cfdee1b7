"""cl_core: fused dynamic-EMA (LCIA "DEMA") and instruction grouping for continual LoRA tuning.

Public names (docs/design.md §6). Heavy parts (transformers, scikit-learn) are imported
on first use, so `import cl_core` stays light. A name whose optional packages are missing
raises, on first use, an ImportError naming the extra to install: `DEMACallback` and
`save_ema_adapter` need `pip install ".[hf]"`.
"""
from cl_core.dema.config import DEMAConfig

__version__ = "0.1.0"

_LAZY = {
    "DEMA": ("cl_core.dema.engine", "DEMA"),
    "DEMAOptimizer": ("cl_core.dema.optim", "DEMAOptimizer"),
    "DEMACallback": ("cl_core.integrations.hf", "DEMACallback"),
    "InstructionGrouper": ("cl_core.grouping", "InstructionGrouper"),
    "save_ema_adapter": ("cl_core.integrations.peft", "save_ema_adapter"),
    "metrics": ("cl_core.metrics", None),
}

__all__ = ["DEMAConfig", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module_name, attr = _LAZY[name]
        module = importlib.import_module(module_name)
        value = module if attr is None else getattr(module, attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'cl_core' has no attribute {name!r}")
