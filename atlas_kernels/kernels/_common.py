"""Shared pieces of the Triton kernels: the launcher prologue, the partition index, scratch
buffers, launch constants.

The partition index must agree bit for bit with :meth:`atlas_kernels.partitions.Partition.index`
(the mode code is :attr:`Partition.code <atlas_kernels.partitions.Partition.code>`):

- mode code 0 (``k == 1``): every element is in part 0;
- mode code 1 (``"contiguous"``): ``part(e) = (e * K) // numel`` in int64;
- mode code 2 (``"hash"``): ``part(e) = lowbias32(e XOR key) mod K`` on uint32 values.

The hash is computed in int64 with ``& 0xFFFFFFFF`` after every step: int64 products of two values
below 2**32 may wrap past 2**63, but wrapping keeps the low 32 bits exact (two's complement), and
that is all ``mod 2**32`` needs. This works the same whether Triton types ``key`` as i32, u32, i64
or a constexpr, and in the interpreter (numpy int64 wraps silently on arrays).
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from .._env import is_interpreter
from ..blocks import coef_matrix
from ..partitions import Partition
from ..storage import scale_rows

INTERPRET = is_interpreter()

MODE_NONE, MODE_CONTIGUOUS, MODE_HASH = 0, 1, 2

# Tests set this to True: scratch buffers (split-K partials, per-program partial sums) are then
# filled with NaN before a kernel runs, so any element a kernel forgets to write poisons the result.
POISON_SCRATCH = False


def as_partition(partition, k: int) -> Partition:
    """``partition`` (a :class:`Partition`, or None for ``Partition(k)``) checked against ``k``."""
    if partition is None:
        return Partition(k)
    if partition.k != k:
        raise ValueError(f"partition has k={partition.k} but the coefficients have {k} columns")
    return partition


def coef2d(coef: torch.Tensor, n: int, device) -> torch.Tensor:
    """Coefficients ``[N]`` or ``[N, K]`` as a contiguous fp32 ``[N, K]`` (also for N = 0)."""
    return coef_matrix(coef, n).to(device=device, dtype=torch.float32).contiguous()


def check_hash_numel(numel: int, code: int):
    if code == MODE_HASH and numel > 2**32:
        raise ValueError(f"hash partitions need blocks under 2**32 elements, got {numel}")


def scratch(shape, device, dtype=torch.float32) -> torch.Tensor:
    """A buffer the kernel fully overwrites (NaN-filled when ``POISON_SCRATCH`` is set)."""
    if POISON_SCRATCH:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def check_scale(scale, n: int, shape, device):
    if scale is None:
        return None
    r = scale_rows(shape)
    if scale.numel() != n * r:
        raise ValueError(f"scale must be [N, R] = [{n}, {r}] for a block of shape {tuple(shape)}, "
                         f"got {tuple(scale.shape)}")
    return scale.reshape(n, r).to(device=device, dtype=torch.float32).contiguous()


class LaunchBlock(NamedTuple):
    """What a single-block launcher hands its kernel, checked: N, the block's element count, K, the
    partition's mode code and hash key (0 unless hashed), the coefficients as contiguous fp32
    ``[N, K]`` (None for a gradient launch) and the scales as fp32 ``[N, R]`` (None: unscaled)."""

    n: int
    numel: int
    k: int
    code: int
    key: int
    coef: Optional[torch.Tensor]
    scale: Optional[torch.Tensor]


def launch_block(tau: torch.Tensor, shape, partition: Optional[Partition], *, coef=None, k: int = 1, scale=None,
                 names=("tau", "theta0")) -> LaunchBlock:
    """The prologue every single-block launcher shares: ``tau`` must hold N slabs of ``shape`` (the
    error names ``names = (tau's name, what gives the shape)``); the coefficients ``coef`` (``[N]``
    or ``[N, K]``; or, for a gradient, their column count ``k``) as fp32 ``[N, K]``; the partition
    checked against K and decoded; the hash partitions' size bound; the scale checked as ``[N, R]``."""
    n = tau.shape[0]
    numel = int(torch.Size(shape).numel())
    if tau.numel() != n * numel:
        raise ValueError(f"{names[0]} {tuple(tau.shape)} does not match {names[1]} {tuple(shape)}")
    coef2 = None
    if coef is not None:
        coef2 = coef2d(coef, n, tau.device)
        k = coef2.shape[1]
    _, code, key = as_partition(partition, k).encoding()
    check_hash_numel(numel, code)
    return LaunchBlock(n, numel, k, code, key, coef2, check_scale(scale, n, shape, tau.device))


def next_pow2(x: int) -> int:
    return 1 if x <= 1 else 1 << (int(x) - 1).bit_length()


@functools.lru_cache(maxsize=None)
def num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def device_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # interpreter: few programs
    return num_sms(device.index if device.index is not None else torch.cuda.current_device())


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` for ``tl.dot``: on fp32 operands follow torch's TF32 switch (so the
    fused kernels agree with the cuBLAS path at the same settings); 16-bit operands keep Triton's
    default ("tf32", which does not apply to them)."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def upcast_dot(dtype: torch.dtype) -> bool:
    """Under the interpreter ``tl.dot`` on bf16 is wrong: upcast the operands (exact) to fp32."""
    return INTERPRET and dtype == torch.bfloat16


@triton.jit
def _hash_part(e, key, K):
    """``lowbias32((e ^ key) mod 2**32) mod K`` on int64 values (see the module docstring)."""
    x = (e ^ key) & 0xFFFFFFFF
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    x = x ^ (x >> 16)
    return x % K


@triton.jit
def _part_index(e, numel, key, K: tl.constexpr, MODE: tl.constexpr):
    """Part (int32) of each flat element index ``e`` (int32 or int64) of a block of ``numel``
    elements. The arithmetic is int64; only the small result stays live (register pressure)."""
    if MODE == 1:
        p = ((e.to(tl.int64) * K) // numel).to(tl.int32)
    elif MODE == 2:
        p = _hash_part(e.to(tl.int64), key, K).to(tl.int32)
    else:
        p = (e * 0).to(tl.int32)
    return p


@triton.jit
def _part_index_rt(e, numel, key, k, mode):
    """:func:`_part_index` with ``k`` and ``mode`` known only at run time (grouped segments; ``e``
    int64). Mode 0 means ``k == 1``, where the contiguous formula gives part 0 too."""
    if mode == 2:
        p = _hash_part(e, key, k).to(tl.int32)
    else:
        p = ((e * k) // tl.maximum(numel, 1)).to(tl.int32)
    return p


@triton.jit
def _cast_rtne_interp(x, dtype: tl.constexpr):
    """fp32 -> ``dtype`` with round-to-nearest-even. Triton's interpreter truncates fp32 -> bf16
    (its ``_convert_float`` drops the low bits), so under the interpreter bf16 is rounded here by
    integer arithmetic on the fp32 bit pattern (finite values and infinities; NaN is not expected)."""
    if dtype == tl.bfloat16:
        b = x.to(tl.float32).to(tl.uint32, bitcast=True)
        b = b + (((b >> 16) & 1) + 0x7FFF)
        y = (b >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        y = x.to(dtype)
    return y


@triton.jit
def _cast_plain(x, dtype: tl.constexpr):
    return x.to(dtype)


# Every fp32 -> storage/compute-dtype rounding in the kernels goes through `_cast_out`.
_cast_out = _cast_rtne_interp if INTERPRET else _cast_plain
