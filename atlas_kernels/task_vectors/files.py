"""The task-vector file: one safetensors file, checked when read.

Tensors: ``tau/<block>`` (dense slabs ``[N, *shape]``), ``scale/<block>`` (their float32 per-row
scales, compact storages only), ``lora_a/<block>`` and ``lora_b/<block>`` (LoRA factors),
``index/<block>`` (the task vectors a ragged block holds). Metadata: ``format``
(``atlas_kernels.task_vectors``), ``version`` (``1``), ``n``, ``names``, ``blocks``, ``shapes``
(JSON), ``storage``, ``crc32`` (a CRC32 per tensor, JSON) and ``metadata_crc32`` (a CRC32 of every
other metadata entry). :func:`load` refuses a file whose checksums, shapes or listings disagree,
naming the file and what is wrong, rather than returning task vectors that differ from those saved.
"""
from __future__ import annotations

import json
import math
import zlib
from collections.abc import Mapping

import torch

from .._io import atomic_save_safetensors
from ..checkpoints import check_file, unreadable_safetensors

__all__ = ["save", "load", "load_shard", "FORMAT", "VERSION"]

FORMAT = "atlas_kernels.task_vectors"
VERSION = "1"
_META_CRC = "metadata_crc32"
_KINDS = ("tau/", "scale/", "lora_a/", "lora_b/", "index/")


def _meta_crc(meta: Mapping[str, str]) -> int:
    """CRC32 of every metadata entry but itself, in a fixed order."""
    body = json.dumps({k: v for k, v in meta.items() if k != _META_CRC}, sort_keys=True)
    return zlib.crc32(body.encode("utf-8")) & 0xFFFFFFFF


def _meta_json(meta: Mapping[str, str], key: str, kind, path: str, default=None):
    """Metadata entry ``key`` parsed as JSON of type ``kind``; errors name the file and the key."""
    raw = meta.get(key, default)
    if raw is None:
        raise ValueError(f"{path!r}: task-vector metadata lacks key {key!r}")
    try:
        val = json.loads(raw)
    except ValueError as exc:
        raise ValueError(f"{path!r}: task-vector metadata key {key!r} is not valid JSON ({exc}): "
                         f"{raw[:80]!r}") from None
    if not isinstance(val, kind):
        raise ValueError(f"{path!r}: task-vector metadata key {key!r} must be a JSON {kind.__name__}, "
                         f"got {type(val).__name__}")
    return val


def _crc(t: torch.Tensor) -> int:
    return zlib.crc32(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()) & 0xFFFFFFFF


def save(tv, path) -> None:
    """Write a safetensors file: ``tau/<block>`` slabs, ``scale/<block>`` scales, and metadata
    (format, version, names, blocks, shapes, storage, and a CRC32 per tensor), atomically.
    ``TaskVectors.save(path)``."""
    if getattr(tv, "_sharding", None) is not None:
        raise ValueError("these task vectors are one process's rows (TaskVectors.load_shard), not the whole set: "
                         "save the whole set (TaskVectors.load(path)), not a shard of it")
    tensors = {}
    for b, s in tv._slabs.items():
        tensors["tau/" + b] = s.detach().contiguous().cpu()
    for b, s in tv._scales.items():
        tensors["scale/" + b] = s.detach().contiguous().cpu()
    for b, (a, bb) in tv._lora.items():
        tensors["lora_a/" + b] = a.detach().contiguous().cpu()
        tensors["lora_b/" + b] = bb.detach().contiguous().cpu()
    for b, idx in tv._index.items():
        tensors["index/" + b] = idx.detach().contiguous().cpu()
    meta = {
        "n": str(tv._n),
        "format": FORMAT,
        "version": VERSION,
        "names": json.dumps(tv._names),
        "blocks": json.dumps(tv.blocks),
        "shapes": json.dumps({b: list(tv.shape(b)) for b in tv.blocks}),
        "storage": tv._storage,
        "crc32": json.dumps({k: _crc(v) for k, v in tensors.items()}),
    }
    meta[_META_CRC] = str(_meta_crc(meta))  # the metadata is checked too, not only the tensors
    atomic_save_safetensors(tensors, str(path), metadata=meta)


