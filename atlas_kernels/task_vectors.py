"""Task vectors: loading, validation, storage dtypes, files.

A :class:`TaskVectors` holds N task vectors (fine-tuned minus pre-trained weights) over a set of
named blocks, stored per block as one stacked ``[N, *shape]`` slab: the layout kernels want (one
contiguous read of all N task vectors of a block).

Storage dtypes: ``"float32"``, ``"bfloat16"``, ``"float16"``, and the compact ``"int8"`` and
``"float8_e4m3fn"``, which keep a float32 scale per row (per output channel: dim 0 of a block of 2
or more dimensions; one scale for a 1-D block) of every task vector, ``scale = max|row| / qmax``.
Compact slabs are dequantized inside the compose and gradient kernels, never up front.

Files are read without running code: safetensors, or ``torch.load(weights_only=True)``. The paper's
released checkpoints are pickled whole modules; :func:`convert_checkpoint` turns one into a
safetensors state dict, but only with ``trust_pickle=True`` because unpickling runs code from the
file.
"""
from __future__ import annotations

import json
import os
import pickle
import zlib
from collections.abc import Mapping
from typing import Dict, Iterable, List, Optional, Sequence

import torch

__all__ = ["TaskVectors", "STORAGES", "load_state_dict_file", "convert_checkpoint"]

STORAGES: Dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "int8": torch.int8,
    "float8_e4m3fn": torch.float8_e4m3fn,
}
# Largest magnitude a quantized element may hold.
_QMAX = {"int8": 127.0, "float8_e4m3fn": 448.0}
_FORMAT = "atlas_kernels.task_vectors"
_VERSION = "1"


def _storage_name(storage) -> str:
    if storage is None:
        return "float32"
    if isinstance(storage, torch.dtype):
        for k, v in STORAGES.items():
            if v == storage:
                return k
    if isinstance(storage, str) and storage in STORAGES:
        return storage
    raise ValueError(f"storage must be one of {sorted(STORAGES)}, got {storage!r}")


def _rows(shape) -> int:
    return int(shape[0]) if len(shape) >= 2 else 1


def quantize(t: torch.Tensor, storage: str):
    """One task vector's block (float) in ``storage``: ``(data, scale or None)``; scale is ``[R]``."""
    if storage not in _QMAX:
        return t.to(STORAGES[storage]), None
    t = t.float()
    r = _rows(t.shape)
    rows = t.reshape(r, -1)
    amax = rows.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / _QMAX[storage], torch.ones_like(amax))
    q = rows / scale[:, None]
    if storage == "int8":
        q = q.round().clamp_(-127, 127)
    return q.to(STORAGES[storage]).reshape(t.shape), scale


def dequantize_one(data: torch.Tensor, scale: Optional[torch.Tensor]) -> torch.Tensor:
    """One task vector's block back in float32."""
    t = data.float()
    if scale is None:
        return t
    r = _rows(t.shape)
    return (t.reshape(r, -1) * scale.float()[:, None]).reshape(t.shape)


