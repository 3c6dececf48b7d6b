"""What a checkpoint holds and how resuming is checked: fingerprints of a run, RNG states,
and checkpoint files read by the library's restricted reader (not torch.load)."""

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
    """A training checkpoint, read by the library's restricted reader (never runs code from the
    file; bounded against expansion and compression bombs, as every torch file the library reads:
    torch.load does not see it) and checked for the layout :func:`restore` relies on."""
    from ..checkpoints import check_file, read_torch_file

    p = Path(path)
    if not p.exists() and not p.is_symlink():
        raise ConfigError(f"resume file '{p}' does not exist")
    try:
        check_file(str(p), "resume file")
        ckpt = read_torch_file(str(p), "resume file")
    except (ValueError, OSError) as e:
        raise ConfigError(f"{e}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(f"resume file '{p}' is not an atlas_kernels.train checkpoint "
                          f"(format {CHECKPOINT_FORMAT})")
    check_layout(ckpt, p)
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


def _what(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)}"
    if isinstance(x, (dict, list, tuple)):
        return f"a {type(x).__name__} of {len(x)} item(s)"
    return f"{type(x).__name__} {x!r}"[:80]


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_layout(ckpt: Dict[str, Any], path) -> None:
    """ConfigError naming the first entry of a resume file that :func:`restore` could not use
    (missing, or another type or shape than the trainer writes): the fingerprint, the
    coefficients, the optimizer, scheduler and RNG states, the progress counters."""
    def bad(key: str, want: str, got) -> ConfigError:
        held = "nothing (the entry is missing)" if got is _MISSING else _what(got)
        return ConfigError(f"resume file '{path}': {key} should be {want}, but it holds {held}; the file is "
                           f"damaged or was not written by atlas_kernels.train: resume from another checkpoint, "
                           f"or start afresh without --resume")

    def get(d, key):
        return d.get(key, _MISSING) if isinstance(d, dict) else _MISSING

    for key in ("fingerprint", "coefficients", "optimizer", "scheduler", "rng"):
        if not isinstance(get(ckpt, key), dict) or not ckpt[key]:
            raise bad(f"'{key}'", "a non-empty dict", get(ckpt, key))
    for key in ("epoch", "step_in_epoch", "global_step", "epoch_groups"):
        v = get(ckpt, key)
        if not _is_int(v) or v < 0:
            raise bad(f"'{key}'", "a non-negative integer", v)
    for key in ("train_time_s", "epoch_loss"):
        if not isinstance(get(ckpt, key), (int, float)) or isinstance(ckpt[key], bool):
            raise bad(f"'{key}'", "a number", get(ckpt, key))
    if not isinstance(get(ckpt, "history"), list):
        raise bad("'history'", "a list", get(ckpt, "history"))
    for key in ("best", "zero_shot"):
        if get(ckpt, key) is not None and not isinstance(ckpt[key], dict):
            raise bad(f"'{key}'", "None or a dict", get(ckpt, key))
    for k, v in ckpt["coefficients"].items():
        if not isinstance(v, torch.Tensor) or not v.is_floating_point():
            raise bad(f"coefficients[{k!r}]", "a floating tensor", v)
    opt = ckpt["optimizer"]
    if not isinstance(get(opt, "state"), dict):
        raise bad("optimizer['state']", "a dict", get(opt, "state"))
    groups = get(opt, "param_groups")
    if not isinstance(groups, list) or not groups or not all(
            isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups):
        raise bad("optimizer['param_groups']", "a non-empty list of parameter groups (dicts with 'params')", groups)
    rng = ckpt["rng"]
    t = get(rng, "torch")
    want = torch.get_rng_state()
    if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8 or t.shape != want.shape:
        raise bad("rng['torch']", f"a uint8 tensor of shape {tuple(want.shape)} (torch's RNG state)", t)
    py = get(rng, "python")
    if not (isinstance(py, (list, tuple)) and len(py) == 3 and _is_int(py[0]) and isinstance(py[1], (list, tuple))
            and len(py[1]) == 625 and all(_is_int(x) and 0 <= x < 2 ** 32 for x in py[1])):
        raise bad("rng['python']", "Python's RNG state [version, 625 32-bit ints, gauss]", py)
    npy = get(rng, "numpy")
    if npy is not None and not (isinstance(npy, dict) and isinstance(npy.get("keys"), torch.Tensor)
                                and npy["keys"].numel() == 624 and _is_int(npy.get("pos"))):
        raise bad("rng['numpy']", "None or numpy's RNG state (624 keys and a position)", npy)


_MISSING = object()


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
    # a copy: the reader hands out views into one buffer per file, and set_rng_state reads from
    # the start of a tensor's storage, not from its offset ("Invalid mt19937 state")
    torch.set_rng_state(st["torch"].clone())
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
