"""Many blocks, one pass: :class:`BlockGroup`, the blocks a backend composes together.

A group holds the blocks of a patched tower that share a device, a backend, a theta0 dtype and a
storage (with or without per-row scales): one :class:`Entry` per block, referencing the module's
own tensors (nothing is copied or packed). Entries are ordered by output class: ``sel`` 0 for the
blocks a linear layer reads through ``F.linear`` (composed in the compute dtype: the autocast dtype
under autocast), then ``sel`` 1 for every other block (composed in theta0's dtype, as the plain
model would hold it). The backend's ``prepare_group`` adds its launch tables
(:func:`atlas_kernels.kernels.group_table` for Triton).
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn as nn

from .partitions import Partition

__all__ = ["Entry", "BlockGroup"]


class Entry:
    """One block of a group: its owner and local name, its tensors (theta0, slab, scale,
    coefficients, ragged index and ``rows``: the coefficient row of each held slab), its partition,
    its output class ``sel`` and where it sits in the group's flat buffers (``out_off`` in its
    class's output, ``coef_off`` in the flat coefficient gradient)."""

    __slots__ = ("owner", "name", "theta0", "tau", "scale", "coef", "index", "rows", "partition", "sel",
                 "shape", "out_off", "coef_off", "fast")

    def __init__(self, owner: nn.Module, name: str, sel: int, partition: Partition):
        b = owner._buffers
        self.owner, self.name, self.sel, self.partition = owner, name, sel, partition
        self.theta0 = b[name]
        self.tau = b[name + "_tau"]
        self.scale = b[name + "_scale"]
        self.index = b[name + "_index"]
        self.coef = owner._parameters[name + "_coef"]
        self.shape = tuple(self.theta0.shape)
        self.rows = self.index
        self.out_off = self.coef_off = 0
        self.fast = None

    def groupable(self) -> Optional[str]:
        """Why this block cannot join a group (None: it can): the kernels read contiguous tensors
        of the expected dtypes at fixed addresses."""
        if not self.theta0.is_contiguous() or not self.tau.is_contiguous():
            return "theta0 or its slab is not contiguous"
        if self.coef.dtype != torch.float32 or not self.coef.is_contiguous():
            return "coefficients are not contiguous float32"
        if self.scale is not None and (self.scale.dtype != torch.float32 or not self.scale.is_contiguous()):
            return "scales are not contiguous float32"
        devices = {t.device for t in (self.theta0, self.tau, self.coef, self.scale, self.index) if t is not None}
        if len(devices) != 1:
            return f"its tensors are on several devices ({sorted(map(str, devices))})"
        return None

    def key(self, backend_name: str):
        return (str(self.theta0.device), backend_name, self.theta0.dtype, self.tau.dtype, self.scale is not None)


class BlockGroup:
    """The entries one backend composes in one pass, with the flat layout of its outputs: class
    ``sel`` has ``sizes[sel]`` elements, entry ``e`` at ``[e.out_off, e.out_off + numel)``;
    ``shape_refs[sel]`` are the entries' theta0 (whose shapes the views take); ``coefs`` are the
    entries' coefficient parameters, laid out back to back (``e.coef_off``) in the flat gradient."""

    def __init__(self, backend, entries: List[Entry]):
        self.backend = backend
        self.entries = sorted(entries, key=lambda e: e.sel)
        first = self.entries[0]
        self.device = first.theta0.device
        self.scaled = first.scale is not None
        self.sizes = [0, 0]
        self.shape_refs = ([], [])
        coef_off = 0
        identity = None
        for e in self.entries:
            e.out_off = self.sizes[e.sel]
            self.sizes[e.sel] += e.theta0.numel()
            self.shape_refs[e.sel].append(e.theta0)
            e.coef_off = coef_off
            coef_off += e.coef.numel()
            if e.index is None:
                n = e.tau.shape[0]
                if identity is None or identity.numel() < n:
                    identity = torch.arange(max(n, 1), dtype=torch.int64, device=self.device)
                e.rows = identity[:n]
        self.coefs = [e.coef for e in self.entries]
        self.launch = None
        backend.prepare_group(self)

    def __len__(self) -> int:
        return len(self.entries)

    def __repr__(self) -> str:
        return (f"BlockGroup(backend={self.backend.name!r}, blocks={len(self.entries)}, device={self.device}, "
                f"elements={self.sizes[0] + self.sizes[1]:,})")