def _check_header(meta: Mapping[str, str], path: str, verify: bool) -> None:
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path!r} is a safetensors file but not an atlas_kernels task-vector file "
                         f"(metadata format={meta.get('format')!r}, expected {FORMAT!r})")
    if meta.get("version") != VERSION:
        raise ValueError(f"{path!r}: task-vector file version {meta.get('version')!r} is not "
                         f"supported (expected {VERSION!r})")
    if verify and _META_CRC in meta and meta[_META_CRC] != str(_meta_crc(meta)):
        raise ValueError(f"{path!r}: the metadata fails its CRC32 check (names, blocks, shapes, "
                         f"storage or the tensor checksums were changed): the file is corrupted")


def _read(f, path: str, verify: bool):
    """``(meta, names, blocks, crcs, slabs, scales, lora, index)`` from an open safetensors file."""
    meta = f.metadata() or {}
    _check_header(meta, path, verify)
    names = _meta_json(meta, "names", list, path)
    blocks = _meta_json(meta, "blocks", list, path)
    shapes = _meta_json(meta, "shapes", dict, path)
    crcs = _meta_json(meta, "crc32", dict, path, default="{}")
    if not all(isinstance(b, str) for b in blocks):
        raise ValueError(f"{path!r}: metadata 'blocks' must list block names (strings)")
    twice = sorted({b for b in blocks if blocks.count(b) > 1})
    if twice:
        raise ValueError(f"{path!r}: metadata 'blocks' lists block(s) {twice[:3]} more than once: the file is "
                         f"corrupted or was edited (loading it would count those blocks twice)")
    if not isinstance(names, list) or not all(isinstance(x, str) for x in names):
        raise ValueError(f"{path!r}: metadata 'names' must be a list of strings")
    keys = set(f.keys())
    listed = {p + b for b in blocks for p in _KINDS}
    unlisted = sorted(keys - listed)
    if unlisted:
        raise ValueError(f"{path!r} holds {len(unlisted)} tensor(s) for blocks its metadata 'blocks' "
                         f"does not list, e.g. {unlisted[:3]}: refusing to drop them silently "
                         f"(the file is corrupted or was edited)")
    missing_shape = [b for b in blocks if b not in shapes]
    if missing_shape:
        raise ValueError(f"{path!r}: metadata 'shapes' has no entry for block(s) {missing_shape[:3]}")
    slabs, scales = {}, {}
    lora, index = {}, {}
    for b in blocks:
        if "index/" + b in keys:
            index[b] = f.get_tensor("index/" + b)
        rows = len(names) if b not in index else index[b].numel()
        if "lora_a/" + b in keys and "lora_b/" + b in keys:
            a, bb = f.get_tensor("lora_a/" + b), f.get_tensor("lora_b/" + b)
            got = [bb.shape[1], a.shape[2]] if a.dim() == 3 and bb.dim() == 3 else None
            if got != shapes[b] or a.shape[0] != rows:
                raise ValueError(f"{path!r}: LoRA block {b!r} has factors {tuple(a.shape)}, "
                                 f"{tuple(bb.shape)}; "
                                 f"metadata says {rows} task vectors of shape {shapes[b]}")
            lora[b] = (a, bb)
            continue
        if "tau/" + b not in keys:
            raise ValueError(f"{path!r} lists block {b!r} but holds no tensor for it")
        t = f.get_tensor("tau/" + b)
        if list(t.shape[1:]) == shapes[b] and t.shape[0] != rows and b not in index:
            raise ValueError(f"{path!r}: its metadata 'names' lists {len(names)} task vector(s) {names[:4]}, but "
                             f"block {b!r} holds {t.shape[0]} (shape {tuple(t.shape)}): the names and the tensors "
                             f"disagree, so the metadata was edited or the file is corrupted; rebuild the file")
        if list(t.shape[1:]) != shapes[b] or t.shape[0] != rows:
            raise ValueError(f"{path!r}: block {b!r} has shape {tuple(t.shape)}, metadata says "
                             f"[{rows}, {', '.join(map(str, shapes[b]))}]")
        slabs[b] = t
        if "scale/" + b in keys:
            scales[b] = f.get_tensor("scale/" + b)
    return meta, names, blocks, crcs, slabs, scales, lora, index