class TaskVectors:
    """N task vectors over named blocks, one ``[N, *shape]`` slab per block.

    ``TaskVectors(slabs, names=None, scales=None)``: ``slabs`` maps block names (the model's
    parameter names, e.g. ``"transformer.resblocks.0.mlp.c_fc.weight"``) to ``[N, *shape]`` tensors;
    ``names`` names the N task vectors; ``scales`` (compact storage only) maps block names to
    ``[N, R]`` float32 scales.
    """

    def __init__(self, slabs: Mapping, names: Optional[Sequence[str]] = None,
                 scales: Optional[Mapping] = None):
        if not isinstance(slabs, Mapping) or not slabs:
            raise ValueError("slabs must be a non-empty mapping from block name to a [N, *shape] tensor")
        scales = dict(scales or {})
        n = None
        first = None
        storage = None
        for name, slab in slabs.items():
            if not isinstance(slab, torch.Tensor):
                raise TypeError(f"block {name!r}: expected a tensor, got {type(slab).__name__}")
            if slab.dim() < 1:
                raise ValueError(f"block {name!r}: expected a [N, *shape] slab, got a 0-d tensor")
            st = _storage_name(slab.dtype) if slab.dtype in STORAGES.values() else None
            if st is None:
                raise TypeError(f"block {name!r}: task vectors must be float32, bfloat16, float16, int8 "
                                f"or float8_e4m3fn, got {slab.dtype}")
            if n is None:
                n, first, storage = slab.shape[0], name, st
            elif slab.shape[0] != n:
                raise ValueError(f"every block needs the same number of task vectors: block {first!r} has "
                                 f"N={n}, block {name!r} has N={slab.shape[0]}")
            elif st != storage:
                raise ValueError(f"every block needs the same storage dtype: block {first!r} is {storage}, "
                                 f"block {name!r} is {st}")
            if slab.device != slabs[first].device:
                raise ValueError(f"blocks on several devices: {first!r} on {slabs[first].device}, "
                                 f"{name!r} on {slab.device}")
            sc = scales.get(name)
            if st in _QMAX:
                want = (n, _rows(slab.shape[1:]))
                if sc is None or tuple(sc.shape) != want or sc.dtype != torch.float32:
                    got = "none" if sc is None else f"{tuple(sc.shape)} {sc.dtype}"
                    raise ValueError(f"block {name!r}: {st} storage needs float32 scales of shape {want}, "
                                     f"got {got}")
                if not torch.isfinite(sc).all():
                    raise ValueError(f"block {name!r}: scales hold NaN or inf")
            elif sc is not None:
                raise ValueError(f"block {name!r}: scales are only for int8/float8_e4m3fn storage, not {st}")
            if st not in _QMAX or st == "float8_e4m3fn":
                _check_finite(slab, f"task vectors of block {name!r}")
        if n == 0:
            raise ValueError("a task-vector set needs at least one task vector (N=0)")
        extra = set(scales) - set(slabs)
        if extra:
            raise ValueError(f"scales given for blocks without slabs: {sorted(extra)[:5]}")
        if names is None:
            names = [f"task_vector_{i}" for i in range(n)]
        names = [str(x) for x in names]
        if len(names) != n:
            raise ValueError(f"names: expected {n} names (one per task vector), got {len(names)}")
        self._slabs: Dict[str, torch.Tensor] = {k: v.contiguous() for k, v in slabs.items()}
        self._scales: Dict[str, torch.Tensor] = {k: v.contiguous() for k, v in scales.items()}
        self._names: List[str] = names
        self._storage = storage

    # ------------------------------------------------------------------ views
    def __len__(self) -> int:
        return next(iter(self._slabs.values())).shape[0]

    def __getitem__(self, block: str) -> torch.Tensor:
        try:
            return self._slabs[block]
        except KeyError:
            raise KeyError(f"no block {block!r} in these task vectors") from None

    def __contains__(self, block: str) -> bool:
        return block in self._slabs

    def __repr__(self) -> str:
        return (f"TaskVectors(n={len(self)}, blocks={len(self._slabs)}, storage={self._storage!r}, "
                f"elements={self.numel:,}, nbytes={self.nbytes:,}, device={self.device})")

    @property
    def names(self) -> List[str]:
        """Names of the N task vectors."""
        return list(self._names)

    @property
    def blocks(self) -> List[str]:
        """Names of the blocks (model parameter names), in order."""
        return list(self._slabs)

    @property
    def storage(self) -> str:
        return self._storage

    @property
    def device(self) -> torch.device:
        return next(iter(self._slabs.values())).device

    @property
    def numel(self) -> int:
        """Elements per task vector (the number of adapted parameters)."""
        return sum(s[0].numel() for s in self._slabs.values())

    @property
    def nbytes(self) -> int:
        """Bytes held: slabs plus scales."""
        return sum(s.numel() * s.element_size() for s in self._slabs.values()) + sum(
            s.numel() * s.element_size() for s in self._scales.values())

    def shape(self, block: str) -> torch.Size:
        return self[block].shape[1:]

    def scale(self, block: str) -> Optional[torch.Tensor]:
        """``[N, R]`` float32 scales of a compact block, or None."""
        self[block]
        return self._scales.get(block)

    def dense(self, block: str, index: int) -> torch.Tensor:
        """Task vector ``index`` of ``block`` in float32."""
        return dequantize_one(self[block][index], None if block not in self._scales else self._scales[block][index])

    # ------------------------------------------------------------ conversion
    def to(self, device) -> "TaskVectors":
        return TaskVectors({k: v.to(device) for k, v in self._slabs.items()}, self._names,
                           {k: v.to(device) for k, v in self._scales.items()})

    def to_storage(self, storage) -> "TaskVectors":
        """A copy in another storage dtype (re-quantized one task vector at a time)."""
        storage = _storage_name(storage)
        if storage == self._storage:
            return self
        slabs, scales = {}, {}
        for b, slab in self._slabs.items():
            parts = [quantize(self.dense(b, i), storage) for i in range(len(self))]
            slabs[b] = torch.stack([p[0] for p in parts])
            if parts[0][1] is not None:
                scales[b] = torch.stack([p[1] for p in parts])
        return TaskVectors(slabs, self._names, scales)

    def subset(self, blocks: Iterable[str]) -> "TaskVectors":
        blocks = list(blocks)
        for b in blocks:
            self[b]
        return TaskVectors({b: self._slabs[b] for b in blocks}, self._names,
                           {b: self._scales[b] for b in blocks if b in self._scales})

    # ---------------------------------------------------------- constructors
    @classmethod
    def from_state_dicts(cls, pretrained: Mapping, finetuned: Sequence[Mapping], *, names=None, prefix=None,
                         storage=None) -> "TaskVectors":
        """``tau_i = finetuned[i] - pretrained`` for every floating tensor (integer buffers skipped).

        ``prefix`` (e.g. ``"visual."``) keeps only keys that start with it and strips it. Task vectors
        are computed in float32 and stored in ``storage`` (default float32).
        """
        if isinstance(finetuned, Mapping) or isinstance(finetuned, (str, bytes)):
            raise TypeError("finetuned must be a sequence of state dicts (one per task vector), "
                            "got a single mapping")
        return cls._build(pretrained, list(finetuned), names, prefix, storage, labels=None)

    @classmethod
    def from_checkpoints(cls, pretrained_path, finetuned_paths: Sequence, *, names=None, prefix=None,
                         storage=None) -> "TaskVectors":
        """Like :meth:`from_state_dicts`, reading state-dict files (safetensors, or
        ``torch.load(weights_only=True)``) one fine-tuned file at a time. ``names`` defaults to the
        files' stems."""
        if isinstance(finetuned_paths, (str, os.PathLike)):
            finetuned_paths = [finetuned_paths]
        finetuned_paths = list(finetuned_paths)
        if names is None:
            names = [os.path.splitext(os.path.basename(str(p)))[0] for p in finetuned_paths]
        pre = load_state_dict_file(pretrained_path)
        lazy = _LazyDicts(finetuned_paths)
        return cls._build(pre, lazy, names, prefix, storage, labels=[str(p) for p in finetuned_paths])

    @classmethod
    def _build(cls, pretrained, finetuned, names, prefix, storage, labels):
        storage = _storage_name(storage)
        pre = _select(pretrained, prefix, "the pre-trained state dict")
        n = len(finetuned)
        if n == 0:
            raise ValueError("finetuned: need at least one fine-tuned state dict")
        slabs: Dict[str, torch.Tensor] = {}
        scales: Dict[str, torch.Tensor] = {}
        for i in range(n):
            label = labels[i] if labels else f"finetuned[{i}]"
            ft = _select(finetuned[i], prefix, label)
            missing = [k for k in pre if k not in ft]
            extra = [k for k in ft if k not in pre]
            if missing:
                raise ValueError(f"{label} lacks {len(missing)} block(s) that the pre-trained state dict has, "
                                 f"e.g. {missing[:3]}")
            if extra:
                raise ValueError(f"{label} has {len(extra)} block(s) that the pre-trained state dict lacks, "
                                 f"e.g. {extra[:3]}")
            for k, p in pre.items():
                f = ft[k]
                if f.shape != p.shape:
                    raise ValueError(f"block {k!r}: {label} has shape {tuple(f.shape)}, the pre-trained "
                                     f"state dict has {tuple(p.shape)}")
                tau = f.float() - p.float()
                _check_finite(tau, f"block {k!r} of {label} (fine-tuned minus pre-trained)")
                q, sc = quantize(tau, storage)
                if k not in slabs:
                    slabs[k] = torch.empty((n, *p.shape), dtype=q.dtype, device=q.device)
                    if sc is not None:
                        scales[k] = torch.empty((n, sc.numel()), dtype=torch.float32, device=q.device)
                slabs[k][i] = q
                if sc is not None:
                    scales[k][i] = sc
        return cls(slabs, names, scales)

    # ------------------------------------------------------------------ files
    def save(self, path) -> None:
        """Write a safetensors file: ``tau/<block>`` slabs, ``scale/<block>`` scales, and metadata
        (format, version, names, blocks, shapes, storage, and a CRC32 per tensor)."""
        from safetensors.torch import save_file

        tensors = {}
        for b, s in self._slabs.items():
            tensors["tau/" + b] = s.detach().contiguous().cpu()
        for b, s in self._scales.items():
            tensors["scale/" + b] = s.detach().contiguous().cpu()
        meta = {
            "format": _FORMAT,
            "version": _VERSION,
            "names": json.dumps(self._names),
            "blocks": json.dumps(self.blocks),
            "shapes": json.dumps({b: list(self.shape(b)) for b in self.blocks}),
            "storage": self._storage,
            "crc32": json.dumps({k: _crc(v) for k, v in tensors.items()}),
        }
        save_file(tensors, str(path), metadata=meta)

    @classmethod
    def load(cls, path, device=None, *, verify: bool = True) -> "TaskVectors":
        """Read a file written by :meth:`save`. ``verify`` checks every tensor's CRC32."""
        from safetensors import safe_open

        path = str(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"task-vector file {path!r} does not exist")
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                if meta.get("format") != _FORMAT:
                    raise ValueError(f"{path!r} is a safetensors file but not an atlas_kernels task-vector file "
                                     f"(metadata format={meta.get('format')!r}, expected {_FORMAT!r})")
                if meta.get("version") != _VERSION:
                    raise ValueError(f"{path!r}: task-vector file version {meta.get('version')!r} is not "
                                     f"supported (expected {_VERSION!r})")
                names = json.loads(meta["names"])
                blocks = json.loads(meta["blocks"])
                shapes = json.loads(meta["shapes"])
                crcs = json.loads(meta.get("crc32", "{}"))
                keys = set(f.keys())
                slabs, scales = {}, {}
                for b in blocks:
                    if "tau/" + b not in keys:
                        raise ValueError(f"{path!r} lists block {b!r} but holds no tensor for it")
                    t = f.get_tensor("tau/" + b)
                    if list(t.shape[1:]) != shapes[b] or t.shape[0] != len(names):
                        raise ValueError(f"{path!r}: block {b!r} has shape {tuple(t.shape)}, metadata says "
                                         f"[{len(names)}, {', '.join(map(str, shapes[b]))}]")
                    slabs[b] = t
                    if "scale/" + b in keys:
                        scales[b] = f.get_tensor("scale/" + b)
        except ValueError:
            raise
        except Exception as exc:  # safetensors raises its own error types for broken headers
            raise ValueError(f"{path!r} is not a readable safetensors file (truncated or corrupted?): {exc}") from exc
        if verify:
            for key, t in [("tau/" + b, s) for b, s in slabs.items()] + [("scale/" + b, s) for b, s in scales.items()]:
                if key in crcs and _crc(t) != crcs[key]:
                    raise ValueError(f"{path!r}: tensor {key!r} fails its CRC32 check: the file is corrupted")
        tv = cls(slabs, names, scales)
        if meta.get("storage") != tv.storage:
            raise ValueError(f"{path!r}: metadata says storage {meta.get('storage')!r}, tensors are {tv.storage}")
        return tv if device is None else tv.to(device)


