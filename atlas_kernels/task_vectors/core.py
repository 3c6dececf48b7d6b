"""Task vectors: loading, validation, storage dtypes, files.

A :class:`TaskVectors` holds N task vectors (fine-tuned minus pre-trained weights) over a set of
named blocks, stored per block as one stacked ``[N, *shape]`` slab: the layout kernels want (one
contiguous read of all N task vectors of a block).

Storage dtypes: ``"float32"``, ``"bfloat16"``, ``"float16"``, and the compact ``"int8"`` and
``"float8_e4m3fn"``, which keep a float32 scale per row (per output channel: dim 0 of a block of 2
or more dimensions; one scale for a 1-D block) of every task vector, ``scale = max|row| / qmax``.
Compact slabs are dequantized inside the compose and gradient kernels, never up front.

Files are read without running code: safetensors, ``torch.load(weights_only=True)``, or (for the
pickled whole modules the task-vector papers released) the restricted reader of
:mod:`atlas_kernels.safe_pickle`, which imports and calls nothing from the file.
"""
from __future__ import annotations

import json
import logging
import os
import zlib
from collections.abc import Mapping
from typing import Dict, Iterable, List, Optional, Sequence

import torch

from ..blocks import BlockSpec
from ..checkpoints import convert_checkpoint, dropped_note, load_state_dict_file, select_tower
from ..partitions import Partition
from ..peft import lora_pair, read_peft_adapter
from ..storage import QMAX as _QMAX
from ..storage import dequantize_one, quantize, scale_rows, torch_dtypes
from ..storage import storage_name as _storage_name

__all__ = ["TaskVectors", "STORAGES", "load_state_dict_file", "convert_checkpoint"]

# The storage names (atlas_kernels.storage: bytes, per-row scales, largest quantized magnitude) as
# torch dtypes.
STORAGES: Dict[str, torch.dtype] = torch_dtypes()
_FORMAT = "atlas_kernels.task_vectors"
_VERSION = "1"


