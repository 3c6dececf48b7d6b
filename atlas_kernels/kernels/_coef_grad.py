"""Coefficient gradient of one block: ``dlam[i, k] = sum_{e in part k} grad[e] * tau[i, e]``.

One pass over the slab: each program loads a tile of ``grad`` once and dots it with the N task-vector
tiles, writing ``N x K`` partial sums to a ``[programs, N, K]`` buffer; the buffer is then summed over
its first axis by ``torch.sum`` (a fixed-order reduction: deterministic, no atomics).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .._launches import launch
from ..partitions import Partition
from ..storage import scale_rows
from ._common import (
    INTERPRET,
    _part_index,
    launch_block,
    scratch,
)

__all__ = ["coef_grad"]

# Elements per program. Fixed (not autotuned): the partial buffer's size depends on it, and a
# fixed value keeps the reduction order, hence the result, identical from call to call.
COEF_GRAD_BLOCK = 4096


@triton.jit
def _coef_grad_kernel(
    grad_ptr, tau_ptr, scale_ptr, partial_ptr,
    numel, N, key, row_len, R,
    K: tl.constexpr, MODE: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    part = _part_index(offs, numel, key, K, MODE)
    if HAS_SCALE:
        row = offs // row_len
    out_p = partial_ptr + pid.to(tl.int64) * N * K
    tau_i = tau_ptr  # slab i starts at tau_ptr + i * numel: a 64-bit scalar pointer
    for i in range(N):
        t = tl.load(tau_i + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_SCALE:
            t = t * tl.load(scale_ptr + i * R + row, mask=mask, other=0.0)
        prod = g * t
        for kk in tl.static_range(K):
            if K == 1:
                v = tl.sum(prod, 0)
            else:
                v = tl.sum(tl.where(part == kk, prod, 0.0), 0)
            tl.store(out_p + i * K + kk, v)
        tau_i += numel


def coef_grad(
    grad: torch.Tensor,
    tau: torch.Tensor,
    k: int = 1,
    partition: Optional[Partition] = None,
    scale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """float32 ``[N, K]``: ``sum_{e in part k} grad[e] * tau[i, e] (* scale[i, row(e)])``.

    grad ``[*S]`` (any float dtype), tau ``[N, *S]``. Bitwise reproducible from run to run.
    """
    shape = tau.shape[1:]  # the scale rows follow the slab's block shape
    if tau.numel() != tau.shape[0] * grad.numel():
        raise ValueError(f"tau {tuple(tau.shape)} does not match grad {tuple(grad.shape)}")
    lb = launch_block(tau, shape, partition, k=k, scale=scale)
    n, numel = lb.n, lb.numel
    if numel == 0:
        return torch.zeros(n, k, dtype=torch.float32, device=tau.device)
    block = COEF_GRAD_BLOCK
    programs = triton.cdiv(numel, block)
    partial = scratch((programs, n, k), tau.device)
    r = scale_rows(shape)
    grad_c = grad.reshape(-1).contiguous()
    launch(_coef_grad_kernel, (programs,),
        grad_c, tau.contiguous(), lb.scale if lb.scale is not None else grad_c, partial,
        numel, n, lb.key, numel // r, r,
        K=k, MODE=lb.code, HAS_SCALE=lb.scale is not None, BLOCK=block,
        **({} if INTERPRET else {"num_warps": 8}),
    )
    return partial.sum(0) if programs > 1 else partial[0].clone()
