"""Compose kernels: ``W = theta0 + sum_i coef[i, part(e)] * tau_i[e]`` in one pass over the slabs.

``compose`` handles one block (one launch); ``compose_packed`` handles many small blocks (LayerNorm
weights and biases, linear biases, embeddings) packed into flat buffers, in one launch. The matching
backward for the packed layout, ``coef_grad_packed``, lives here too because it shares the table.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
import triton
import triton.language as tl

from ..partitions import Partition
from ._common import (
    INTERPRET,
    MODE_HASH,
    _cast_out,
    _part_index,
    _part_index_rt,
    check_hash_numel,
    launch_block,
    mode_code,
    next_pow2,
    scale_rows,
    scratch,
)

__all__ = [
    "compose",
    "compose_packed",
    "coef_grad_packed",
    "PackedLayout",
    "make_packed_layout",
    "SEG_COLUMNS",
]


# --------------------------------------------------------------------------------------------
# one block
# --------------------------------------------------------------------------------------------
@triton.jit
def _compose_kernel(
    theta0_ptr, tau_ptr, coef_ptr, scale_ptr, out_ptr,
    numel, N, key, row_len, R,
    K: tl.constexpr, MODE: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    acc = tl.load(theta0_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    part = _part_index(offs, numel, key, K, MODE)
    if HAS_SCALE:
        row = offs // row_len
    tau_i = tau_ptr  # slab i starts at tau_ptr + i * numel: a 64-bit scalar pointer
    for i in range(N):
        t = tl.load(tau_i + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_SCALE:
            t = t * tl.load(scale_ptr + i * R + row, mask=mask, other=0.0)
        if K == 1:
            c = tl.load(coef_ptr + i)
        else:
            c = tl.load(coef_ptr + i * K + part, mask=mask, other=0.0)
        acc += c * t
        tau_i += numel
    tl.store(out_ptr + offs, _cast_out(acc, out_ptr.dtype.element_ty), mask=mask)


if INTERPRET:
    _compose_launch = _compose_kernel
    _COMPOSE_FIXED = {"BLOCK": 4096}
else:  # pragma: no cover - GPU only
    _compose_launch = triton.autotune(
        configs=[
            triton.Config({"BLOCK": 1024}, num_warps=4),
            triton.Config({"BLOCK": 2048}, num_warps=4),
            triton.Config({"BLOCK": 2048}, num_warps=8),
            triton.Config({"BLOCK": 4096}, num_warps=8),
        ],
        key=["numel", "N", "K", "MODE", "HAS_SCALE"],
    )(_compose_kernel)
    _COMPOSE_FIXED = {}


def compose(
    theta0: torch.Tensor,
    tau: torch.Tensor,
    coef: torch.Tensor,
    partition: Optional[Partition] = None,
    scale: Optional[torch.Tensor] = None,
    out_dtype: Optional[torch.dtype] = None,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``theta0 + sum_i coef[i, part(e)] * tau[i, e] (* scale[i, row(e)])``: a tensor of theta0's shape.

    theta0 ``[*S]`` (any float dtype), tau ``[N, *S]`` (fp32/bf16/fp16, or int8/fp8 with ``scale``
    ``[N, R]``), coef ``[N]`` or ``[N, K]`` (any float; read as fp32). Accumulates in fp32 and
    stores in ``out_dtype`` (default theta0's dtype), into ``out`` when given (contiguous).
    """
    shape = theta0.shape
    lb = launch_block(tau, shape, partition, coef=coef, scale=scale)
    out_dtype = out_dtype or theta0.dtype
    if out is None:
        out = torch.empty(shape, dtype=out_dtype, device=tau.device)
    elif out.shape != shape or out.dtype != out_dtype or not out.is_contiguous():
        raise ValueError("out must be a contiguous tensor of theta0's shape and out_dtype")
    if lb.numel == 0:
        return out
    r = scale_rows(shape)
    grid = lambda meta: (triton.cdiv(lb.numel, meta["BLOCK"]),)  # noqa: E731
    _compose_launch[grid](
        theta0.contiguous(), tau.contiguous(), lb.coef, lb.scale if lb.scale is not None else lb.coef, out,
        lb.numel, lb.n, lb.key, lb.numel // r, r,
        K=lb.k, MODE=lb.code, HAS_SCALE=lb.scale is not None, **_COMPOSE_FIXED,
    )
    return out


