"""The run folder's lock: one `cl-core run` (or `continual.run`) writes a run folder at a time.

Two runs on the same --out would delete each other's temporary folders and double the
compute. The lock is an `fcntl.flock` on ``<out>/.cl_core.lock``: the kernel drops it when its
process dies (a crash, kill -9, a preempted job), so a stale lock is taken over with no
guessing about PIDs; the file holds the holder's PID, host and start time for the refusal.
"""
from __future__ import annotations

import errno
import os
import socket
import time
from pathlib import Path

LOCK_NAME = ".cl_core.lock"


class RunFolderBusy(ValueError):
    """Another live process holds the run folder's lock."""


class RunLock:
    """Held from `acquire()` to `release()` (or the process's end)."""

    def __init__(self, out):
        self.out = Path(out)
        self.path = self.out / LOCK_NAME
        self._fd = None
        self._made_folder = self._made_file = False

    def acquire(self) -> "RunLock":
        import fcntl

        self._made_folder = not self.out.exists()
        self._made_file = not self.path.exists()
        self.out.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            holder = _read_holder(self.path)
            raise RunFolderBusy(
                f"--out {self.out} is in use by another run ({holder}); wait for it to finish, or choose "
                "another --out folder") from None
        # A lock left by a dead process is simply taken (the kernel released it): its text is replaced.
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()} on host {socket.gethostname()}, since "
                         f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n".encode())
        except OSError:
            pass   # a full disk: the flock holds all the same; the run's first write names the file and the error
        self._fd = fd
        return self

    def release(self, *, undo: bool = False) -> None:
        """Drop the lock; with ``undo`` (the run was refused before it wrote anything), the
        lock file and the folder go too where this lock made them: a refused run leaves the
        folder as it found it."""
        if self._fd is None:
            return
        try:
            if undo and self._made_file:
                os.unlink(self.path)
                if self._made_folder and not any(self.out.iterdir()):
                    os.rmdir(self.out)
        except OSError:
            pass
        os.close(self._fd)   # closing the descriptor drops the flock
        self._fd = None


def _read_holder(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError:
        text = ""
    return text or "a process that is starting"
