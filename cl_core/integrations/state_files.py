"""The callbacks' DEMA state files: atomic writes, loading with an error that says what is
wrong with the file (empty, cut short, not a torch.save file), and the comparison of a saved
state's tensor names with the current ones.
"""
from __future__ import annotations

import os

import torch


def names_mismatch(saved, current, *, current_what: str, saved_what: str) -> str | None:
    """Why a saved DEMA state's tensor names differ from the current ones (None when equal):
    what is missing on each side, or that the order differs. Shared by the trainer callbacks."""
    saved, current = list(saved), list(current)
    if saved == current:
        return None
    lack = [n for n in current if n not in saved]
    extra = [n for n in saved if n not in current]
    detail = []
    if lack:
        detail.append(f"{len(lack)} {current_what} not in it, e.g. {lack[0]!r}")
    if extra:
        detail.append(f"{len(extra)} tensor(s) in it {saved_what}, e.g. {extra[0]!r}")
    if not detail:
        detail.append("the tensors are in a different order")
    return "; ".join(detail)


def atomic_save(obj, path: str) -> str:
    """``torch.save(obj, path)`` through a temporary file + fsync + ``os.replace``."""
    from cl_core.atomic_io import torch_save_atomic

    return str(torch_save_atomic(obj, path))


def load_state_file(path: str):
    """Load a file written by :func:`atomic_save` (tensors to CPU, ``weights_only``).

    A file that cannot be loaded raises ValueError saying which of these it is: empty, cut
    short (torch.save writes a zip archive; a truncated copy has its start but not the
    directory at its end, and torch then reports "[Errno 22] Invalid argument" or a miniz
    error), or not a torch.save file at all."""
    import zipfile

    if not os.path.isfile(path):
        raise FileNotFoundError(f"DEMA state file not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt / foreign file: say which one and what to do
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(4)
        fix = ("copy it again from where it was saved, or delete it to resume with the EMA restarted "
               "from the current weights")
        zip_start = b"PK\x03\x04".startswith(head) if len(head) < 4 else head == b"PK\x03\x04"
        if size == 0:
            why = f"is empty (0 bytes); {fix}"
        elif zip_start and not zipfile.is_zipfile(path):
            why = f"is truncated ({size} bytes, the end of the archive is missing: an interrupted copy or write); {fix}"
        elif not zip_start and not head.startswith(b"\x80"):  # neither zip nor legacy pickle format
            why = f"is not a torch.save file (it starts with {head!r}); point to the dema_state.pt that cl_core wrote"
        else:
            why = f"could not be read ({type(exc).__name__}: {exc})"
        raise ValueError(f"DEMA state file {path} {why}") from exc
