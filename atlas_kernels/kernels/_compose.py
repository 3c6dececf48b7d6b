"""The compose kernel of one block: ``W = theta0 + sum_i coef[i, part(e)] * tau_i[e]`` in one pass
over the slab (every block of a tower at once: :mod:`._group`)."""
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
    _cast_out,
    _part_index,
    launch_block,
)

__all__ = ["compose"]


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
    launch(_compose_launch, grid,
        theta0.contiguous(), tau.contiguous(), lb.coef, lb.scale if lb.scale is not None else lb.coef, out,
        lb.numel, lb.n, lb.key, lb.numel // r, r,
        K=lb.k, MODE=lb.code, HAS_SCALE=lb.scale is not None, **_COMPOSE_FIXED,
    )
    return out