# --------------------------------------------------------------------------------------------
# many small blocks in one launch
# --------------------------------------------------------------------------------------------
SEG_COLUMNS = ("start", "numel", "coef_col", "k", "mode", "key", "row_off", "row_len", "tile0", "ntiles")
_NCOL = len(SEG_COLUMNS)
PACKED_BLOCK = 1024


@dataclass
class PackedLayout:
    """Where each small block lives in the packed buffers, and the launch grid over them.

    ``table``: int64 ``[S, 10]``, one row per segment (block), columns :data:`SEG_COLUMNS`:

    ============ ===============================================================================
    ``start``    offset of the block in ``theta0_flat`` / ``tau_flat[i]`` / the composed output
    ``numel``    number of elements of the block
    ``coef_col`` first column of the block's coefficients in ``coef_flat [N, total_cols]``
    ``k``        number of partitions (the block uses columns ``coef_col .. coef_col + k - 1``)
    ``mode``     0: k == 1; 1: contiguous; 2: hash (see ``_common.mode_code``)
    ``key``      the hash key (``Partition.key``; 0 unless mode 2)
    ``row_off``  first row of the block in ``scale_flat [N, total_rows]`` (scaled storage only)
    ``row_len``  elements per scale row: ``numel // S[0]`` for >= 2-D blocks, ``numel`` for 1-D
    ``tile0``    first program (tile of ``block`` elements) of the block
    ``ntiles``   number of tiles of the block: ``ceil(numel / block)``
    ============ ===============================================================================

    ``tile_map``: int32 ``[T]``, the segment of every program; each program works inside one
    segment on elements ``(pid - tile0) * block + [0, block)`` of it. Build with
    :func:`make_packed_layout` and keep it (on the device) for the lifetime of the module.
    """

    table: torch.Tensor
    tile_map: torch.Tensor
    block: int
    kmax: int
    total_numel: int
    total_cols: int
    total_rows: int
    offsets: List[int]
    shapes: List[tuple]

    def to(self, device) -> "PackedLayout":
        return PackedLayout(self.table.to(device), self.tile_map.to(device), self.block, self.kmax,
                            self.total_numel, self.total_cols, self.total_rows, self.offsets, self.shapes)

    def views(self, flat: torch.Tensor) -> List[torch.Tensor]:
        """The blocks of a composed flat buffer ``[P]`` as views of their shapes."""
        return [flat[o:o + int(torch.Size(s).numel())].view(s) for o, s in zip(self.offsets, self.shapes)]


