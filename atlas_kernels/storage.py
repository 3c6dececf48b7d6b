"""The task-vector storage table: how each storage keeps a block's slab, in one place.

A slab ``[N, *S]`` in storage ``s`` takes ``N * prod(S) * BYTES_PER_ELEMENT[s]`` bytes. A scaled
storage (``s in SCALED``: int8, float8) also keeps a float32 scale ``[N, R]`` with
``R = scale_rows(S)`` (``S[0]`` for blocks of 2 or more dimensions, 1 otherwise): task vector ``i``
is stored as ``tau_i / scale_i`` per row, each row's largest magnitude mapped to ``QMAX[s]``, and
read back as ``tau_q * scale`` (see :func:`atlas_kernels.reference.dequantize`).

The table is plain Python and importing this module imports no torch: bench's table printer
reads the byte counts without it. The torch side, :func:`torch_dtypes` (the same names as torch
dtypes, ``atlas_kernels.task_vectors.STORAGES``), :func:`storage_name`, :func:`quantize` and
:func:`dequantize_one`, imports torch when first called.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, Optional

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["Storage", "TABLE", "NAMES", "BYTES_PER_ELEMENT", "SCALED", "QMAX", "SCALE_BYTES", "scale_rows",
           "slab_bytes", "torch_dtypes", "storage_name", "quantize", "dequantize_one"]


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


# ------------------------------------------------------------------ the torch side (torch on first call)
_DTYPES: Dict[str, "torch.dtype"] = {}


def torch_dtypes() -> Dict[str, "torch.dtype"]:
    """The storage names (with float64, for reference work) as torch dtypes; one shared dict."""
    if not _DTYPES:
        import torch

        _DTYPES.update({name: getattr(torch, name) for name in NAMES})
    return _DTYPES


def storage_name(storage) -> str:
    """The storage's name from a name, a torch dtype, or None (float32); ValueError for others."""
    import torch

    dtypes = torch_dtypes()
    if storage is None:
        return "float32"
    if isinstance(storage, torch.dtype):
        for k, v in dtypes.items():
            if v == storage:
                return k
    if isinstance(storage, str) and storage in dtypes:
        return storage
    raise ValueError(f"storage must be one of {sorted(dtypes)}, got {storage!r}")


def quantize(t: "torch.Tensor", storage: str, what: str = "a task vector"):
    """One task vector's block (float) in ``storage``: ``(data, scale or None)``; scale is ``[R]``.
    A finite value that overflows a float storage (|x| > 65504 in float16) is refused, naming the
    storage and the largest value."""
    import torch

    from ._checks import all_finite

    dtype = torch_dtypes()[storage]
    if storage not in QMAX:
        out = t.to(dtype)
        if out.is_floating_point() and not all_finite(out) and all_finite(t):
            big = float(t.abs().max())
            raise ValueError(f"{what} overflows {storage} storage: its largest magnitude is {big:.6g}, above "
                             f"{storage}'s largest finite value {torch.finfo(dtype).max:.6g}; use "
                             f"storage='bfloat16', 'float32' or 'int8' (scaled) for it")
        return out, None
    t = t.float()
    r = scale_rows(t.shape)
    rows = t.reshape(r, -1)
    amax = rows.abs().amax(dim=1)
    # A row whose largest magnitude is subnormal (below ~1.2e-38) would get a scale that is
    # subnormal or 0 (amax / QMAX underflows), and q = row / 0 is inf: NaN in float8. Its scale is
    # held at float32's smallest normal number instead, so the row quantizes like any other (an
    # absolute error below 1e-38, where its values are that small anyway).
    tiny = torch.finfo(torch.float32).tiny
    scale = torch.where(amax > 0, (amax / QMAX[storage]).clamp_min(tiny), torch.ones_like(amax))
    q = rows / scale[:, None]
    if storage == "int8":
        q = q.round().clamp_(-127, 127)
    return q.to(dtype).reshape(t.shape), scale


def dequantize_one(data: "torch.Tensor", scale: Optional["torch.Tensor"]) -> "torch.Tensor":
    """One task vector's block back in float32."""
    t = data.float()
    if scale is None:
        return t
    r = scale_rows(t.shape)
    return (t.reshape(r, -1) * scale.float()[:, None]).reshape(t.shape)