def load(cls, path, device=None, *, verify: bool = True):
    """Read a file written by :meth:`save`. ``verify`` checks every tensor's CRC32 (and the
    metadata's own). ``TaskVectors.load(path, device=None, verify=True)``."""
    from safetensors import safe_open

    path = str(path)
    check_file(path, "task-vector file")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta, names, blocks, crcs, slabs, scales, lora, index = _read(f, path, verify)
    except ValueError:
        raise
    except Exception as exc:  # safetensors raises its own error types for broken headers
        raise unreadable_safetensors(path, exc) from exc
    if verify:
        checks = [("tau/" + b, s) for b, s in slabs.items()] + [("scale/" + b, s) for b, s in scales.items()]
        checks += [(f"lora_{w}/" + b, t) for b, ab in lora.items() for w, t in zip("ab", ab)]
        checks += [("index/" + b, t) for b, t in index.items()]
        for key, t in checks:
            if key not in crcs or _crc(t) != crcs[key]:
                raise ValueError(f"{path!r}: tensor {key!r} fails its CRC32 check: the file is corrupted")
    try:
        n_meta = int(meta.get("n", len(names)))
    except ValueError:
        raise ValueError(f"{path!r}: metadata key 'n' must be an integer, got {meta.get('n')!r}") from None
    try:
        tv = cls(slabs, names, scales, lora=lora, index=index, n=n_meta)
    except (ValueError, TypeError) as exc:  # the checks of any TaskVectors, said of this file
        raise type(exc)(f"{path!r}: {exc}") from None
    tv._order = list(blocks)
    if meta.get("storage") != tv.storage:
        raise ValueError(f"{path!r}: metadata says storage {meta.get('storage')!r}, tensors are {tv.storage}")
    return tv if device is None else tv.to(device)


# ------------------------------------------------------------------------------------ one rank's rows
_ITEMSIZE = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I8": 1, "U8": 1, "F8_E4M3": 1,
             "F8_E5M2": 1}
_CRC_CHUNK = 1 << 26  # bytes read at once while streaming a tensor's checksum


def _slice_rows(f, key: str, rows, fill: float = 0.0) -> torch.Tensor:
    """Rows ``[rows.lo, rows.hi)`` of dim 1 of tensor ``key`` (read lazily: only those bytes),
    padded with ``fill`` to ``rows.per``."""
    part = f.get_slice(key)[:, rows.lo:rows.hi]
    if rows.pad:
        shape = list(part.shape)
        shape[1] = rows.pad
        part = torch.cat([part, torch.full(shape, fill, dtype=part.dtype)], dim=1)
    return part.contiguous()


