"""Atomic file writes: a reader sees the old file or the new one, never a torn mix.

Every writer in atlas_kernels goes through :func:`atomic_write` (or the helpers built on it):
write to a temporary file in the same folder, flush and ``fsync`` it, ``os.replace`` it over the
final path, then ``fsync`` the folder so the rename itself survives a power cut. A crash at any
point leaves the previous good file in place and at worst a ``.<name>.atlas-tmp-*`` leftover,
which :func:`clean_leftovers` removes and readers never look at.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import Dict, Iterator, Optional

__all__ = ["atomic_write", "atomic_write_text", "atomic_write_json", "atomic_save_safetensors",
           "atomic_append_line", "clean_leftovers", "TMP_MARK"]

TMP_MARK = ".atlas-tmp-"


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path, mode: str = "wb", encoding: Optional[str] = None) -> Iterator:
    """Context manager yielding a file object; on a clean exit the data replaces ``path`` atomically.
    On an exception the temporary file is removed and ``path`` is untouched."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + TMP_MARK, dir=folder)
    try:
        with os.fdopen(fd, mode, encoding=encoding) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(folder)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_text(path, text: str) -> None:
    with atomic_write(path, "w", encoding="utf-8") as fh:
        fh.write(text)


def atomic_write_json(path, obj, **kwargs) -> None:
    kwargs.setdefault("indent", 2)
    atomic_write_text(path, json.dumps(obj, **kwargs) + "\n")


def atomic_save_safetensors(tensors: Dict, path, metadata: Optional[Dict[str, str]] = None) -> None:
    """``safetensors.torch.save_file`` made atomic: written to a temporary file in the same folder
    (streamed, not serialised in memory first: a 2.7 GB task-vector file would otherwise cost two
    more copies of itself in RAM), fsynced, then renamed over ``path``."""
    from safetensors.torch import save_file

    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + TMP_MARK, dir=folder)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(folder)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_append_line(path, line: str) -> None:
    """Append one line to a text file (a JSONL log) atomically: the old content plus the new line
    replace the file together, so a crash never leaves half a line."""
    path = os.fspath(path)
    old = b""
    if os.path.exists(path):
        with open(path, "rb") as fh:
            old = fh.read()
        if old and not old.endswith(b"\n"):
            old += b"\n"
    with atomic_write(path, "wb") as fh:
        fh.write(old + line.rstrip("\n").encode("utf-8") + b"\n")


def clean_leftovers(folder) -> int:
    """Remove temporary files a crashed atomic write left in ``folder``; returns how many."""
    n = 0
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        return 0
    for name in os.listdir(folder):
        if TMP_MARK in name and name.startswith("."):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(folder, name))
                n += 1
    return n
