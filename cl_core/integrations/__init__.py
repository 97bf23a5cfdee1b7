"""Integrations with trainers and libraries, above the engine (docs/design.md §6).

`core` holds what every trainer integration shares; `hf` (transformers Trainer, TRL,
accelerate), `lightning`, `deepspeed` and `fsdp` sit on it; `peft` exports the EMA as an
adapter. Each module imports its third-party library on import and says which
`pip install ".[...]"` extra brings it when it is missing.
"""
