"""The run folder's bookkeeping: ``state.json`` (per chain the finished tasks, one
:class:`TaskRecord` each), the check that a folder holds this run, and JSON helpers.

    state = RunState.load(out / "state.json")
    done = state.finished("dema", 0)        # list[TaskRecord], in task order
    done.append(TaskRecord(...)); state.save()

On disk every record is a plain JSON object; records written by older versions (fewer
fields) are read with the missing fields filled in as those versions behaved.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from cl_core.atomic_io import write_json_atomic

STATE_FORMAT = "cl_core.runner.state"  # the on-disk tag, kept from before the move
STATE_VERSION = 1


def write_json(path, obj) -> None:
    write_json_atomic(obj, path, indent=1)


def read_json(path: Path, what: str):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{what} {path} is not valid JSON ({exc.msg}); the run folder is damaged") from None


@dataclass
class TaskRecord:
    """What happened on one task of one chain (method, seed)."""

    task: str                   # task name
    row: list                   # accuracy (%) on every task after this one
    loss: float                 # mean training loss
    adapter: str                # the PEFT adapter trained
    group: int                  # its LoRA set (group id)
    reused: bool                # the task re-trained an existing set
    ema: bool                   # an EMA (fixed or dynamic) was on
    adapters: str               # folder (in the chain folder) of the adapters after this task
    dema: Optional[bool] = None         # the dynamic EMA was on (None only while reading an old record)
    init_from: Optional[int] = -1       # task whose weights the set started from (None: fresh; -1: unknown)
    similarities: list = field(default_factory=list)   # grouping: similarity to each earlier group
    alpha_mean: list = field(default_factory=list)     # mean α over tensors, per optimizer step
    alpha_counts: dict = field(default_factory=dict)   # α histogram of the task (cl_core.continual.alpha)
    regime: dict = field(default_factory=dict)         # the task's DEMA regime (RegimeReport.to_record; {}: no EMA)
    train_seconds: float = 0.0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, where: str = "state file") -> "TaskRecord":
        names = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        if not isinstance(d, dict) or required - set(d):
            missing = sorted(required - set(d)) if isinstance(d, dict) else sorted(required)
            raise ValueError(f"{where}: a finished-task record lacks {missing}; the run folder is damaged")
        return cls(**{k: v for k, v in d.items() if k in names})


class RunState:
    """``state.json``: per chain (method, seed) the finished tasks, in order."""

    def __init__(self, path: Path, data: dict | None = None, *, writable: bool = True):
        self.path = Path(path)
        self.writable = writable   # False on the ranks of a launcher other than 0: they never write
        self.data = data or {"format": STATE_FORMAT, "version": STATE_VERSION, "chains": {}, "base": {}}
        self._records: dict = {}  # chain key -> list[TaskRecord] (the live view of data["chains"])
        for key, chain in self.data["chains"].items():
            records = [TaskRecord.from_dict(t, f"{self.path} ({key})") for t in chain["tasks"]]
            self._records[key] = _fill_old_fields(records, chain.get("method", key.split("/")[0]))

    @classmethod
    def load(cls, path: Path, *, writable: bool = True) -> "RunState":
        path = Path(path)
        if not path.exists():
            return cls(path, writable=writable)
        data = read_json(path, "state file")
        if data.get("format") != STATE_FORMAT or data.get("version") != STATE_VERSION:
            raise ValueError(f"state file {path} is not a cl_core run state (version {STATE_VERSION})")
        return cls(path, data, writable=writable)

    def save(self) -> None:
        if not self.writable:
            return
        for key, records in self._records.items():
            self.data["chains"][key]["tasks"] = [r.to_dict() for r in records]
        write_json(self.path, self.data)

    @staticmethod
    def key(method: str, seed: int) -> str:
        return f"{method}/seed{seed}"

    def finished(self, method: str, seed: int) -> list:
        """The chain's finished tasks (list[TaskRecord]); append to it, then save()."""
        key = self.key(method, seed)
        self.data["chains"].setdefault(key, {"method": method, "seed": seed, "tasks": []})
        return self._records.setdefault(key, [])

    @property
    def base(self) -> dict:
        """Per seed (str) the base model's zero-shot row (and stage-1 score)."""
        return self.data["base"]


