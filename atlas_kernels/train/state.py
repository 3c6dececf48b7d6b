"""What a checkpoint holds and how resuming is checked: fingerprints of a run, RNG states,
and checkpoint files read with ``torch.load(weights_only=True)``."""

from __future__ import annotations

import dataclasses
import hashlib
import json
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


def fingerprint(cfg: TrainConfig, tasks: Sequence[TaskData], tvs) -> Dict[str, Any]:
    """What makes two runs the same run: hyper-parameters, task vectors and data (by content
    summary, not by path, so a moved data folder still resumes)."""
    fp = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _NOT_FINGERPRINTED}
    fp["task_vectors"] = {"names": [str(n) for n in tvs.names], "blocks": _hash_strings(
        [str(b) for b in tvs.blocks]), "nbytes": int(tvs.nbytes)}
    w = Path(cfg.weights) if cfg.weights else None
    fp["weights"] = (None if w is None else
                     {"name": w.name, "size": w.stat().st_size if w.is_file() else None})
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
