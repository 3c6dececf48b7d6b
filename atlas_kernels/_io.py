"""Atomic file writes: a reader sees the old file or the new one, never a torn mix.

Every writer in atlas_kernels goes through :func:`atomic_write` (or the helpers built on it):
write to a temporary file in the same folder, flush and ``fsync`` it, ``os.replace`` it over the
final path, then ``fsync`` the folder so the rename itself survives a power cut. A crash at any
point leaves the previous good file in place and at worst a ``.<name>.atlas-tmp-*`` leftover,
which :func:`clean_leftovers` removes and readers never look at.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from typing import Dict, Iterator, Optional

__all__ = ["atomic_write", "atomic_path", "atomic_write_text", "atomic_write_json", "atomic_save_safetensors",
           "atomic_torch_save", "atomic_append_line", "atomic_replace_dir", "clean_leftovers", "TMP_MARK",
           "DiskFullError"]

TMP_MARK = ".atlas-tmp-"


class DiskFullError(OSError):
    """The device ran out of space while a file was written; the file under its final name is
    untouched (the previous one, if any, is kept) and the temporary file is gone."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()


def _disk_full(exc: BaseException, folder: str) -> bool:
    """True when a failed write failed for want of space: an ENOSPC/EDQUOT OSError, the same error
    as safetensors reports it (its own exception type, "os error 28"), or any other writer's error
    (torch.save says "unexpected pos") while the device is full (looked at before the temporary
    file is removed, which frees the space again)."""
    if isinstance(exc, DiskFullError):
        return False  # already said
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)
    if "No space left on device" in text or "os error 28" in text or "Disk quota exceeded" in text:
        return True
    if isinstance(exc, (RuntimeError, OSError)):
        try:
            st = os.statvfs(folder)
        except OSError:  # pragma: no cover
            return False
        return st.f_bavail * st.f_frsize < (1 << 20)
    return False


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
    with atomic_path(path) as tmp:  # atomic_path fsyncs, renames and cleans up
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_TRUNC), mode, encoding=encoding) as fh:
            yield fh


@contextlib.contextmanager
def atomic_path(path) -> Iterator[str]:
    """Context manager yielding a temporary path beside ``path`` for a writer that wants a file
    name (``safetensors.torch.save_file``, ``torch.save``); on a clean exit the file is fsynced and
    renamed over ``path``. On an exception it is removed and ``path`` is untouched."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + TMP_MARK, dir=folder)
    os.close(fd)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        _fsync_dir(folder)
    except BaseException as exc:
        full = _disk_full(exc, folder)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if full:
            raise DiskFullError(errno.ENOSPC, f"no space left on the device of {folder!r} while writing {path!r}: "
                                f"nothing was written under that name (a previous file there is kept, the "
                                f"partial one removed); free space there, or write elsewhere") from exc
        raise


def atomic_write_text(path, text: str) -> None:
    with atomic_write(path, "w", encoding="utf-8") as fh:
        fh.write(text)


def atomic_write_json(path, obj, **kwargs) -> None:
    kwargs.setdefault("indent", 2)
    atomic_write_text(path, json.dumps(obj, **kwargs) + "\n")


def atomic_save_safetensors(tensors: Dict, path, metadata: Optional[Dict[str, str]] = None) -> None:
    """``safetensors.torch.save_file`` made atomic: written to a temporary file beside ``path``,
    fsynced, then renamed over it (whatever the safetensors version does on its own)."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)


def atomic_torch_save(obj, path) -> None:
    """``torch.save`` made atomic (temporary file, fsync, rename)."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


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


def _rename_exchange(a: str, b: str) -> bool:
    """Swap two paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False where the
    platform or file system cannot."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    return fn(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0


def atomic_replace_dir(directory, files: Dict[str, bytes]) -> None:
    """Write a several-file artefact (a PEFT adapter: weights and config) so that a reader of
    ``directory`` sees the old set of files or the new one, never a mix.

    The new files (and copies of any other files already in ``directory``) go into a fresh
    sibling folder, fsynced; the two folders are then swapped in one atomic rename
    (``renameat2(RENAME_EXCHANGE)``), or, where that is unavailable, by two renames (between which
    the folder is briefly absent, never mixed). The old folder is removed afterwards."""
    import shutil

    directory = os.path.abspath(os.fspath(directory))
    if os.path.lexists(directory) and not os.path.isdir(directory):
        raise NotADirectoryError(f"{directory!r} exists and is not a folder; a several-file artefact needs a folder")
    parent, base = os.path.split(directory)
    os.makedirs(parent, exist_ok=True)
    new = tempfile.mkdtemp(prefix="." + base + TMP_MARK, dir=parent)
    try:
        if os.path.isdir(directory):
            for name in os.listdir(directory):
                src = os.path.join(directory, name)
                if name in files or TMP_MARK in name or not os.path.isfile(src):
                    continue
                shutil.copy2(src, os.path.join(new, name))
        for name, data in files.items():
            with open(os.path.join(new, name), "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        _fsync_dir(new)
        if not os.path.exists(directory):
            os.rename(new, directory)
        elif _rename_exchange(new, directory):
            shutil.rmtree(new, ignore_errors=True)  # ``new`` now holds the old files
        else:  # pragma: no cover - non-Linux fallback
            old = tempfile.mkdtemp(prefix="." + base + TMP_MARK, dir=parent)
            os.rmdir(old)
            os.rename(directory, old)
            os.rename(new, directory)
            shutil.rmtree(old, ignore_errors=True)
        _fsync_dir(parent)
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        raise


def clean_leftovers(folder) -> int:
    """Remove temporary files a crashed atomic write left in ``folder``; returns how many."""
    n = 0
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        return 0
    for name in os.listdir(folder):
        if TMP_MARK in name and name.startswith("."):
            full = os.path.join(folder, name)
            with contextlib.suppress(OSError):
                if os.path.isdir(full) and not os.path.islink(full):
                    import shutil

                    shutil.rmtree(full)
                else:
                    os.unlink(full)
                n += 1
    return n