def make_packed_layout(
    shapes: Sequence[Sequence[int]],
    partitions: Optional[Sequence[Optional[Partition]]] = None,
    coef_cols: Optional[Sequence[int]] = None,
    total_cols: Optional[int] = None,
    block: Optional[int] = None,
    device=None,
) -> PackedLayout:
    """Layout for blocks of the given ``shapes`` packed back to back (in that order).

    ``partitions[j]`` (default ``Partition(1)``) gives block j's k/mode/key. Coefficient columns
    are assigned consecutively (block j uses ``sum_{l<j} k_l ...``) unless ``coef_cols`` gives
    each block's first column in a shared ``coef_flat [N, total_cols]``. Scale rows are assigned
    consecutively (``R_j = S_j[0]`` for >= 2-D blocks, else 1).
    """
    block = int(block or PACKED_BLOCK)
    if block & (block - 1):
        raise ValueError("block must be a power of two")
    shapes = [tuple(int(d) for d in s) for s in shapes]
    parts = list(partitions) if partitions is not None else [None] * len(shapes)
    if len(parts) != len(shapes):
        raise ValueError("one partition per block")
    rows, tile_map, offsets = [], [], []
    start = col = row_off = tile0 = 0
    kmax = 1
    for j, (s, p) in enumerate(zip(shapes, parts)):
        p = p or Partition(1)
        numel = int(torch.Size(s).numel())
        code = mode_code(p.k, p.mode)
        check_hash_numel(numel, code)
        c = int(coef_cols[j]) if coef_cols is not None else col
        r = scale_rows(s)
        ntiles = triton.cdiv(numel, block)
        rows.append([start, numel, c, p.k, code, p.key if code == MODE_HASH else 0,
                     row_off, max(numel // r, 1), tile0, ntiles])
        tile_map += [j] * ntiles
        offsets.append(start)
        start += numel
        col = max(col, c + p.k)
        row_off += r
        tile0 += ntiles
        kmax = max(kmax, p.k)
    if total_cols is None:
        total_cols = col
    elif total_cols < col:
        raise ValueError(f"total_cols={total_cols} but the blocks need {col} columns")
    table = torch.tensor(rows, dtype=torch.int64, device=device).reshape(-1, _NCOL)
    tmap = torch.tensor(tile_map, dtype=torch.int32, device=device)
    return PackedLayout(table, tmap, block, next_pow2(kmax), start, total_cols, row_off, offsets, shapes)


@triton.jit
def _packed_tile(table_ptr, tile_map_ptr, HAS_SCALE: tl.constexpr, BLOCK: tl.constexpr):
    """This program's tile of the packed layout (one segment's elements ``local``):
    ``(g, mask, col, part, srow)``: flat offsets into the packed buffers, the tail mask, the
    segment's first coefficient column, each element's part, and (HAS_SCALE) its scale row."""
    pid = tl.program_id(0)
    seg = tl.load(tile_map_ptr + pid).to(tl.int64)
    row = table_ptr + seg * 10  # SEG_COLUMNS
    numel = tl.load(row + 1)
    local = (pid - tl.load(row + 8)) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = local < numel
    part = _part_index_rt(local, numel, tl.load(row + 5), tl.load(row + 3), tl.load(row + 4))
    srow = local
    if HAS_SCALE:
        srow = tl.load(row + 6) + local // tl.load(row + 7)
    return tl.load(row + 0) + local, mask, tl.load(row + 2), part, srow


@triton.jit
def _compose_packed_kernel(
    theta0_ptr, tau_ptr, coef_ptr, scale_ptr, out_ptr, table_ptr, tile_map_ptr,
    P, N, total_cols, total_rows,
    HAS_SCALE: tl.constexpr, BLOCK: tl.constexpr,
):
    g, mask, col, part, srow = _packed_tile(table_ptr, tile_map_ptr, HAS_SCALE, BLOCK)
    acc = tl.load(theta0_ptr + g, mask=mask, other=0.0).to(tl.float32)
    cidx = col + part
    tau_i = tau_ptr
    for i in range(N):
        t = tl.load(tau_i + g, mask=mask, other=0.0).to(tl.float32)
        if HAS_SCALE:
            t = t * tl.load(scale_ptr + i * total_rows + srow, mask=mask, other=0.0)
        c = tl.load(coef_ptr + i * total_cols + cidx, mask=mask, other=0.0)
        acc += c * t
        tau_i += P
    tl.store(out_ptr + g, _cast_out(acc, out_ptr.dtype.element_ty), mask=mask)


def _packed_checks(layout: PackedLayout, tau_flat, scale_flat):
    n = tau_flat.shape[0]
    if tau_flat.dim() != 2 or tau_flat.shape[1] != layout.total_numel:
        raise ValueError(f"tau_flat must be [N, {layout.total_numel}], got {tuple(tau_flat.shape)}")
    if scale_flat is not None:
        if scale_flat.numel() != n * layout.total_rows:
            raise ValueError(f"scale_flat must be [N, {layout.total_rows}], got {tuple(scale_flat.shape)}")
        scale_flat = scale_flat.reshape(n, layout.total_rows).to(torch.float32).contiguous()
    return n, scale_flat


def compose_packed(
    theta0_flat: torch.Tensor,
    tau_flat: torch.Tensor,
    coef_flat: torch.Tensor,
    layout: PackedLayout,
    scale_flat: Optional[torch.Tensor] = None,
    out_dtype: Optional[torch.dtype] = None,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """All blocks of ``layout`` composed in one launch: a flat ``[P]`` tensor (split it with
    ``layout.views``). theta0_flat ``[P]``, tau_flat ``[N, P]``, coef_flat ``[N, total_cols]``,
    scale_flat ``None`` or ``[N, total_rows]``."""
    n, scale_flat = _packed_checks(layout, tau_flat, scale_flat)
    coef2 = coef_flat.reshape(n, layout.total_cols).to(torch.float32).contiguous()
    out_dtype = out_dtype or theta0_flat.dtype
    P = layout.total_numel
    if out is None:
        out = torch.empty(P, dtype=out_dtype, device=tau_flat.device)
    elif out.shape != (P,) or out.dtype != out_dtype or not out.is_contiguous():
        raise ValueError("out must be a contiguous [P] tensor of out_dtype")
    T = layout.tile_map.numel()
    if T == 0:
        return out
    _compose_packed_kernel[(T,)](
        theta0_flat.contiguous(), tau_flat.contiguous(), coef2,
        scale_flat if scale_flat is not None else coef2, out, layout.table, layout.tile_map,
        P, n, layout.total_cols, layout.total_rows,
        HAS_SCALE=scale_flat is not None, BLOCK=layout.block, num_warps=4,
    )
    return out


@triton.jit
def _coef_grad_packed_partial_kernel(
    grad_ptr, tau_ptr, scale_ptr, partial_ptr, table_ptr, tile_map_ptr,
    P, N, total_rows,
    KMAX: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    g, mask, col, part, srow = _packed_tile(table_ptr, tile_map_ptr, HAS_SCALE, BLOCK)
    gr = tl.load(grad_ptr + g, mask=mask, other=0.0).to(tl.float32)
    kk = tl.arange(0, KMAX)
    onehot = part[:, None] == kk[None, :]  # [BLOCK, KMAX]
    out_p = partial_ptr + pid.to(tl.int64) * N * KMAX + kk
    tau_i = tau_ptr
    for i in range(N):
        t = tl.load(tau_i + g, mask=mask, other=0.0).to(tl.float32)
        if HAS_SCALE:
            t = t * tl.load(scale_ptr + i * total_rows + srow, mask=mask, other=0.0)
        prod = gr * t
        v = tl.sum(tl.where(onehot, prod[:, None], 0.0), 0)  # [KMAX]
        tl.store(out_p + i * KMAX, v)
        tau_i += P


@triton.jit
def _coef_grad_packed_reduce_kernel(
    partial_ptr, out_ptr, table_ptr, N, total_cols,
    KMAX: tl.constexpr, RBLOCK: tl.constexpr,
):
    """One program per segment: sums its tiles' partials in tile order (deterministic)."""
    seg = tl.program_id(0).to(tl.int64)
    row = table_ptr + seg * 10
    col = tl.load(row + 2)
    k = tl.load(row + 3)
    tile0 = tl.load(row + 8)
    ntiles = tl.load(row + 9)
    width = N * KMAX
    for base in range(0, width, RBLOCK):
        idx = base + tl.arange(0, RBLOCK)
        m = idx < width
        acc = tl.zeros([RBLOCK], dtype=tl.float32)
        for t in range(ntiles):
            acc += tl.load(partial_ptr + (tile0 + t) * width + idx, mask=m, other=0.0)
        i = idx // KMAX
        kk = idx % KMAX
        tl.store(out_ptr + i * total_cols + col + kk, acc, mask=m & (kk < k))


def coef_grad_packed(
    grad_flat: torch.Tensor,
    tau_flat: torch.Tensor,
    layout: PackedLayout,
    scale_flat: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Backward of :func:`compose_packed`: float32 ``[N, total_cols]`` with
    ``out[i, coef_col_b + k] = sum_{e in block b, part k} grad_flat[e] * tau_flat[i, e]``.
    Columns no block uses are zero. Deterministic: per-tile partials, then a per-segment sum in
    tile order (no atomics)."""
    n, scale_flat = _packed_checks(layout, tau_flat, scale_flat)
    out = torch.zeros(n, layout.total_cols, dtype=torch.float32, device=tau_flat.device)
    T = layout.tile_map.numel()
    if T == 0:
        return out
    partial = scratch((T, n, layout.kmax), tau_flat.device)
    grad_c = grad_flat.reshape(-1).contiguous()
    _coef_grad_packed_partial_kernel[(T,)](
        grad_c, tau_flat.contiguous(), scale_flat if scale_flat is not None else grad_c, partial,
        layout.table, layout.tile_map, layout.total_numel, n, layout.total_rows,
        KMAX=layout.kmax, HAS_SCALE=scale_flat is not None, BLOCK=layout.block, num_warps=4,
    )
    rblock = min(1024, next_pow2(n * layout.kmax))
    _coef_grad_packed_reduce_kernel[(layout.table.shape[0],)](
        partial, out, layout.table, n, layout.total_cols, KMAX=layout.kmax, RBLOCK=rblock, num_warps=1,
    )
    return out
