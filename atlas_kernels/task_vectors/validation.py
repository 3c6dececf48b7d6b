"""What a :class:`~atlas_kernels.task_vectors.TaskVectors` accepts, checked in one function.

:func:`validate` takes the constructor's arguments and returns them checked and made contiguous
(:class:`Checked`), or raises naming the block, what was expected and what arrived: every block
holds the same number N of task vectors (a ragged block lists the ones it holds in ``index``), in
one storage dtype on one device; compact storages carry finite float32 scales ``[N, R]``; LoRA
blocks hold ``A [N, r, in]`` and ``B [N, out, r]``; nothing holds NaN or inf.
"""
from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Dict, List, NamedTuple, Optional, Sequence

import torch

from .._checks import all_finite, require_finite
from ..storage import QMAX, scale_rows, storage_name, torch_dtypes

__all__ = ["Checked", "validate"]


class Checked(NamedTuple):
    slabs: Dict[str, torch.Tensor]
    scales: Dict[str, torch.Tensor]
    lora: Dict[str, tuple]
    index: Dict[str, torch.Tensor]
    order: List[str]
    names: List[str]
    n: int
    storage: str


def _check_lora_shapes(lora: Mapping) -> None:
    for name, (a, b) in lora.items():
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.dim() != 3 or b.dim() != 3:
            raise ValueError(f"LoRA block {name!r}: expected A [N, r, in] and B [N, out, r] tensors")
        if a.shape[0] != b.shape[0] or a.shape[1] != b.shape[2]:
            raise ValueError(f"LoRA block {name!r}: A {tuple(a.shape)} and B {tuple(b.shape)} do not match "
                             f"(need A [N, r, in], B [N, out, r])")


def _check_scales(name: str, st: str, slab: torch.Tensor, sc: Optional[torch.Tensor]) -> None:
    if st in QMAX:
        want = (slab.shape[0], scale_rows(slab.shape[1:]))
        if sc is None or tuple(sc.shape) != want or sc.dtype != torch.float32:
            got = "none" if sc is None else f"{tuple(sc.shape)} {sc.dtype}"
            raise ValueError(f"block {name!r}: {st} storage needs float32 scales of shape {want}, "
                             f"got {got}")
        if not all_finite(sc):
            raise ValueError(f"block {name!r}: scales hold NaN or inf")
        # A scale maps a row's largest magnitude to QMAX, so it is > 0 (1.0 for an all-zero row). A
        # negative scale would flip that row of the task vector's sign, and a zero one erase it:
        # both without any other sign, so they are refused.
        bad = (sc <= 0).nonzero()
        if bad.numel():
            i, r = (int(v) for v in bad[0])
            raise ValueError(f"block {name!r}: {st} scales must be positive (each row's largest magnitude / "
                             f"{QMAX[st]:g}), got {float(sc[i, r]):.6g} for task vector {i}, row {r} "
                             f"({bad.shape[0]} such scale(s)); a negative scale would flip that row's sign")
    elif sc is not None:
        raise ValueError(f"block {name!r}: scales are only for int8/float8_e4m3fn storage, not {st}")


def _index_tensor(name: str, v) -> torch.Tensor:
    """A ragged block's index as int64, refusing what is not integers: ``[0.7]`` was cast to
    ``[0]`` (a silent wrong task vector), ``[True]`` to ``[1]``."""
    why = "a fraction or a bool is not a task vector's number"
    if isinstance(v, (list, tuple, range)):
        if not all(isinstance(x, numbers.Integral) and not isinstance(x, bool) for x in v):
            raise TypeError(f"block {name!r}: index must list task-vector numbers (integers), got {list(v)[:8]}; "
                            f"{why}")
        return torch.tensor([int(x) for x in v], dtype=torch.int64)
    try:
        t = torch.as_tensor(v)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"block {name!r}: index must list task-vector numbers (integers), got "
                        f"{type(v).__name__}") from None
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"block {name!r}: index must hold task-vector numbers (integers), got a {t.dtype} tensor "
                        f"{t.tolist() if t.dim() == 0 else t.tolist()[:8]}; {why}")
    return t.to(torch.int64)


def validate(slabs: Mapping, names: Optional[Sequence[str]], scales: Optional[Mapping], lora: Optional[Mapping],
             index: Optional[Mapping], n: Optional[int]) -> Checked:
    """The arguments of ``TaskVectors(slabs, names, scales, lora=, index=, n=)`` checked (see the
    module docstring); ``order`` lists the dense blocks, then the LoRA ones."""
    dtypes = torch_dtypes()
    slabs = dict(slabs or {})
    lora = dict(lora or {})
    index = {k: _index_tensor(k, v) for k, v in (index or {}).items()}
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
    _check_lora_shapes(lora)
    for name, slab in list(slabs.items()) + [(k, v[0]) for k, v in lora.items()]:
        if not isinstance(slab, torch.Tensor):
            raise TypeError(f"block {name!r}: expected a tensor, got {type(slab).__name__}")
        if slab.dim() < 1:
            raise ValueError(f"block {name!r}: expected a [N, *shape] slab, got a 0-d tensor")
        st = storage_name(slab.dtype) if slab.dtype in dtypes.values() else None
        if st is None:
            raise TypeError(f"block {name!r}: task vectors must be one of {sorted(dtypes)}, got {slab.dtype}")
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
        _check_scales(name, st, slab, scales.get(name))
        if st not in QMAX or st == "float8_e4m3fn":
            require_finite(slab, f"task vectors of block {name!r}")
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
        require_finite(b, f"LoRA factor B of block {name!r}")
    extra = set(scales) - set(slabs)
    if extra:
        raise ValueError(f"scales given for blocks without slabs: {sorted(extra)[:5]}")
    if names is None:
        names = [f"task_vector_{i}" for i in range(n)]
    if isinstance(names, str):
        raise TypeError(f"names must be a list of N strings, got the single string {names!r}")
    names = [str(x) for x in names]
    if len(names) != n:
        raise ValueError(f"names: expected {n} names (one per task vector), got {len(names)}")
    dup = sorted({x for x in names if names.count(x) > 1})
    if dup:
        raise ValueError(f"names: task-vector names must be distinct (coefficient files and reports find a task "
                         f"vector by its name), got {dup[:3]} more than once in {names[:8]}")
    slabs = {k: v.contiguous() for k, v in slabs.items()}
    lora = {k: (a.contiguous(), b.contiguous()) for k, (a, b) in lora.items()}
    devices = {**{k: v.device for k, v in slabs.items()}, **{k: ab[0].device for k, ab in lora.items()}}
    return Checked(slabs, {k: v.contiguous() for k, v in scales.items()}, lora,
                   {k: v.to(devices[k]) for k, v in index.items()}, list(slabs) + list(lora), names, n, storage)
