"""Every block of a tower in two launches: the grouped compose and the grouped coefficient gradient.

A *group* is a set of blocks that share a device, a theta0 dtype and a storage (with or without
per-row scales). Its table holds one row per block (a *segment*) with the block's geometry, its
partition encoding and the addresses of its own tensors: theta0, the ``[n_b, *shape]`` slab, the
``[n_b, R]`` scales, the coefficients ``[N, K]`` and the ragged index. Nothing is packed or copied:
the kernels read each block where the module keeps it (the address is cast to a typed pointer in
the kernel, as Triton's grouped-GEMM tutorial does). Programs are tiles of ``BLOCK`` elements of one
segment (``tile_map[pid]`` names it).

- :func:`compose_group`: ``out[sel][out_off + e] = theta0[e] + sum_i coef[index[i], part(e)] * tau[i, e]``
  (``* scale[i, row(e)]``), accumulated in fp32 and stored in the output's dtype. Two outputs, so
  that blocks a matmul reads (``sel`` 0) can be composed in the compute dtype while the others
  (``sel`` 1: LayerNorms, embeddings) keep theta0's dtype.
- :func:`coef_grad_group`: ``dcoef[coef_off + r * K + k] = sum_{e in part k} grad[sel][out_off + e] *
  tau[i, e]`` for the held row ``i`` of coefficient row ``r`` (0 for rows a ragged block does not
  hold): per-tile partial sums, then one program per segment sums its tiles in tile order
  (deterministic, no atomics).

The table layout is :data:`GROUP_COLUMNS`; :func:`group_table` builds it.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import triton
import triton.language as tl

from .._launches import launch
from ._common import INTERPRET, _cast_out, _part_index_rt, next_pow2, scratch

__all__ = ["GROUP_COLUMNS", "GroupLaunch", "group_table", "compose_group", "coef_grad_group", "GROUP_BLOCK"]

GROUP_COLUMNS = ("numel", "tile0", "ntiles", "k", "mode", "key", "held", "sel", "out_off", "coef_off",
                 "n_rows", "row_len", "theta0", "tau", "scale", "coef", "index", "inverse")
NCOL = len(GROUP_COLUMNS)
# Elements per program: fixed per launch table (the tile map and the partial-sum rows depend on it,
# so a fixed value also fixes the reduction order). 4096 fp16 elements are two 16-byte loads per
# thread per task vector at 8 warps; the interpreter runs fewer, larger programs the same way.
GROUP_BLOCK = 4096
# _ALIGNED_NOTE: an address read from the table carries no alignment the compiler can see, so a tile
# of consecutive elements is loaded element by element (2-byte loads for fp16 slabs). Where the table
# says every block is 16-byte aligned (ALIGNED), each tile's pointers are hinted with
# tl.multiple_of(ptrs, 16), in the function that computes them (a hint applied to a function's
# argument is lost), and the compiler issues 16-byte loads and stores.
# Tiles summed per step of the per-segment reduction (a [REDUCE_TILES, N * K] slab of partials).
REDUCE_TILES = 32


class GroupLaunch:
    """The device-side description of one group: ``table`` (int64 ``[S, NCOL]``), ``tile_map``
    (int32 ``[T]``), and what the launches need besides (the largest held count ``nmax``, the
    largest K rounded up to a power of two ``kmax``, the coefficient-gradient length ``coef_total``,
    ``aligned``: every block 16-byte aligned, see ``_ALIGNED_NOTE``), plus references to every
    tensor whose address the table holds (kept alive with it)."""

    def __init__(self, table, tile_map, block, nmax, kmax, n_rows_max, coef_total, theta_any, tau_any, keep,
                 aligned=False):
        self.table, self.tile_map, self.block, self.aligned = table, tile_map, block, aligned
        self.nmax, self.kmax, self.n_rows_max, self.coef_total = nmax, kmax, n_rows_max, coef_total
        self.theta_any, self.tau_any = theta_any, tau_any
        self._keep = keep


def group_table(segments: Sequence[dict], device, block: Optional[int] = None) -> GroupLaunch:
    """The launch table of ``segments``: dicts with the tensors ``theta0``, ``tau`` (``[held,
    *shape]``, contiguous), ``scale`` (``[held, R]`` fp32 or None), ``coef`` (``[N, K]`` or ``[N]``
    fp32, contiguous), ``index`` (int64 ``[held]``: the coefficient row of each held slab) and the
    ints ``k``, ``mode``, ``key``, ``sel``, ``out_off``, ``coef_off``. Every tensor must stay alive
    and in place while the table is used (the group keeps them)."""
    block = int(block or GROUP_BLOCK)
    rows, tile_map, keep = [], [], []
    tile0 = 0
    nmax, kmax, n_rows_max = 1, 1, 1
    # 16-byte loads and stores (ALIGNED) where every block's element count is a multiple of 16 and
    # its theta0 and slab start 16-byte aligned: then every slab, every tile and every offset into
    # the flat outputs and gradients (fresh allocations) is aligned too.
    aligned = block % 16 == 0
    for j, s in enumerate(segments):
        theta0, tau, scale, coef, index = s["theta0"], s["tau"], s["scale"], s["coef"], s["index"]
        numel = theta0.numel()
        if numel >= 2**31 - block:
            raise ValueError(f"a grouped block has {numel} elements; the grouped kernels take fewer than 2**31 "
                             f"(patch with grouped=False for it)")
        held = tau.shape[0]
        n_rows = coef.shape[0]
        # inverse[r]: the held position of coefficient row r, or -1 (ragged blocks hold a subset)
        inverse = torch.full((n_rows,), -1, dtype=torch.int32)
        inverse[index.cpu()] = torch.arange(held, dtype=torch.int32)
        inverse = inverse.to(device)
        rows_r = theta0.shape[0] if theta0.dim() >= 2 else 1
        ntiles = triton.cdiv(numel, block)
        rows.append([numel, tile0, ntiles, s["k"], s["mode"], s["key"], held, s["sel"], s["out_off"], s["coef_off"],
                     n_rows, max(numel // rows_r, 1), theta0.data_ptr(), tau.data_ptr(),
                     0 if scale is None else scale.data_ptr(), coef.data_ptr(), index.data_ptr(), inverse.data_ptr()])
        keep += [theta0, tau, scale, coef, index, inverse]
        aligned = aligned and numel % 16 == 0 and theta0.data_ptr() % 16 == 0 and tau.data_ptr() % 16 == 0
        tile_map += [j] * ntiles
        tile0 += ntiles
        nmax, kmax, n_rows_max = max(nmax, held), max(kmax, s["k"]), max(n_rows_max, n_rows)
    table = torch.tensor(rows, dtype=torch.int64).reshape(-1, NCOL).to(device)
    tmap = torch.tensor(tile_map, dtype=torch.int32).to(device)
    coef_total = max((s["coef_off"] + s["coef"].numel() for s in segments), default=0)
    return GroupLaunch(table, tmap, block, nmax, next_pow2(kmax), n_rows_max, coef_total,
                       segments[0]["theta0"], segments[0]["tau"], keep, aligned)


@triton.jit
def _segment(table_ptr, tile_map_ptr, theta_any_ptr, tau_any_ptr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    """This program's segment and tile: its table row, the block's element count, the tile's first
    element ``start`` (int64), the offsets ``local`` inside the tile (int32: 64-bit integer
    arithmetic per element is slow on a GPU, so only scalars are 64-bit), the tail mask, and the
    typed pointers to the block's own theta0 and slab."""
    pid = tl.program_id(0)
    seg = tl.load(tile_map_ptr + pid).to(tl.int64)
    row = table_ptr + seg * 18  # NCOL
    numel = tl.load(row + 0)
    start = (pid - tl.load(row + 1)).to(tl.int64) * BLOCK
    local = tl.arange(0, BLOCK)
    rem = tl.minimum(numel - start, BLOCK).to(tl.int32)
    if ALIGNED:  # every block's element count is a multiple of 16: so is the tail
        rem = tl.multiple_of(rem, 16)
    mask = local < rem
    theta = tl.load(row + 12).to(tl.pointer_type(theta_any_ptr.dtype.element_ty))
    tau = tl.load(row + 13).to(tl.pointer_type(tau_any_ptr.dtype.element_ty))
    return row, numel, start, local, mask, theta, tau


