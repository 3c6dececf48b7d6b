"""What a checkpoint holds and how resuming is checked: fingerprints of a run, RNG states,
and checkpoint files read with ``torch.load(weights_only=True)``."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
from pathlib import Path
from typing import Any, Dict, List, Sequence

import torch

from .config import _NOT_FINGERPRINTED, ConfigError, TrainConfig
from .data import TaskData

CHECKPOINT_FORMAT = "atlas_kernels.train/1"


def _hash_strings(xs: Sequence[str]) -> str:
    h = hashlib.sha256()
    for x in xs:
        h.update(x.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def _cache_file() -> Path:
    root = os.environ.get("ATLAS_KERNELS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "atlas_kernels")
    return Path(root) / "digests.json"


def file_digest(path) -> str:
    """SHA-256 of a file's content, streamed in 4 MiB chunks, cached by (real path, size,
    mtime_ns) in a small JSON file (``$ATLAS_KERNELS_CACHE``, default ``~/.cache/atlas_kernels``)
    so a resume does not re-read gigabytes; a rewritten file has another size or mtime."""
    p = os.path.realpath(os.fspath(path))
    st = os.stat(p)
    key = f"{p}|{st.st_size}|{st.st_mtime_ns}"
    cache_path = _cache_file()
    cache: Dict[str, str] = {}
    try:
        cache = json.loads(cache_path.read_text())
        if not isinstance(cache, dict):
            cache = {}
    except (OSError, ValueError):
        cache = {}
    if isinstance(cache.get(key), str):
        return cache[key]
    h = hashlib.sha256()
    with open(p, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    digest = h.hexdigest()
    cache = {k: v for k, v in cache.items() if not k.startswith(p + "|")}
    cache[key] = digest
    try:
        from .._io import atomic_write_json

        cache_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(cache_path, dict(list(cache.items())[-256:]))
    except OSError:  # a read-only home: hashing again next time is only slower
        pass
    return digest


def fingerprint(cfg: TrainConfig, tasks: Sequence[TaskData], tvs) -> Dict[str, Any]:
    """What makes two runs the same run: hyper-parameters, task vectors and weights (by content:
    a SHA-256 of each file, which covers every tensor) and data (by content summary, not by path,
    so a moved data folder still resumes)."""
    fp = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _NOT_FINGERPRINTED}
    tv_path = Path(cfg.task_vectors)
    fp["task_vectors"] = {"names": [str(n) for n in tvs.names], "blocks": _hash_strings(
        [str(b) for b in tvs.blocks]), "nbytes": int(tvs.nbytes),
        "sha256": file_digest(tv_path) if tv_path.is_file() else None}
    w = Path(cfg.weights) if cfg.weights else None
    fp["weights"] = (None if w is None else
                     {"name": w.name, "size": w.stat().st_size if w.is_file() else None,
                      "sha256": file_digest(w) if w.is_file() else None})
    fp["data"] = [{"name": t.name, "classes": _hash_strings(t.classes), "n_train": len(t.train),
                   "train": _hash_strings([Path(p).name for p, _ in t.train]),
                   "n_val": len(t.val)} for t in tasks]
    return json.loads(json.dumps(fp))


def fingerprint_diff(a: Dict[str, Any], b: Dict[str, Any]) -> List[str]:
    return [f"{k}: checkpoint {a.get(k)!r} != now {b.get(k)!r}"
            for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def load_checkpoint(path) -> Dict[str, Any]:
    """A training checkpoint, read with ``weights_only=True`` (never runs code from the file)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"resume file '{p}' does not exist")
    try:
        ckpt = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConfigError(f"resume file '{p}' is not a training checkpoint "
                          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(f"resume file '{p}' is not an atlas_kernels.train checkpoint "
                          f"(format {CHECKPOINT_FORMAT})")
    from .faults import check_finite_tensors

    coefs = [("coefficients", ckpt.get("coefficients") or {})]
    if isinstance(ckpt.get("best"), dict):
        coefs.append(("best coefficients", ckpt["best"].get("coefficients") or {}))
    for what, c in coefs:
        try:
            check_finite_tensors(c, f"resume file '{p}' ({what})")
        except ValueError as e:
            raise ConfigError(f"{e}; it was written by a diverged run or corrupted, resume from an "
                              f"earlier checkpoint or start afresh") from None
    return ckpt


def check_resume(ckpt: Dict[str, Any], fp: Dict[str, Any], path) -> None:
    diff = fingerprint_diff(ckpt["fingerprint"], fp)
    if diff:
        raise ConfigError(f"resume file '{path}' comes from another run; it differs in:\n  "
                          + "\n  ".join(diff))


# ----------------------------------------------------------------------------------------------
# distributed


def get_rng_state() -> Dict[str, Any]:
    st = {"torch": torch.get_rng_state(), "python": _py_state_to_plain(random.getstate()),
          "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
    try:
        import numpy as np

        name, keys, pos, has_gauss, cached = np.random.get_state()
        st["numpy"] = {"name": name, "keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached": float(cached)}
    except ImportError:  # pragma: no cover
        st["numpy"] = None
    return st


def set_rng_state(st: Dict[str, Any]) -> None:
    torch.set_rng_state(st["torch"])
    random.setstate(_py_state_from_plain(st["python"]))
    if st.get("cuda") is not None and torch.cuda.is_available() \
            and len(st["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(st["cuda"])
    if st.get("numpy") is not None:
        import numpy as np

        n = st["numpy"]
        np.random.set_state((n["name"], n["keys"].numpy().astype("uint32"), n["pos"],
                             n["has_gauss"], n["cached"]))


def _py_state_to_plain(s):
    return [s[0], list(s[1]), s[2]]


def _py_state_from_plain(s):
    return (s[0], tuple(s[1]), s[2])
