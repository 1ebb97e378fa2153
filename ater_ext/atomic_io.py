"""Atomic writes of result files: a reader (or a later ``--resume``) sees either
the previous complete file or the new complete file, never a truncated one.

Every file is written to a temporary file in the destination's own folder
(same file system, so the final rename is atomic), flushed and ``fsync``'d,
then moved over the destination with :func:`os.replace`; the folder is
``fsync``'d too so that the rename survives a power cut. A process killed at
any point leaves at most a stray ``.<name>.*.tmp`` file beside the untouched
destination. A symbolic link planted at the destination is replaced by the
new file, never written through.

Every writer of results in ater_ext (checkpoints, metrics, robustness files,
figures, benchmark reports) goes through :func:`atomic_write`.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import tempfile
from typing import IO, Dict, Iterator, List, Sequence

__all__ = ["atomic_write", "write_bytes", "write_text", "write_json", "write_csv", "save_torch", "save_figure"]


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some file systems do not open folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "wb", **open_kwargs) -> Iterator[IO]:
    """Open a temporary file beside ``path`` for writing; on a clean exit it
    replaces ``path`` atomically, on an exception it is removed and ``path`` is
    left as it was. ``mode`` is ``"wb"`` or ``"w"`` (text; ``open_kwargs`` such
    as ``newline=""`` are passed on)."""
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write: mode must be 'wb' or 'w', got {mode!r}")
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; results are meant to be read
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(folder)


def write_bytes(path: str, data: bytes) -> None:
    with atomic_write(path, "wb") as f:
        f.write(data)


def write_text(path: str, text: str) -> None:
    with atomic_write(path, "w", encoding="utf-8") as f:
        f.write(text)


def write_json(path: str, obj) -> None:
    """``obj`` as indented JSON (serialised before the file is opened, so an
    unserialisable value leaves the previous file intact)."""
    write_text(path, json.dumps(obj, indent=2) + "\n")


def write_csv(path: str, rows: Sequence[Dict[str, object]]) -> None:
    """Rows of dicts as CSV; the columns are every key, in first-seen order."""
    columns: List[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buffer.getvalue())


def save_torch(path: str, obj) -> None:
    """``torch.save(obj)`` to ``path``, atomically."""
    import torch

    with atomic_write(path, "wb") as f:
        torch.save(obj, f)


def save_figure(fig, path: str, **savefig_kwargs) -> None:
    """A matplotlib figure to ``path`` (format from the extension), atomically."""
    fmt = os.path.splitext(path)[1].lstrip(".") or "png"
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format=fmt, **savefig_kwargs)