def _fill_old_fields(records: list, method: str) -> list:
    """Records written before ``dema`` and ``init_from`` existed: those versions used the
    dynamic EMA on every EMA task of a method other than ``ema``, and started a re-trained
    set from its own latest weights and a new set fresh."""
    last_of_group: dict = {}
    for j, r in enumerate(records):
        if r.dema is None:
            r.dema = bool(r.ema) and method != "ema"
        if r.init_from == -1:
            r.init_from = last_of_group.get(r.group) if r.reused else None
        last_of_group[r.group] = j
    return records


def check_run_folder(out: Path, config: dict, defaults: Optional[dict] = None) -> None:
    """Refuse, before anything is trained: a folder that holds another run (other settings)
    or something else, and one that cannot be made or written (a file, a path under a file,
    a read-only or someone else's folder).

    ``config`` is this run's config dict; settings missing from the saved one (a folder
    written before they existed) compare as ``defaults[key]``. Temporary files of an
    interrupted write (``.NAME.*.tmp``, and ``.NAME.tmp`` folders of a build-then-swap) are
    never read: a folder holding only those is a new run folder, and once a folder is
    accepted they are removed."""
    import logging
    import os
    import re
    import shutil

    from cl_core.continual.run_lock import LOCK_NAME

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder; choose a new or empty folder (or a run to resume)")
    existing = out
    while not existing.exists():  # the nearest existing folder: where the run folder will be made
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"--out {out}: {existing} is a file, so no folder can be made under it; "
                         "choose another --out folder")
    if not os.access(existing, os.W_OK | os.X_OK):  # permissions, and read-only mounts (EROFS) for root too
        raise ValueError(f"--out {out}: cannot write in {existing} (read-only file system or no permission); "
                         "choose another --out folder, or fix its permissions")
    if not out.exists():
        # Some folders refuse new entries whatever their permission bits say (/proc, /sys, a
        # mount that rejects them): try one, and remove it, so the run fails here naming
        # --out instead of later with a bare errno.
        import tempfile

        try:
            os.rmdir(tempfile.mkdtemp(prefix=".cl_core-probe-", suffix=".tmp", dir=existing))
        except OSError as exc:
            raise ValueError(f"--out {out}: no folder can be made in {existing} ({exc.strerror or exc}); "
                             "choose another --out folder") from None
    stale = re.compile(r"^\..+\.tmp$")
    cfg_path = out / "config.json"
    if cfg_path.exists():
        saved = read_json(cfg_path, "run config")
        defaults = defaults or {}
        diff = [k for k in sorted(set(saved) | set(config))
                if saved.get(k, defaults.get(k)) != config.get(k)]
        if diff:
            detail = ", ".join(f"{k}: {saved.get(k, defaults.get(k))!r} there vs {config.get(k)!r} now"
                               for k in diff[:4])
            raise ValueError(f"{out} holds a run with other settings ({detail}); resume it with its "
                             "own settings, or choose another --out folder")
    elif out.exists() and any(not stale.match(p.name) and p.name != LOCK_NAME for p in out.iterdir()):
        raise ValueError(f"{out} exists and is not a cl_core run folder (no config.json); "
                         "choose an empty or new --out folder")
    removed = 0
    for root, dirs, files in os.walk(out):  # nothing when the folder does not exist yet
        for name in [d for d in dirs if stale.match(d)]:
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
            dirs.remove(name)
            removed += 1
        for name in [f for f in files if stale.match(f)]:
            try:
                os.unlink(os.path.join(root, name))
                removed += 1
            except FileNotFoundError:
                pass
    if removed:
        logging.getLogger(__name__).info(
            "%s: removed %d temporary file(s) left by an interrupted write", out, removed)
