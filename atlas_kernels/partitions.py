"""Partition layouts for aTLAS x K: which of a block's K coefficients each element uses.

A block with ``numel`` elements, viewed flat in row-major (C) order, is split into ``K`` parts.
Element ``e`` (0 <= e < numel) of the block uses coefficient ``lam[i, part(e)]``. Two layouts:

``"contiguous"``
    ``part(e) = floor(e * K / numel)``: K contiguous chunks of the flattened block, sizes differing
    by at most one. For a 2-D weight whose row count is a multiple of K this is exactly "rows in K
    equal groups"; it is defined for 1-D and 4-D blocks too (no block silently gets a zero update).

``"hash"``
    ``part(e) = mix32(e XOR key) mod K`` with ``key = partition_key(block_name, seed)``: a seeded
    pseudo-random elementwise split. Nothing is stored: kernels recompute it from ``(key, e)``, so
    it costs zero memory and is reproducible across runs, devices and backends.

``mix32`` is the "lowbias32" integer hash (C. Wellons): on unsigned 32-bit integers,
``x ^= x >> 16; x *= 0x7FEB352D; x ^= x >> 15; x *= 0x846CA68B; x ^= x >> 16`` (products modulo
2**32). Blocks are limited to 2**32 elements in hash mode.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch

MASK32 = 0xFFFFFFFF
MIX_C1 = 0x7FEB352D
MIX_C2 = 0x846CA68B
GOLDEN = 0x9E3779B9
MODES = ("contiguous", "hash")


def mix32_int(x: int) -> int:
    """``mix32`` on a Python int (treated as uint32)."""
    x &= MASK32
    x ^= x >> 16
    x = (x * MIX_C1) & MASK32
    x ^= x >> 15
    x = (x * MIX_C2) & MASK32
    x ^= x >> 16
    return x


def _mulmod32(x: torch.Tensor, c: int) -> torch.Tensor:
    # (x * c) mod 2**32 for int64 tensors holding uint32 values, without int64 overflow:
    # split x into 16-bit halves; only the low 16 bits of (hi * c) survive the shift.
    lo = x & 0xFFFF
    hi = x >> 16
    return ((lo * c) + (((hi * c) & 0xFFFF) << 16)) & MASK32


def mix32(x: torch.Tensor) -> torch.Tensor:
    """``mix32`` elementwise on an int64 tensor of values in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = _mulmod32(x, MIX_C1)
    x = x ^ (x >> 15)
    x = _mulmod32(x, MIX_C2)
    x = x ^ (x >> 16)
    return x


def partition_key(block_name: str, seed: int) -> int:
    """The per-block hash key: depends only on the block's name and the user's seed."""
    return mix32_int(zlib.crc32(block_name.encode("utf-8")) ^ mix32_int((seed * GOLDEN) & MASK32))


@dataclass(frozen=True)
class Partition:
    """How one block is split into ``k`` parts (see the module docstring)."""

    k: int = 1
    mode: str = "contiguous"
    key: int = 0

    def __post_init__(self):
        if not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"partitions must be an integer >= 1, got {self.k!r}")
        if self.mode not in MODES:
            raise ValueError(f"partition_mode must be one of {MODES}, got {self.mode!r}")

    @property
    def code(self) -> int:
        """The kernels' mode code: 0 for ``k == 1`` (every element in part 0), 1 contiguous, 2 hash."""
        if self.k == 1:
            return 0
        return 1 if self.mode == "contiguous" else 2

    def encoding(self) -> tuple:
        """``(k, code, key)``: the one encoding every kernel takes (Triton and the compiled
        extension); ``key`` is 0 unless the split is hashed."""
        code = self.code
        return self.k, code, self.key if code == 2 else 0

    @classmethod
    def for_block(cls, name: str, k: int, mode: str = "contiguous", seed: int = 0) -> "Partition":
        return cls(k=k, mode=mode, key=partition_key(name, seed) if mode == "hash" else 0)

    def index(self, numel: int, device=None) -> torch.Tensor:
        """int64 tensor of shape ``(numel,)``: the part of every element of the flattened block."""
        e = torch.arange(numel, device=device, dtype=torch.int64)
        if self.k == 1:
            return torch.zeros_like(e)
        if self.mode == "contiguous":
            return (e * self.k) // numel
        if numel > 2**32:
            raise ValueError(f"hash partitions need blocks under 2**32 elements, got {numel}")
        return mix32(e ^ self.key) % self.k


def coef_shape(n: int, k: int) -> tuple:
    """The shape of one block's coefficients: ``(N,)`` for K = 1, else ``(N, K)``."""
    return (n,) if k == 1 else (n, k)