# --------------------------------------------------------------------------- helpers
def _crc(t: torch.Tensor) -> int:
    return zlib.crc32(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()) & 0xFFFFFFFF


def _check_finite(t: torch.Tensor, what: str) -> None:
    if t.device.type == "meta":
        return
    bad = ~torch.isfinite(t.float() if t.dtype == torch.float8_e4m3fn else t)
    if bad.any():
        idx = tuple(int(i) for i in torch.nonzero(bad)[0])
        raise ValueError(f"{what} holds {int(bad.sum())} NaN/inf value(s), first at index {idx}")


def _select(sd, prefix, label) -> Dict[str, torch.Tensor]:
    if not isinstance(sd, Mapping):
        raise TypeError(f"{label} is not a state dict (a mapping from names to tensors): got {type(sd).__name__}")
    out = {}
    for k, v in sd.items():
        if not isinstance(k, str):
            raise TypeError(f"{label} is not a state dict: key {k!r} is not a string")
        if prefix:
            if not k.startswith(prefix):
                continue
            k = k[len(prefix):]
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"{label} is not a state dict: key {k!r} holds a {type(v).__name__}, not a tensor")
        if not v.is_floating_point():
            continue  # integer buffers (e.g. position ids, counters) are not adapted
        out[k] = v
    if not out:
        if prefix:
            sample = list(sd)[:3]
            raise ValueError(f"prefix {prefix!r} matches no floating tensor in {label} (its keys look like {sample})")
        raise ValueError(f"{label} holds no floating tensor")
    return out


