"""The bundled base models' cache: a stage-1 base is trained once per seed and settings, and
reused by every later run (a first try with --steps 2 no longer pays the 1,200-step base).

The cache is ``$CL_CORE_BASE_CACHE`` (``off`` turns it off), else
``$XDG_CACHE_HOME/cl_core/bases`` (``~/.cache/cl_core/bases``). A base's key hashes every
setting stage 1 reads, the tokenizer's vocabulary, the source of the modules that build and train
the base, and the versions of torch and transformers: a change in any of them trains a new base. Entries are written with
`atomic_dir` (a half-copied base is never read) and copied into the run folder, which stays
complete on its own.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

from cl_core.atomic_io import atomic_dir

log = logging.getLogger(__name__)

# The RunConfig settings train_stage1 reads (cl_core.continual.training).
STAGE1_SETTINGS = ("multimodal", "hidden_size", "num_layers", "num_heads", "max_length", "stage1_steps",
                   "stage1_batch_size", "stage1_lr", "device")


def cache_root():
    """The cache folder, or None when turned off."""
    env = os.environ.get("CL_CORE_BASE_CACHE")
    if env is not None:
        return None if env.strip().lower() in ("", "0", "off", "no", "false") else Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "cl_core" / "bases"


def base_key(cfg, tokenizer, seed: int) -> str:
    import torch
    import transformers

    from cl_core.continual import synthetic, tiny_model, training

    # the code that builds and trains the base, by content: an edit to it trains a new base
    code = hashlib.sha256(b"".join(Path(m.__file__).read_bytes() for m in (synthetic, tiny_model, training)))
    tok = getattr(tokenizer, "tokenizer", tokenizer)
    settings = {name: getattr(cfg, name) for name in STAGE1_SETTINGS}
    text = json.dumps({"settings": settings, "seed": seed, "vocab": sorted(tok.get_vocab().items()),
                       "versions": [code.hexdigest(), torch.__version__, transformers.__version__]},
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def fetch(cfg, tokenizer, seed: int, folder: Path) -> bool:
    """Copy the cached base into ``folder``; False when there is none (or no cache)."""
    root = cache_root()
    if root is None:
        return False
    entry = root / base_key(cfg, tokenizer, seed)
    if not (entry / "config.json").is_file():
        return False
    with atomic_dir(folder) as tmp:
        shutil.copytree(entry, tmp, dirs_exist_ok=True)
    log.info("seed %d: stage-1 base reused from the cache %s (CL_CORE_BASE_CACHE=off to train it again)",
             seed, entry)
    return True


def store(cfg, tokenizer, seed: int, folder: Path) -> None:
    """Put the base just trained in ``folder`` into the cache; a cache that cannot be
    written is said once and skipped (the run has its own copy)."""
    root = cache_root()
    if root is None:
        return
    entry = root / base_key(cfg, tokenizer, seed)
    try:
        with atomic_dir(entry) as tmp:
            shutil.copytree(folder, tmp, dirs_exist_ok=True)
    except OSError as exc:
        log.warning("the stage-1 base was not cached in %s (%s); later runs train it again", root, exc)
