"""The ``--out`` folder of one ``ater-train`` run: created when missing, locked
for the run's lifetime, checked before any training, and removed again when a
failed command leaves nothing in it.

* **One run per folder.** An exclusive ``flock`` on ``OUT/.ater-train.lock``
  is held while the run lives; a second run on the same folder is refused with
  the holder's pid and host. The kernel drops the lock when the process dies,
  even by SIGKILL, so a crashed run never blocks the next one.
* **No silent mixing.** A folder that already holds files is refused unless
  ``--resume`` (continue the run) or ``--overwrite`` (replace it: the run files
  ater-train writes are deleted first, so no stale ``best.pt`` survives).
* **Checked up front.** ``--resume`` without ``OUT/last.pt`` and an unwritable
  folder are errors before any data is loaded or any epoch is trained.
* **No litter.** When the command fails and the folder (or any parent) was
  created by it and holds nothing else, it is removed.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import tempfile
import time
from typing import List, Optional

from .common import CliError, first_line

LOCK_NAME = ".ater-train.lock"
# What ater-train writes into --out: --overwrite deletes exactly these.
RUN_FILES = ("last.pt", "best.pt", "metrics.json", "metrics.csv", "config.toml", "curves.png")


def _missing_folders(path: str) -> List[str]:
    """The folders ``os.makedirs(path)`` would create, deepest first."""
    missing = []
    path = os.path.abspath(path)
    while not os.path.exists(path):
        missing.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return missing


class RunDir:
    """Context manager owning ``--out`` for one run (see the module docstring)."""

    def __init__(self, path: str, *, resume: bool, overwrite: bool):
        if resume and overwrite:
            raise CliError("--resume and --overwrite exclude each other: --resume continues OUT's run, "
                           "--overwrite replaces it")
        self.path, self.resume, self.overwrite = path, resume, overwrite
        self._fd: Optional[int] = None
        self._created: List[str] = []

    def __enter__(self) -> "RunDir":
        path = self.path
        if os.path.exists(path) and not os.path.isdir(path):
            raise CliError(f"--out {path} exists and is not a folder")
        if self.resume and not os.path.isfile(os.path.join(path, "last.pt")):
            raise CliError(f"--resume: {os.path.join(path, 'last.pt')} not found (nothing to continue); "
                           f"drop --resume to start a new run")
        self._created = _missing_folders(path)
        try:
            os.makedirs(path, exist_ok=True)
            self._lock()
            if not self.resume:
                self._check_empty_or_overwrite()
            self._probe_writable()
        except BaseException:
            self.__exit__(*(None,) * 3, failed=True)
            raise
        return self

    def _lock(self) -> None:
        lock_path = os.path.join(self.path, LOCK_NAME)
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise CliError(f"--out {self.path} is not writable ({first_line(exc)})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 512).decode(errors="replace").strip() or "unknown process"
            os.close(fd)
            raise CliError(f"--out {self.path} is in use by another ater-train run ({holder}); "
                           f"wait for it to finish or choose another --out") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}"
                 .encode())
        self._fd = fd

    def _check_empty_or_overwrite(self) -> None:
        entries = sorted(e for e in os.listdir(self.path) if e != LOCK_NAME and not e.endswith(".tmp"))
        if not entries:
            return
        if not self.overwrite:
            shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
            raise CliError(f"--out {self.path} already holds files ({shown}); pass --resume to continue that run, "
                           f"--overwrite to replace it, or choose another --out")
        for name in RUN_FILES:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.path, name))

    def _probe_writable(self) -> None:
        try:
            with tempfile.TemporaryFile(dir=self.path) as f:
                f.write(b"ater-train write probe")
        except OSError as exc:
            raise CliError(f"--out {self.path} is not writable ({first_line(exc)})") from None

    def __exit__(self, exc_type, exc, tb, failed: Optional[bool] = None) -> None:
        failed = exc_type is not None if failed is None else failed
        if self._fd is not None:
            os.close(self._fd)  # releases the flock
            self._fd = None
        if failed and self._created:
            self._remove_if_empty()

    def _remove_if_empty(self) -> None:
        """Remove the folders this command created, if nothing but the lock is inside."""
        deepest = self._created[0]
        with contextlib.suppress(OSError):
            if set(os.listdir(deepest)) <= {LOCK_NAME}:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(deepest, LOCK_NAME))
                for folder in self._created:  # deepest first; stops at the first non-empty one
                    os.rmdir(folder)