@triton.jit
def _scale_rows(row, numel, start, local, HAS_SCALE: tl.constexpr):
    """``(scale pointer, scale row of each element, rows per slab)`` of a scaled block (int32: a
    block has fewer than 2**31 elements); placeholders otherwise."""
    if HAS_SCALE:
        scale = tl.load(row + 14).to(tl.pointer_type(tl.float32))
        row_len = tl.load(row + 11).to(tl.int32)
        srow = (start.to(tl.int32) + local) // row_len
        n_srows = (numel // tl.load(row + 11)).to(tl.int32)
    else:
        scale = tl.load(row + 15).to(tl.pointer_type(tl.float32))
        srow = local
        n_srows = 0
    return scale, srow, n_srows


@triton.jit
def _held_slab(tau_i, scale, i, local, mask, srow, n_srows, HAS_SCALE: tl.constexpr, ALIGNED: tl.constexpr):
    """A tile of one held slab (``tau_i`` points at its first element), dequantized, in fp32."""
    ptrs = tau_i + local
    if ALIGNED:  # see _ALIGNED_NOTE
        ptrs = tl.multiple_of(ptrs, 16)
    t = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    if HAS_SCALE:
        t = t * tl.load(scale + i * n_srows + srow, mask=mask, other=0.0)
    return t


@triton.jit
def _group_compose_kernel(
    table_ptr, tile_map_ptr, theta_any_ptr, tau_any_ptr, outa_ptr, outb_ptr,
    KMAX: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr,
):
    row, numel, start, local, mask, theta, tau = _segment(table_ptr, tile_map_ptr, theta_any_ptr, tau_any_ptr,
                                                          BLOCK, ALIGNED)
    held = tl.load(row + 6)
    coef = tl.load(row + 15).to(tl.pointer_type(tl.float32))
    index = tl.load(row + 16).to(tl.pointer_type(tl.int64))
    scale, srow, n_srows = _scale_rows(row, numel, start, local, HAS_SCALE)
    ptrs = theta + start + local
    if ALIGNED:
        ptrs = tl.multiple_of(ptrs, 16)
    acc = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    tau_i = tau + start
    if KMAX == 1:  # one coefficient per (task vector, block): a scalar per slab
        for i in range(held):
            c = tl.load(coef + tl.load(index + i))
            acc += c * _held_slab(tau_i, scale, i, local, mask, srow, n_srows, HAS_SCALE, ALIGNED)
            tau_i += numel
    else:
        k = tl.load(row + 3)
        part = _part_index_rt(start + local, numel, tl.load(row + 5), k, tl.load(row + 4))
        for i in range(held):
            c = tl.load(coef + tl.load(index + i) * k + part, mask=mask, other=0.0)
            acc += c * _held_slab(tau_i, scale, i, local, mask, srow, n_srows, HAS_SCALE, ALIGNED)
            tau_i += numel
    off = tl.load(row + 8) + start
    if tl.load(row + 7) == 0:
        pa = outa_ptr + off + local
        if ALIGNED:
            pa = tl.multiple_of(pa, 16)
        tl.store(pa, _cast_out(acc, outa_ptr.dtype.element_ty), mask=mask)
    else:
        pb = outb_ptr + off + local
        if ALIGNED:
            pb = tl.multiple_of(pb, 16)
        tl.store(pb, _cast_out(acc, outb_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _group_partial_kernel(
    table_ptr, tile_map_ptr, theta_any_ptr, tau_any_ptr, ga_ptr, gb_ptr, partial_ptr, NMAX,
    KMAX: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr,
):
    pid = tl.program_id(0)
    row, numel, start, local, mask, theta, tau = _segment(table_ptr, tile_map_ptr, theta_any_ptr, tau_any_ptr,
                                                          BLOCK, ALIGNED)
    held = tl.load(row + 6)
    scale, srow, n_srows = _scale_rows(row, numel, start, local, HAS_SCALE)
    off = tl.load(row + 8) + start
    if tl.load(row + 7) == 0:
        pa = ga_ptr + off + local
        if ALIGNED:
            pa = tl.multiple_of(pa, 16)
        g = tl.load(pa, mask=mask, other=0.0).to(tl.float32)
    else:
        pb = gb_ptr + off + local
        if ALIGNED:
            pb = tl.multiple_of(pb, 16)
        g = tl.load(pb, mask=mask, other=0.0).to(tl.float32)
    out = partial_ptr + pid.to(tl.int64) * NMAX * KMAX
    tau_i = tau + start
    if KMAX == 1:
        for i in range(held):
            prod = g * _held_slab(tau_i, scale, i, local, mask, srow, n_srows, HAS_SCALE, ALIGNED)
            tl.store(out + i, tl.sum(prod, 0))
            tau_i += numel
    else:
        part = _part_index_rt(start + local, numel, tl.load(row + 5), tl.load(row + 3), tl.load(row + 4))
        kk = tl.arange(0, KMAX)
        onehot = part[:, None] == kk[None, :]  # [BLOCK, KMAX]
        for i in range(held):
            prod = g * _held_slab(tau_i, scale, i, local, mask, srow, n_srows, HAS_SCALE, ALIGNED)
            tl.store(out + i * KMAX + kk, tl.sum(tl.where(onehot, prod[:, None], 0.0), 0))
            tau_i += numel


@triton.jit
def _group_reduce_kernel(
    table_ptr, partial_ptr, out_ptr, NMAX,
    KMAX: tl.constexpr, COLS: tl.constexpr, TILES: tl.constexpr,
):
    """One program per segment: ``out[coef_off + r * K + k]`` for every coefficient row ``r`` of the
    block, the sum over its tiles (in tile order) of the partials of its held row, or 0."""
    seg = tl.program_id(0).to(tl.int64)
    row = table_ptr + seg * 18
    tile0 = tl.load(row + 1)
    ntiles = tl.load(row + 2)
    k = tl.load(row + 3)
    n_rows = tl.load(row + 10)
    inverse = tl.load(row + 17).to(tl.pointer_type(tl.int32))
    c = tl.arange(0, COLS)
    valid = c < n_rows * k
    r = c // k
    pos = tl.load(inverse + r, mask=valid, other=-1).to(tl.int64)
    src = pos * KMAX + c % k
    live = valid & (pos >= 0)
    acc = tl.zeros([COLS], dtype=tl.float32)
    t = tl.arange(0, TILES)
    for t0 in range(0, ntiles, TILES):
        tt = t0 + t
        p = tl.load(partial_ptr + (tile0 + tt[:, None]) * NMAX * KMAX + src[None, :],
                    mask=(tt[:, None] < ntiles) & live[None, :], other=0.0)
        acc += tl.sum(p, 0)
    tl.store(out_ptr + tl.load(row + 9) + c, acc, mask=valid)


# Warps per program of the compose and partial kernels (the bench of bench.group_kernels tunes this
# and GROUP_BLOCK on a GPU: docs/PERFORMANCE.md).
GROUP_WARPS = 8


def _check_aligned(table: GroupLaunch, flats, what: str) -> None:
    for t in flats:
        if t is not None and not t.is_contiguous():
            raise ValueError(f"{what} must be contiguous flat tensors")
        if table.aligned and t is not None and t.data_ptr() % 16:
            raise ValueError(f"{what} must start 16-byte aligned for this table (its blocks are): got address "
                             f"{t.data_ptr():#x}")


def _warps(num_warps: Optional[int]) -> dict:
    if INTERPRET:
        return {}
    return {"num_warps": num_warps or GROUP_WARPS}


def compose_group(table: GroupLaunch, outs: List[Optional[torch.Tensor]], has_scale: bool,
                  num_warps: Optional[int] = None) -> None:
    """Compose every segment of ``table`` into ``outs[sel]`` (flat, contiguous; None for an output
    class no segment uses), one launch."""
    if table.tile_map.numel() == 0:
        return
    _check_aligned(table, outs, "outs")
    a = outs[0] if outs[0] is not None else outs[1]
    b = outs[1] if outs[1] is not None else outs[0]
    launch(_group_compose_kernel, (table.tile_map.numel(),),
           table.table, table.tile_map, table.theta_any, table.tau_any, a, b,
           KMAX=table.kmax, HAS_SCALE=has_scale, BLOCK=table.block, ALIGNED=table.aligned, **_warps(num_warps))


def coef_grad_group(table: GroupLaunch, grads: List[Optional[torch.Tensor]], has_scale: bool,
                    num_warps: Optional[int] = None) -> torch.Tensor:
    """float32 ``[coef_total]``: every segment's coefficient gradient against the flat gradients
    ``grads[sel]`` (laid out as :func:`compose_group`'s outputs), two launches."""
    dev = table.table.device
    out = scratch((table.coef_total,), dev)
    T = table.tile_map.numel()
    if T == 0:
        return out.zero_()
    _check_aligned(table, grads, "grads")
    a = grads[0] if grads[0] is not None else grads[1]
    b = grads[1] if grads[1] is not None else grads[0]
    partial = scratch((T, table.nmax, table.kmax), dev)
    launch(_group_partial_kernel, (T,),
           table.table, table.tile_map, table.theta_any, table.tau_any, a, b, partial, table.nmax,
           KMAX=table.kmax, HAS_SCALE=has_scale, BLOCK=table.block, ALIGNED=table.aligned, **_warps(num_warps))
    cols = next_pow2(table.n_rows_max * table.kmax)
    launch(_group_reduce_kernel, (table.table.shape[0],),
           table.table, partial, out, table.nmax,
           KMAX=table.kmax, COLS=cols, TILES=max(1, min(REDUCE_TILES, 4096 // cols)),
           **({} if INTERPRET else {"num_warps": 4}))
    return out
