"""The task-vector storage table: how each storage keeps a block's slab, in one place.

A slab ``[N, *S]`` in storage ``s`` takes ``N * prod(S) * BYTES_PER_ELEMENT[s]`` bytes. A scaled
storage (``s in SCALED``: int8, float8) also keeps a float32 scale ``[N, R]`` with
``R = scale_rows(S)`` (``S[0]`` for blocks of 2 or more dimensions, 1 otherwise): task vector ``i``
is stored as ``tau_i / scale_i`` per row, each row's largest magnitude mapped to ``QMAX[s]``, and
read back as ``tau_q * scale`` (see :func:`atlas_kernels.reference.dequantize`).

Plain Python, no torch: bench's table printer reads the byte counts without importing torch.
``atlas_kernels.task_vectors.STORAGES`` maps the same names to torch dtypes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

__all__ = ["Storage", "TABLE", "NAMES", "BYTES_PER_ELEMENT", "SCALED", "QMAX", "SCALE_BYTES", "scale_rows",
           "slab_bytes"]


@dataclass(frozen=True)
class Storage:
    name: str                    # the torch dtype's name (``getattr(torch, name)``)
    bytes_per_element: int
    scaled: bool                 # a per-row float32 scale is kept beside the slab
    qmax: Optional[float] = None  # scaled storages: the largest magnitude a stored element holds


TABLE = {s.name: s for s in (
    Storage("float64", 8, False),  # for float64 reference work and tests
    Storage("float32", 4, False),
    Storage("bfloat16", 2, False),
    Storage("float16", 2, False),
    Storage("int8", 1, True, 127.0),
    Storage("float8_e4m3fn", 1, True, 448.0),
)}
NAMES = tuple(TABLE)
BYTES_PER_ELEMENT = {n: s.bytes_per_element for n, s in TABLE.items()}
SCALED = tuple(n for n, s in TABLE.items() if s.scaled)
QMAX = {n: s.qmax for n, s in TABLE.items() if s.scaled}
SCALE_BYTES = 4  # the per-row scales are float32


def scale_rows(shape) -> int:
    """Rows of a compact block's per-row scale: ``S[0]`` for blocks of 2 or more dims, 1 for 1-D."""
    return int(shape[0]) if len(shape) >= 2 else 1


def slab_bytes(n: int, shape, storage: str) -> int:
    """Bytes of ``n`` task vectors of one block of ``shape`` in ``storage``, per-row scales included."""
    numel = 1
    for d in shape:
        numel *= int(d)
    out = n * numel * BYTES_PER_ELEMENT[storage]
    if TABLE[storage].scaled:
        out += n * scale_rows(shape) * SCALE_BYTES
    return out