def _crc_streamed(f, key: str) -> int:
    """CRC32 of tensor ``key``'s bytes (C order), read a bounded chunk at a time."""
    sl = f.get_slice(key)
    shape = list(sl.get_shape())
    if len(shape) < 2:
        return _crc(f.get_tensor(key))
    row_bytes = max(1, math.prod(shape[2:]) * _ITEMSIZE.get(sl.get_dtype(), 4))
    step = max(1, _CRC_CHUNK // row_bytes)
    crc = 0
    for i in range(shape[0]):
        for r in range(0, shape[1], step):
            t = sl[i:i + 1, r:r + step].contiguous()
            crc = zlib.crc32(t.reshape(-1).view(torch.uint8).numpy().tobytes(), crc)
    return crc & 0xFFFFFFFF


def load_shard(cls, path, mesh=None, *, verify: bool = True, uneven: str = "pad", device=None):
    """This process's rows of every block of a task-vector file, read lazily (safetensors
    ``get_slice``): the whole set is never in one process's memory. ``TaskVectors.load_shard(path,
    mesh=None, verify=True, uneven="pad", device=None)``; every process of ``mesh`` (a 1-D
    ``DeviceMesh``, a ``ProcessGroup`` or None: the default group) calls it.

    Each process reads rows ``[lo, hi)`` of every block (dim 0; ``ceil(R / W)`` rows, the last
    processes' padded with zero rows: see :mod:`atlas_kernels.sharding`; ``uneven="error"`` refuses
    a block whose rows W does not divide) from each slab, the same rows of the int8/fp8 per-row
    scales (a 1-D block's one scale whole) and of LoRA's ``B``, and LoRA's ``A`` whole. Patching
    with the result shards the patched module (:func:`atlas_kernels.shard`).

    ``verify``: the metadata's checksum on every process, and each tensor's CRC32 by one process
    (block ``i`` by process ``i mod W``, streamed in chunks), the verdict all-reduced so that every
    process refuses a corrupted file alike."""
    from safetensors import safe_open

    from ..sharding import _all_reduce, check_uneven, comm_device, resolve_group, rows_of
    from .core import TVSharding

    group, rank, world = resolve_group(mesh)
    path = str(path)
    check_file(path, "task-vector file")
    bad = -1
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            _check_header(meta, path, verify)
            names = _meta_json(meta, "names", list, path)
            blocks = _meta_json(meta, "blocks", list, path)
            shapes = _meta_json(meta, "shapes", dict, path)
            crcs = _meta_json(meta, "crc32", dict, path, default="{}")
            keys = set(f.keys())
            unlisted = sorted(keys - {p + b for b in blocks for p in _KINDS})
            if unlisted:
                raise ValueError(f"{path!r} holds {len(unlisted)} tensor(s) for blocks its metadata 'blocks' does "
                                 f"not list, e.g. {unlisted[:3]} (the file is corrupted or was edited)")
            slabs, scales, lora, index, full, whole = {}, {}, {}, {}, {}, 0
            for b in blocks:
                shape = shapes.get(b)
                if not isinstance(shape, list):
                    raise ValueError(f"{path!r}: metadata 'shapes' has no entry for block {b!r}")
                if not shape:
                    raise ValueError(f"{path!r}: block {b!r} has no dimensions (a scalar) and cannot be split by "
                                     f"rows over processes: leave it out of the sharded set")
                check_uneven(b, shape[0], world, uneven)
                rows = rows_of(shape[0], rank, world)
                if "index/" + b in keys:
                    index[b] = f.get_tensor("index/" + b)
                n_rows = len(names) if b not in index else index[b].numel()
                if "lora_a/" + b in keys and "lora_b/" + b in keys:
                    sa, sb = f.get_slice("lora_a/" + b), f.get_slice("lora_b/" + b)
                    ga, gb = list(sa.get_shape()), list(sb.get_shape())
                    if len(ga) != 3 or len(gb) != 3 or [gb[1], ga[2]] != shape or ga[0] != n_rows:
                        raise ValueError(f"{path!r}: LoRA block {b!r} has factors {tuple(ga)}, {tuple(gb)}; metadata "
                                         f"says {n_rows} task vectors of shape {shape}")
                    lora[b] = (f.get_tensor("lora_a/" + b), _slice_rows(f, "lora_b/" + b, rows))
                    whole += math.prod(ga) * _ITEMSIZE.get(sa.get_dtype(), 4) + math.prod(gb) * _ITEMSIZE.get(
                        sb.get_dtype(), 4)
                else:
                    if "tau/" + b not in keys:
                        raise ValueError(f"{path!r} lists block {b!r} but holds no tensor for it")
                    st = f.get_slice("tau/" + b)
                    got = list(st.get_shape())
                    if got != [n_rows, *shape]:
                        raise ValueError(f"{path!r}: block {b!r} has shape {tuple(got)}, metadata says "
                                         f"[{n_rows}, {', '.join(map(str, shape))}]")
                    slabs[b] = _slice_rows(f, "tau/" + b, rows)
                    whole += math.prod(got) * _ITEMSIZE.get(st.get_dtype(), 4)
                    if "scale/" + b in keys:
                        ss = f.get_slice("scale/" + b)
                        scales[b] = (_slice_rows(f, "scale/" + b, rows, fill=1.0) if len(shape) >= 2
                                     else f.get_tensor("scale/" + b))
                        whole += math.prod(ss.get_shape()) * 4
                full[b] = tuple(shape)
            if verify:
                listed = [p + b for b in blocks for p in _KINDS if p + b in keys]
                for i, key in enumerate(listed):
                    if i % world == rank and (key not in crcs or _crc_streamed(f, key) != crcs[key]):
                        bad = i
                        break
    except ValueError:
        raise
    except Exception as exc:  # safetensors raises its own error types for broken headers
        raise unreadable_safetensors(path, exc) from exc
    if verify:
        flag = torch.tensor([bad], dtype=torch.int64, device=comm_device(group))
        import torch.distributed as dist

        _all_reduce(flag, group, dist.ReduceOp.MAX)
        if int(flag) >= 0:
            raise ValueError(f"{path!r}: tensor {listed[int(flag)]!r} fails its CRC32 check: the file is corrupted")
    try:
        n_meta = int(meta.get("n", len(names)))
    except ValueError:
        raise ValueError(f"{path!r}: metadata key 'n' must be an integer, got {meta.get('n')!r}") from None
    try:
        tv = cls(slabs, names, scales, lora=lora, index=index, n=n_meta)
    except (ValueError, TypeError) as exc:
        raise type(exc)(f"{path!r}: {exc}") from None
    tv._order = list(blocks)
    if meta.get("storage") != tv.storage:
        raise ValueError(f"{path!r}: metadata says storage {meta.get('storage')!r}, tensors are {tv.storage}")
    tv._sharding = TVSharding(rank, world, full, whole, group)
    return tv if device is None else tv.to(device)
