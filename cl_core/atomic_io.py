"""Atomic file writes: a temporary file in the same folder, fsync, then os.replace.

A crash or Ctrl-C mid-write leaves the old file (or none), never half a file. Used for
codebooks, checkpoints of the DEMA state, run state and reports.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def usual_dir_mode(folder) -> None:
    """Give a `tempfile.mkdtemp` folder (made 0700) the mode a plain mkdir gives it under the
    umask, as its siblings have: a folder moved into place must not turn private."""
    os.chmod(folder, 0o777 & ~_umask())


def atomic_write(path, write, binary: bool = False) -> Path:
    """Call `write(f)` on a temporary file next to `path`, then move it into place.

    An OSError (a full disk, a read-only folder, ...) names `path`, not the temporary file
    (a failed write() or fsync() names no file at all); the temporary file is removed."""
    path = Path(path).absolute()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError as exc:  # a file where a folder of the path should be: say so
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), exc.filename) from exc
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual mode
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        if isinstance(exc, OSError) and exc.errno is not None and exc.filename in (None, tmp):
            raise OSError(exc.errno, exc.strerror, str(path)) from exc  # the subclass follows errno
        raise
    return path


def write_json_atomic(obj, path, **dump_kwargs) -> Path:
    """`json.dump(obj)` (indent 2 unless told otherwise) written atomically."""
    dump_kwargs.setdefault("indent", 2)
    return atomic_write(path, lambda f: (json.dump(obj, f, **dump_kwargs), f.write("\n")))


def torch_save_atomic(obj, path) -> Path:
    """`torch.save(obj, path)` written atomically."""
    import torch

    return atomic_write(path, lambda f: torch.save(obj, f), binary=True)


@contextlib.contextmanager
def atomic_dir(path):
    """Build a folder under a temporary name next to `path` (yielded); it replaces `path`
    only when the block finishes, so a crash leaves the old folder or a stray temp one.

    The temporary name is unique per writer (``.NAME.<random>.tmp``): two writers never
    delete each other's half-built folder; the last one to finish wins."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    usual_dir_mode(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for _ in range(3):   # another writer may put its folder in place between rmtree and replace
        shutil.rmtree(path, ignore_errors=True)
        try:
            os.replace(tmp, path)
            return
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
    os.replace(tmp, path)


# One line for the user per file-system error: what happened and what to do.
DISK_HINTS = {
    errno.ENOSPC: "the disk is full: free some space and run the same command again",
    errno.EDQUOT: "the disk quota is used up: free some space and run the same command again",
    errno.EROFS: "the file system is read-only: choose a folder on a writable disk",
    errno.EACCES: "fix the permissions, or choose another location",
    errno.EPERM: "fix the permissions, or choose another location",
    errno.ENOTDIR: "a part of the path is a file, not a folder: choose another path",
    errno.EISDIR: "it is a folder, not a file: choose a file path",
}


def describe_os_error(exc: OSError) -> str:
    """One line for a file-system error: the path, what happened, and what to do."""
    what = exc.strerror or str(exc)
    where = f"{exc.filename}: " if exc.filename else ""
    hint = DISK_HINTS.get(exc.errno)
    code = f" ({errno.errorcode[exc.errno]})" if exc.errno in errno.errorcode else ""
    return f"{where}{what}{code}" + (f"; {hint}" if hint else "")