class _LazyDicts:
    """Fine-tuned state dicts read from files one at a time (only one in memory)."""

    def __init__(self, paths):
        self.paths = paths

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return load_state_dict_file(self.paths[i])


def load_state_dict_file(path) -> Dict[str, torch.Tensor]:
    """A state dict from a safetensors file or a ``torch.save``'d dict, without running code.

    Accepts ``{"state_dict": {...}}`` wrappers. A pickled whole module is refused with the command
    that converts it."""
    path = str(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    with open(path, "rb") as fh:
        head = fh.read(16)
    if path.endswith(".safetensors") or (len(head) >= 9 and head[8:9] == b"{"):
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except Exception as exc:
            raise ValueError(f"{path!r} is not a readable safetensors file (truncated or corrupted?): {exc}") from exc
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ValueError(
            f"{path!r} is not a plain state dict: it pickles Python objects (the paper's released checkpoints "
            f"are whole pickled modules), and loading it would run code from the file. If you trust it, "
            f"convert it once with `python -m atlas_kernels.task_vectors convert {path} OUT.safetensors "
            f"--trust-pickle` (or atlas_kernels.convert_checkpoint(src, dst, trust_pickle=True)). "
            f"Details: {str(exc).splitlines()[0]}") from None
    except Exception as exc:
        raise ValueError(f"{path!r} could not be read as a checkpoint (truncated or corrupted?): {exc}") from exc
    return _unwrap(obj, path)


def _unwrap(obj, path):
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model_state_dict", "model"):
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                obj = inner
                break
        if obj and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
            return dict(obj)
        bad = next(((k, v) for k, v in obj.items() if not isinstance(v, torch.Tensor)), None)
        what = f"key {bad[0]!r} holds a {type(bad[1]).__name__}" if bad else "it is empty"
        raise ValueError(f"{path!r} is not a state dict (a mapping from names to tensors): {what}")
    raise ValueError(f"{path!r} is not a state dict: it holds a {type(obj).__name__}")


def convert_checkpoint(src, dst, *, trust_pickle: bool = False) -> Dict[str, torch.Tensor]:
    """Turn a checkpoint (state dict, or a pickled whole module as the paper releases) into a
    safetensors state dict at ``dst``. Unpickling a module runs code from the file, so it is done only
    with ``trust_pickle=True``."""
    src = str(src)
    try:
        sd = load_state_dict_file(src)
    except ValueError:
        if not trust_pickle:
            raise ValueError(f"{src!r} is a pickled object, not a state dict; loading it runs code from the file. "
                             f"Pass trust_pickle=True (CLI: --trust-pickle) only for files you trust.") from None
        obj = torch.load(src, map_location="cpu", weights_only=False)
        if isinstance(obj, torch.nn.Module):
            obj = obj.state_dict()
        sd = _unwrap(obj, src)
    from safetensors.torch import save_file

    sd = {k: v.detach().clone().contiguous() for k, v in sd.items()}
    save_file(sd, str(dst))
    return sd


if __name__ == "__main__":  # python -m atlas_kernels.task_vectors build|convert ...
    from ._tv_cli import main

    raise SystemExit(main())