class TaskVectors:
    """N task vectors over named blocks, one ``[N, *shape]`` slab per block.

    ``TaskVectors(slabs, names=None, scales=None)``: ``slabs`` maps block names (the model's
    parameter names, e.g. ``"transformer.resblocks.0.mlp.c_fc.weight"``) to ``[N, *shape]`` tensors;
    ``names`` names the N task vectors; ``scales`` (compact storage only) maps block names to
    ``[N, R]`` float32 scales.
    """

    def __init__(self, slabs: Mapping, names: Optional[Sequence[str]] = None,
                 scales: Optional[Mapping] = None, *, lora: Optional[Mapping] = None,
                 index: Optional[Mapping] = None, n: Optional[int] = None):
        slabs = dict(slabs or {})
        lora = dict(lora or {})
        index = {k: torch.as_tensor(v, dtype=torch.int64) for k, v in (index or {}).items()}
        if not isinstance(slabs, Mapping) or not (slabs or lora):
            raise ValueError("slabs must be a non-empty mapping from block name to a [N, *shape] tensor")
        scales = dict(scales or {})
        n_total = n
        n = None
        first = None
        storage = None
        both = set(slabs) & set(lora)
        if both:
            raise ValueError(f"blocks given both as dense slabs and as LoRA factors: {sorted(both)[:3]}")
        for name, (a, b) in lora.items():
            if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.dim() != 3 or b.dim() != 3:
                raise ValueError(f"LoRA block {name!r}: expected A [N, r, in] and B [N, out, r] tensors")
            if a.shape[0] != b.shape[0] or a.shape[1] != b.shape[2]:
                raise ValueError(f"LoRA block {name!r}: A {tuple(a.shape)} and B {tuple(b.shape)} do not match "
                                 f"(need A [N, r, in], B [N, out, r])")
        for name, slab in list(slabs.items()) + [(k, v[0]) for k, v in lora.items()]:
            if not isinstance(slab, torch.Tensor):
                raise TypeError(f"block {name!r}: expected a tensor, got {type(slab).__name__}")
            if slab.dim() < 1:
                raise ValueError(f"block {name!r}: expected a [N, *shape] slab, got a 0-d tensor")
            st = _storage_name(slab.dtype) if slab.dtype in STORAGES.values() else None
            if st is None:
                raise TypeError(f"block {name!r}: task vectors must be one of {sorted(STORAGES)}, got {slab.dtype}")
            rows_n = slab.shape[0]
            if name in index:
                if index[name].dim() != 1 or index[name].numel() != rows_n:
                    raise ValueError(f"block {name!r}: index must list the {rows_n} task vectors its slab holds, "
                                     f"got {tuple(index[name].shape)}")
                rows_n = None  # ragged block: checked against N below
            if rows_n is None:
                pass
            elif n is None:
                n, first, storage = rows_n, name, st
            elif rows_n != n:
                raise ValueError(f"every block needs the same number of task vectors: block {first!r} has "
                                 f"N={n}, block {name!r} has N={slab.shape[0]}")
            if storage is None:
                storage = st
            elif st != storage and name not in lora:
                raise ValueError(f"every block needs the same storage dtype: block {first!r} is {storage}, "
                                 f"block {name!r} is {st}")
            dev0 = (slabs[first] if first in slabs else lora[first][0]).device if first else slab.device
            if slab.device != dev0:
                raise ValueError(f"blocks on several devices: {first!r} on {dev0}, {name!r} on {slab.device}")
            sc = scales.get(name)
            if st in _QMAX:
                want = (slab.shape[0], scale_rows(slab.shape[1:]))
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
        if n is None:
            n = n_total
        elif n_total is not None and n_total != n:
            raise ValueError(f"n={n_total} given, but blocks hold N={n} task vectors")
        if n is None:
            if names is None:
                raise ValueError("a set of only ragged blocks needs n= or names=")
            n = len(names)
        if n == 0:
            raise ValueError("a task-vector set needs at least one task vector (N=0)")
        for name, idx in index.items():
            if name not in slabs and name not in lora:
                raise ValueError(f"index given for block {name!r}, which has no task vectors")
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n or idx.unique().numel() != idx.numel()):
                raise ValueError(f"block {name!r}: index must hold distinct task-vector numbers in [0, {n}), "
                                 f"got {idx.tolist()[:8]}")
        for name, (a, b) in lora.items():
            if b.dtype != a.dtype or b.device != a.device:
                raise ValueError(f"LoRA block {name!r}: A is {a.dtype} on {a.device}, B is {b.dtype} on {b.device}")
            _check_finite(b, f"LoRA factor B of block {name!r}")
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
        self._lora: Dict[str, tuple] = {k: (a.contiguous(), b.contiguous()) for k, (a, b) in lora.items()}
        self._index: Dict[str, torch.Tensor] = {k: v.to(self._device_of(k)) for k, v in index.items()}
        self._order: List[str] = [k for k in list(slabs) + list(lora)]
        self._names: List[str] = names
        self._n = n
        self._storage = storage

    def _device_of(self, block):
        return self._slabs[block].device if block in self._slabs else self._lora[block][0].device

    # ------------------------------------------------------------------ views
    def __len__(self) -> int:
        return self._n

    def __getitem__(self, block: str) -> torch.Tensor:
        """The block's ``[N, *shape]`` slab (``[n_b, *shape]`` for a ragged block, see :meth:`index`)."""
        if block in self._slabs:
            return self._slabs[block]
        if block in self._lora:
            raise KeyError(f"block {block!r} holds LoRA factors, not a dense slab: use .lora({block!r})")
        raise KeyError(f"no block {block!r} in these task vectors")

    def __contains__(self, block: str) -> bool:
        return block in self._slabs or block in self._lora

    def is_lora(self, block: str) -> bool:
        return block in self._lora

    def lora(self, block: str):
        """``(A [N, r, in], B [N, out, r])`` of a LoRA block: task vector i is ``B[i] @ A[i]``."""
        if block not in self._lora:
            raise KeyError(f"block {block!r} is not a LoRA block")
        return self._lora[block]

    def block_spec(self, block: str, partition: Partition) -> BlockSpec:
        """One block's :class:`~atlas_kernels.blocks.BlockSpec` (slab or LoRA factors, scale, index, N)
        for coefficients split by ``partition``: what patching hands the module that holds it."""
        if block not in self:
            raise KeyError(f"no block {block!r} in these task vectors")
        if block in self._lora:
            return BlockSpec(None, None, partition, lora=self._lora[block], index=self.index(block), n=self._n)
        return BlockSpec(self._slabs[block], self.scale(block), partition, index=self.index(block), n=self._n)

    def index(self, block: str) -> Optional[torch.Tensor]:
        """For a ragged block (a per-block budget): the task-vector numbers its slab holds, else None."""
        if block not in self:
            raise KeyError(f"no block {block!r} in these task vectors")
        return self._index.get(block)

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
        return list(self._order)

    @property
    def storage(self) -> str:
        return self._storage

    @property
    def device(self) -> torch.device:
        return self._device_of(self._order[0])

    @property
    def numel(self) -> int:
        """Elements per task vector (the number of adapted parameters)."""
        return sum(self.shape(b).numel() for b in self._order)

    @property
    def nbytes(self) -> int:
        """Bytes held: slabs, scales and LoRA factors."""
        tensors = list(self._slabs.values()) + list(self._scales.values())
        tensors += [t for ab in self._lora.values() for t in ab]
        return sum(t.numel() * t.element_size() for t in tensors)

    def shape(self, block: str) -> torch.Size:
        if block in self._lora:
            a, b = self._lora[block]
            return torch.Size((b.shape[1], a.shape[2]))
        return self[block].shape[1:]

    def scale(self, block: str) -> Optional[torch.Tensor]:
        """``[N, R]`` float32 scales of a compact block, or None."""
        if block not in self:
            raise KeyError(f"no block {block!r} in these task vectors")
        return self._scales.get(block)

    def dense(self, block: str, index: int) -> torch.Tensor:
        """Task vector ``index`` (0..N-1) of ``block`` in float32 (zeros where a budget dropped it)."""
        idx = self._index.get(block)
        if idx is not None:
            hits = (idx == index).nonzero()
            if hits.numel() == 0:
                return torch.zeros(self.shape(block), device=self.device)
            index = int(hits[0, 0])
        if block in self._lora:
            a, b = self._lora[block]
            return b[index].float() @ a[index].float()
        return dequantize_one(self[block][index], None if block not in self._scales else self._scales[block][index])

    # ------------------------------------------------------------ conversion
    def _rebuild(self, slabs=None, scales=None, lora=None, index=None, order=None) -> "TaskVectors":
        slabs = self._slabs if slabs is None else slabs
        lora = self._lora if lora is None else lora
        tv = TaskVectors(slabs, self._names, self._scales if scales is None else scales, lora=lora,
                         index=self._index if index is None else index, n=self._n)
        keep = [b for b in (order or self._order) if b in slabs or b in lora]
        tv._order = keep
        return tv

    def to(self, device) -> "TaskVectors":
        """Move to ``device``. Storage dtypes change only through :meth:`to_storage`."""
        if isinstance(device, torch.dtype) or (isinstance(device, str) and device in STORAGES):
            raise TypeError(f"TaskVectors.to takes a device, got {device!r}: change the storage dtype with "
                            f"task_vectors.to_storage({str(device).replace('torch.', '')!r}) (float32, bfloat16, "
                            f"float16, int8 or float8_e4m3fn; the last two keep a scale per row)")
        return self._rebuild({k: v.to(device) for k, v in self._slabs.items()},
                             {k: v.to(device) for k, v in self._scales.items()},
                             {k: (a.to(device), b.to(device)) for k, (a, b) in self._lora.items()},
                             {k: v.to(device) for k, v in self._index.items()})

    def to_storage(self, storage) -> "TaskVectors":
        """A copy in another storage dtype (re-quantized one task vector at a time). LoRA factors
        take float storages only (int8/fp8 apply to dense slabs; factors are already small)."""
        storage = _storage_name(storage)
        if storage == self._storage:
            return self
        slabs, scales = {}, {}
        for b, slab in self._slabs.items():
            parts = [quantize(dequantize_one(slab[i], self._scales[b][i] if b in self._scales else None), storage,
                              f"block {b!r} of task vector {self._names[i]!r}")
                     for i in range(slab.shape[0])]
            slabs[b] = torch.stack([p[0] for p in parts])
            if parts[0][1] is not None:
                scales[b] = torch.stack([p[1] for p in parts])
        fdt = STORAGES[storage] if storage not in _QMAX else torch.float16
        lora = {k: (a.to(fdt), b.to(fdt)) for k, (a, b) in self._lora.items()}
        return self._rebuild(slabs, scales, lora)

    def subset(self, blocks: Iterable[str]) -> "TaskVectors":
        """Only the named blocks."""
        blocks = list(blocks)
        for b in blocks:
            if b not in self:
                raise KeyError(f"no block {b!r} in these task vectors")
        keep = set(blocks)
        return self._rebuild({b: v for b, v in self._slabs.items() if b in keep},
                             {b: v for b, v in self._scales.items() if b in keep},
                             {b: v for b, v in self._lora.items() if b in keep},
                             {b: v for b, v in self._index.items() if b in keep}, order=blocks)

    def keep(self, selection: Mapping[str, Sequence[int]]) -> "TaskVectors":
        """A per-block budget: for each named block keep only the listed task vectors (ragged sets);
        blocks not named keep all of theirs, a block with an empty list is dropped. Coefficients stay
        ``(N,)`` per block; those of dropped task vectors stay at their value (0) and get no gradient.
        The memory saved is ``self.nbytes - result.nbytes``."""
        slabs, scales, lora, index = dict(self._slabs), dict(self._scales), dict(self._lora), dict(self._index)
        for b, wanted in selection.items():
            if b not in self:
                raise KeyError(f"selection names block {b!r}, which these task vectors do not have")
            wanted = sorted(int(i) for i in wanted)
            bad = [i for i in wanted if not 0 <= i < self._n]
            if bad:
                raise ValueError(f"selection for block {b!r}: task vectors {bad} are not in [0, {self._n})")
            held = self._index.get(b)
            held_list = list(range(self._n)) if held is None else held.tolist()
            missing = [i for i in wanted if i not in held_list]
            if missing:
                raise ValueError(f"selection for block {b!r}: task vectors {missing} were already dropped")
            if not wanted:
                for d in (slabs, scales, lora, index):
                    d.pop(b, None)
                continue
            rows = torch.tensor([held_list.index(i) for i in wanted], device=self._device_of(b))
            if b in slabs:
                slabs[b] = slabs[b].index_select(0, rows)
                if b in scales:
                    scales[b] = scales[b].index_select(0, rows)
            else:
                a, bb = lora[b]
                lora[b] = (a.index_select(0, rows), bb.index_select(0, rows))
            index[b] = torch.tensor(wanted, dtype=torch.int64)
            if len(wanted) == self._n:
                index.pop(b)
        if not slabs and not lora:
            raise ValueError("the selection drops every block")
        return self._rebuild(slabs, scales, lora, index)

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
        """Like :meth:`from_state_dicts`, reading checkpoint files one fine-tuned file at a time.

        Files: safetensors, torch-saved state dicts, or pickled whole modules as the task-vector papers
        released them (``src.modeling.ImageEncoder``, any open_clip version), read without running
        code (see :func:`load_state_dict_file`). ``prefix`` keeps the keys under it, stripped:
        ``"model.visual."`` for an ImageEncoder, ``"visual."`` for an open_clip CLIP state dict, or
        ``"auto"`` to find the image tower in each file (``visual.``, ``model.visual.``,
        ``module.visual.`` ...). Keys outside it (the text-tower leftovers) are dropped, with a note
        of their size on the ``atlas_kernels`` logger. ``names`` defaults to the files' stems."""
        if isinstance(finetuned_paths, (str, os.PathLike)):
            finetuned_paths = [finetuned_paths]
        finetuned_paths = list(finetuned_paths)
        if names is None:
            names = [os.path.splitext(os.path.basename(str(p)))[0] for p in finetuned_paths]
        pre = load_state_dict_file(pretrained_path)
        if prefix:
            pre, dropped, used = select_tower(pre, prefix, str(pretrained_path))
            if dropped:
                logging.getLogger("atlas_kernels").info("%s: %s", pretrained_path, dropped_note(dropped, used))
        lazy = _LazyDicts(finetuned_paths, prefix)
        return cls._build(pre, lazy, names, None, storage, labels=[str(p) for p in finetuned_paths])

    @classmethod
    def from_lora(cls, factors: Sequence[Mapping], *, names=None, storage=None) -> "TaskVectors":
        """LoRA task vectors: ``factors[i]`` maps block names to ``(A, B)`` with ``A`` of shape
        ``(r, in)`` and ``B`` of shape ``(out, r)``, so task vector i of that block is ``B @ A``.

        Never densified: a block stores ``A [N, r, in]`` and ``B [N, out, r]`` (ranks padded to the
        block's largest with zero rows, which add nothing); the forward uses ``x A^T`` then ``B``, or
        composes ``B diag(lam) A`` once for large batches. A task vector that does not name a block
        contributes nothing to it. ``storage``: float32 (default), bfloat16 or float16.
        """
        if isinstance(factors, Mapping):
            raise TypeError("factors must be a sequence (one mapping per task vector), got a single mapping")
        factors = list(factors)
        storage = _storage_name(storage)
        if storage in _QMAX:
            raise ValueError(f"LoRA factors take float storage (float32, bfloat16, float16), not {storage}")
        if not factors:
            raise ValueError("factors: need at least one task vector")
        dtype = STORAGES[storage]
        shapes: Dict[str, tuple] = {}
        ranks: Dict[str, int] = {}
        for i, f in enumerate(factors):
            if not isinstance(f, Mapping):
                raise TypeError(f"factors[{i}] must map block names to (A, B), got {type(f).__name__}")
            for b, ab in f.items():
                a, bb = lora_pair(ab, f"factors[{i}][{b!r}]")
                if not (a.is_floating_point() and bb.is_floating_point()):
                    raise TypeError(f"factors[{i}][{b!r}]: LoRA factors must be floating, got {a.dtype}, {bb.dtype}")
                shape = (bb.shape[0], a.shape[1])
                if shapes.setdefault(b, shape) != shape:
                    raise ValueError(f"block {b!r}: factors[{i}] gives a ({shape[0]}, {shape[1]}) update, an earlier "
                                     f"task vector a {shapes[b]} one")
                ranks[b] = max(ranks.get(b, 0), a.shape[0])
                _check_finite(a, f"LoRA factor A of block {b!r} in factors[{i}]")
                _check_finite(bb, f"LoRA factor B of block {b!r} in factors[{i}]")
        lora = {}
        n = len(factors)
        for b, (out, inn) in shapes.items():
            r = ranks[b]
            dev = next(f[b][0].device for f in factors if b in f)
            a_all = torch.zeros((n, r, inn), dtype=dtype, device=dev)
            b_all = torch.zeros((n, out, r), dtype=dtype, device=dev)
            for i, f in enumerate(factors):
                if b in f:
                    a, bb = f[b]
                    a_all[i, : a.shape[0]] = a.to(dtype)
                    b_all[i, :, : a.shape[0]] = bb.to(dtype)
            lora[b] = (a_all, b_all)
        return cls({}, names, lora=lora, n=n)

    @classmethod
    def from_peft(cls, paths: Sequence, *, names=None, module_prefix=None, storage=None) -> "TaskVectors":
        """LoRA task vectors from PEFT adapters (directories holding ``adapter_model.safetensors`` and
        ``adapter_config.json``), with PEFT's ``lora_alpha / r`` scaling folded into ``B``.
        ``module_prefix`` (e.g. ``"visual."``) is stripped from the adapters' module names so they
        match the module you patch. ``names`` defaults to the adapter folders' names."""
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        paths = list(paths)
        if names is None:
            names = [os.path.basename(os.path.normpath(str(p))) for p in paths]
        factors = [read_peft_adapter(p, module_prefix=module_prefix) for p in paths]
        return cls.from_lora(factors, names=names, storage=storage)

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
                q, sc = quantize(tau, storage, f"block {k!r} of {label} (fine-tuned minus pre-trained)")
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
        from .._io import atomic_save_safetensors

        tensors = {}
        for b, s in self._slabs.items():
            tensors["tau/" + b] = s.detach().contiguous().cpu()
        for b, s in self._scales.items():
            tensors["scale/" + b] = s.detach().contiguous().cpu()
        for b, (a, bb) in self._lora.items():
            tensors["lora_a/" + b] = a.detach().contiguous().cpu()
            tensors["lora_b/" + b] = bb.detach().contiguous().cpu()
        for b, idx in self._index.items():
            tensors["index/" + b] = idx.detach().contiguous().cpu()
        meta = {
            "n": str(self._n),
            "format": _FORMAT,
            "version": _VERSION,
            "names": json.dumps(self._names),
            "blocks": json.dumps(self.blocks),
            "shapes": json.dumps({b: list(self.shape(b)) for b in self.blocks}),
            "storage": self._storage,
            "crc32": json.dumps({k: _crc(v) for k, v in tensors.items()}),
        }
        meta[_META_CRC] = str(_meta_crc(meta))  # the metadata is checked too, not only the tensors
        atomic_save_safetensors(tensors, str(path), metadata=meta)

    @classmethod
    def load(cls, path, device=None, *, verify: bool = True) -> "TaskVectors":
        """Read a file written by :meth:`save`. ``verify`` checks every tensor's CRC32."""
        from safetensors import safe_open

        path = str(path)
        from ..checkpoints import check_file

        check_file(path, "task-vector file")
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                if meta.get("format") != _FORMAT:
                    raise ValueError(f"{path!r} is a safetensors file but not an atlas_kernels task-vector file "
                                     f"(metadata format={meta.get('format')!r}, expected {_FORMAT!r})")
                if meta.get("version") != _VERSION:
                    raise ValueError(f"{path!r}: task-vector file version {meta.get('version')!r} is not "
                                     f"supported (expected {_VERSION!r})")
                if verify and _META_CRC in meta and meta[_META_CRC] != str(_meta_crc(meta)):
                    raise ValueError(f"{path!r}: the metadata fails its CRC32 check (names, blocks, shapes, "
                                     f"storage or the tensor checksums were changed): the file is corrupted")
                names = _meta_json(meta, "names", list, path)
                blocks = _meta_json(meta, "blocks", list, path)
                shapes = _meta_json(meta, "shapes", dict, path)
                crcs = _meta_json(meta, "crc32", dict, path, default="{}")
                keys = set(f.keys())
                listed = {p + b for b in blocks for p in ("tau/", "scale/", "lora_a/", "lora_b/", "index/")}
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
                    if list(t.shape[1:]) != shapes[b] or t.shape[0] != rows:
                        raise ValueError(f"{path!r}: block {b!r} has shape {tuple(t.shape)}, metadata says "
                                         f"[{rows}, {', '.join(map(str, shapes[b]))}]")
                    slabs[b] = t
                    if "scale/" + b in keys:
                        scales[b] = f.get_tensor("scale/" + b)
        except ValueError:
            raise
        except Exception as exc:  # safetensors raises its own error types for broken headers
            raise ValueError(f"{path!r} is not a readable safetensors file (truncated or corrupted?): {exc}") from exc
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
        tv = cls(slabs, names, scales, lora=lora, index=index, n=n_meta)
        tv._order = list(blocks)
        if meta.get("storage") != tv.storage:
            raise ValueError(f"{path!r}: metadata says storage {meta.get('storage')!r}, tensors are {tv.storage}")
        return tv if device is None else tv.to(device)


# --------------------------------------------------------------------------- helpers
_META_CRC = "metadata_crc32"


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
    """Fine-tuned state dicts read from files one at a time (only one in memory), each cut to the
    keys under ``prefix`` (``"auto"``: found per file)."""

    def __init__(self, paths, prefix=None):
        self.paths, self.prefix = paths, prefix

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        sd = load_state_dict_file(self.paths[i])
        return select_tower(sd, self.prefix, str(self.paths[i]))[0] if self.prefix else sd

