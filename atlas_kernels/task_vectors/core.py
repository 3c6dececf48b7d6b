"""The :class:`TaskVectors` class: N task vectors over named blocks, and its views.

Validation is :mod:`.validation`, the builders :mod:`.builders`, the file format :mod:`.files`;
storage dtypes and quantising live in :mod:`atlas_kernels.storage`.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Dict, Iterable, List, Optional, Sequence

import torch

from ..blocks import BlockSpec
from ..partitions import Partition
from ..storage import QMAX, dequantize_one, quantize, storage_name, torch_dtypes
from . import builders, files
from .validation import validate

__all__ = ["TaskVectors", "STORAGES"]

# The storage names (atlas_kernels.storage: bytes, per-row scales, largest quantized magnitude) as
# torch dtypes.
STORAGES: Dict[str, torch.dtype] = torch_dtypes()


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
        c = validate(slabs, names, scales, lora, index, n)
        self._slabs: Dict[str, torch.Tensor] = c.slabs
        self._scales: Dict[str, torch.Tensor] = c.scales
        self._lora: Dict[str, tuple] = c.lora
        self._index: Dict[str, torch.Tensor] = c.index
        self._order: List[str] = c.order
        self._names: List[str] = c.names
        self._n = c.n
        self._storage = c.storage
        # TaskVectors.load_shard: this process's rows of every block (see atlas_kernels.sharding)
        self._sharding: Optional[TVSharding] = None

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
        where = "" if self._sharding is None else f", rows of shard {self._sharding.rank} of {self._sharding.world}"
        return (f"TaskVectors(n={len(self)}, blocks={len(self._order)}, storage={self._storage!r}, "
                f"elements={self.numel:,}, nbytes={self.nbytes:,}, device={self.device}{where})")

    @property
    def sharding(self) -> Optional["TVSharding"]:
        """For task vectors read with :meth:`load_shard`: which process's rows they hold (None: whole)."""
        return self._sharding

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
    def whole_nbytes(self) -> int:
        """Bytes of the whole set (:attr:`nbytes` unless these are one process's rows)."""
        return self.nbytes if self._sharding is None else self._sharding.whole_nbytes

    @property
    def nbytes(self) -> int:
        """Bytes held (measured from the tensors; for :meth:`load_shard` rows, this process's): slabs,
        scales and LoRA factors."""
        tensors = list(self._slabs.values()) + list(self._scales.values())
        tensors += [t for ab in self._lora.values() for t in ab]
        return sum(t.numel() * t.element_size() for t in tensors)

    def shape(self, block: str) -> torch.Size:
        """The block's shape (the whole block's, also for :meth:`load_shard` rows)."""
        if self._sharding is not None and block in self._sharding.shapes:
            return torch.Size(self._sharding.shapes[block])
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
        tv._sharding = self._sharding
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
        storage = storage_name(storage)
        if storage == self._storage:
            return self
        if self._sharding is not None:
            raise ValueError("to_storage on one process's rows (TaskVectors.load_shard): a 1-D block's int8/fp8 "
                             "scale spans every process's rows; convert the whole set once "
                             "(TaskVectors.load(path).to_storage(...).save(new_path)) and load_shard the new file")
        slabs, scales = {}, {}
        for b, slab in self._slabs.items():
            parts = [quantize(dequantize_one(slab[i], self._scales[b][i] if b in self._scales else None), storage,
                              f"block {b!r} of task vector {self._names[i]!r}")
                     for i in range(slab.shape[0])]
            slabs[b] = torch.stack([p[0] for p in parts])
            if parts[0][1] is not None:
                scales[b] = torch.stack([p[1] for p in parts])
        fdt = STORAGES[storage] if storage not in QMAX else torch.float16
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
    # The builders and the file format take the class as their first argument (see builders.py,
    # files.py, which document them): TaskVectors.from_lora(factors) is builders.from_lora(TaskVectors, factors).
    from_state_dicts = classmethod(builders.from_state_dicts)
    from_checkpoints = classmethod(builders.from_checkpoints)
    from_lora = classmethod(builders.from_lora)
    from_peft = classmethod(builders.from_peft)

    # ------------------------------------------------------------------ files
    save = files.save
    load = classmethod(files.load)
    load_shard = classmethod(files.load_shard)


class TVSharding:
    """Which rows of every block a :meth:`TaskVectors.load_shard` set holds: this ``rank`` of
    ``world`` processes, ``ceil(R / world)`` rows of each block of ``R`` rows (see
    :mod:`atlas_kernels.sharding`); ``shapes``: the whole blocks' shapes; ``whole_nbytes``: the
    whole set's bytes (from the file's header); ``group``: the process group they were read for."""

    def __init__(self, rank: int, world: int, shapes: Dict[str, tuple], whole_nbytes: int, group=None):
        self.rank, self.world, self.shapes, self.whole_nbytes, self.group = rank, world, shapes, whole_nbytes, group

    def __repr__(self) -> str:
        return f"TVSharding(rank={self.rank}, world={self.world}, blocks={len(self.shapes)})"
