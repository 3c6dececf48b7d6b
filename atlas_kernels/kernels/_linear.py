"""Linear-layer kernels with the composed weight built on the fly.

``W = w0 + sum_i coef[i, part(o * I + c)] * tau_i`` (``[O, I]``, fp32 accumulation, then rounded to
the compute dtype exactly as the compose-then-matmul path rounds it):

- :func:`fused_linear`:    ``y = x W^T + bias``  (small M: W tiles built while streaming I);
- :func:`fused_linear_dx`: ``dx = dy W``         (small M: W tiles built while streaming O);
- :func:`linear_coef_grad`: ``dlam[i, k] = <G, tau_i>`` over part k with ``G = dy^T x``: each
  program accumulates its ``G`` tile over M in registers, then reduces it against the N task-vector
  tiles; ``G`` never exists in memory.

The fused GEMMs re-read the task vectors once per M tile, so they only pay off while M is small
(see ``ops.triton_backend.FUSED_MAX_M``). They split the reduction dimension over ``SPLIT_K``
programs (fp32 partials summed by torch in a fixed order) so that a small M still fills the GPU.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .._launches import launch
from ..partitions import Partition
from ._common import (
    INTERPRET,
    _cast_out,
    _part_index,
    dot_precision,
    launch_block,
    next_pow2,
    scratch,
    upcast_dot,
)
from ._linear_tuning import (
    FUSED_DX_LIGHT,
    FUSED_DX_SAFE,
    FUSED_LIGHT,
    FUSED_SAFE,
    LCG_CONFIGS,
    _block_m,
    _fused_configs,
    _lcg_tiles,
    _prune_fused,
    _prune_lcg,
    _split_k,
)

__all__ = ["fused_linear", "fused_linear_dx", "linear_coef_grad", "m_bucket"]


def m_bucket(m: int) -> int:
    """Autotune key for the row count: next power of two (varying batch does not re-tune)."""
    return next_pow2(max(int(m), 1))


@triton.jit
def _w_tile(
    w0_ptr, tau_ptr, coef_ptr, scale_ptr, offs_o, offs_c, O, I, numel, N, key,
    K: tl.constexpr, MODE: tl.constexpr, HAS_SCALE: tl.constexpr,
):
    """fp32 tile ``W[offs_o, offs_c]`` of the composed weight (0 outside ``[O, I]``).

    ``offs_o``/``offs_c`` are int32 (the launcher checks ``O * I < 2**31``): element offsets
    within one slab fit int32; the slab base ``tau_ptr + i * numel`` is a 64-bit scalar pointer,
    so ``N * numel`` may pass 2**31. Few live registers per element (offset, part, acc)."""
    mo = offs_o < O
    mask = mo[:, None] & (offs_c[None, :] < I)
    e = offs_o[:, None] * I + offs_c[None, :]
    w = tl.load(w0_ptr + e, mask=mask, other=0.0).to(tl.float32)
    part = _part_index(e, numel, key, K, MODE)
    tau_i = tau_ptr
    for i in range(N):
        t = tl.load(tau_i + e, mask=mask, other=0.0).to(tl.float32)
        if HAS_SCALE:
            s = tl.load(scale_ptr + i * O + offs_o, mask=mo, other=0.0)
            t = t * s[:, None]
        if K == 1:
            c = tl.load(coef_ptr + i)
        else:
            c = tl.load(coef_ptr + i * K + part, mask=mask, other=0.0)
        w += c * t
        tau_i += numel
    return w


@triton.jit
def _split_range(pid_s, red, SPLIT_K: tl.constexpr, BLOCK_K: tl.constexpr):
    """``[begin, end)`` of split program ``pid_s``'s share of a reduction of length ``red``
    (chunks of whole ``BLOCK_K`` tiles)."""
    chunk = tl.cdiv(tl.cdiv(red, SPLIT_K), BLOCK_K) * BLOCK_K
    begin = pid_s * chunk
    return begin, tl.minimum(begin + chunk, red)


@triton.jit
def _rows_tile(ptr, offs_m, offs_k, M, KDIM, stride_m, stride_k):
    """Tile ``[offs_m, offs_k]`` of an ``[M, KDIM]`` operand of any strides (0 outside)."""
    return tl.load(ptr + offs_m[:, None].to(tl.int64) * stride_m + offs_k[None, :].to(tl.int64) * stride_k,
                   mask=(offs_m[:, None] < M) & (offs_k[None, :] < KDIM), other=0.0)


@triton.jit
def _dot_operands(a, w, dtype: tl.constexpr, UPCAST: tl.constexpr):
    """The activation tile and the fp32 W tile as ``tl.dot`` takes them: W rounded to the compute
    ``dtype`` (as the compose path rounds it), both upcast to fp32 where the interpreter needs it."""
    w = _cast_out(w, dtype)
    if UPCAST:
        a = a.to(tl.float32)
        w = w.to(tl.float32)
    return a, w


@triton.jit
def _store_split(out_ptr, acc, offs_m, offs_n, M, NCOL, pid_s, SPLIT_K: tl.constexpr):
    """Store the ``[BLOCK_M, BLOCK_N]`` result tile of an ``[M, NCOL]`` output: rounded to the
    output dtype, or (SPLIT_K > 1) fp32 into partial ``pid_s`` of ``out[SPLIT_K, M, NCOL]``."""
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < NCOL)
    idx = offs_m[:, None].to(tl.int64) * NCOL + offs_n[None, :]
    if SPLIT_K == 1:
        tl.store(out_ptr + idx, _cast_out(acc, out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(out_ptr + pid_s.to(tl.int64) * M * NCOL + idx, acc, mask=mask)


@triton.jit
def _fused_linear_kernel(
    x_ptr, w0_ptr, tau_ptr, coef_ptr, scale_ptr, bias_ptr, out_ptr,
    M, O, I, numel, N, key, stride_xm, stride_xk, M_BUCKET,
    K: tl.constexpr, MODE: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr,
    SPLIT_K: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``out[m, o] = sum_c x[m, c] W[o, c] (+ bias[o])``; with SPLIT_K > 1, program ``s`` sums the
    c-chunk ``s`` and stores fp32 to ``out[s, m, o]`` (bias added by the launcher)."""
    pid_s = tl.program_id(2)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_o = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
    c_begin, c_end = _split_range(pid_s, I, SPLIT_K, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_O], dtype=tl.float32)
    for c0 in range(c_begin, c_end, BLOCK_K):
        offs_c = c0 + tl.arange(0, BLOCK_K)
        xt = _rows_tile(x_ptr, offs_m, offs_c, M, I, stride_xm, stride_xk)
        w = _w_tile(w0_ptr, tau_ptr, coef_ptr, scale_ptr, offs_o, offs_c, O, I, numel, N, key,
                    K, MODE, HAS_SCALE)
        xt, w = _dot_operands(xt, w, x_ptr.dtype.element_ty, UPCAST)
        acc = tl.dot(xt, tl.trans(w), acc, input_precision=PREC)
    if SPLIT_K == 1 and HAS_BIAS:
        acc += tl.load(bias_ptr + offs_o, mask=offs_o < O, other=0.0).to(tl.float32)[None, :]
    _store_split(out_ptr, acc, offs_m, offs_o, M, O, pid_s, SPLIT_K)


@triton.jit
def _fused_linear_dx_kernel(
    dy_ptr, w0_ptr, tau_ptr, coef_ptr, scale_ptr, out_ptr,
    M, O, I, numel, N, key, stride_dm, stride_do, M_BUCKET,
    K: tl.constexpr, MODE: tl.constexpr, HAS_SCALE: tl.constexpr,
    SPLIT_K: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``out[m, c] = sum_o dy[m, o] W[o, c]``; SPLIT_K as in ``_fused_linear_kernel`` (over O)."""
    pid_s = tl.program_id(2)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    o_begin, o_end = _split_range(pid_s, O, SPLIT_K, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_I], dtype=tl.float32)
    for o0 in range(o_begin, o_end, BLOCK_K):
        offs_o = o0 + tl.arange(0, BLOCK_K)
        dyt = _rows_tile(dy_ptr, offs_m, offs_o, M, O, stride_dm, stride_do)
        w = _w_tile(w0_ptr, tau_ptr, coef_ptr, scale_ptr, offs_o, offs_c, O, I, numel, N, key,
                    K, MODE, HAS_SCALE)
        dyt, w = _dot_operands(dyt, w, dy_ptr.dtype.element_ty, UPCAST)
        acc = tl.dot(dyt, w, acc, input_precision=PREC)
    _store_split(out_ptr, acc, offs_m, offs_c, M, I, pid_s, SPLIT_K)


@triton.jit
def _linear_coef_grad_kernel(
    x_ptr, dy_ptr, tau_ptr, scale_ptr, partial_ptr,
    M, O, I, numel, N, key, stride_xm, stride_xk, stride_dm, stride_do, M_BUCKET,
    K: tl.constexpr, MODE: tl.constexpr, HAS_SCALE: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr,
):
    """Program ``(po, pi)``: ``G = dy[:, o-tile]^T x[:, c-tile]`` accumulated over M in registers,
    then ``partial[pid, i, k] = sum_{tile, part k} G * tau_i``."""
    pid = tl.program_id(0)
    n_i = tl.cdiv(I, BLOCK_I)
    pid_o = pid // n_i
    pid_i = pid % n_i
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    offs_c = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    mo = offs_o < O
    mc = offs_c < I
    g = tl.zeros([BLOCK_O, BLOCK_I], dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mm = offs_m < M
        rows = offs_m[:, None].to(tl.int64)
        dyt = tl.load(dy_ptr + rows * stride_dm + offs_o[None, :].to(tl.int64) * stride_do,
                      mask=mm[:, None] & mo[None, :], other=0.0)
        xt = tl.load(x_ptr + rows * stride_xm + offs_c[None, :].to(tl.int64) * stride_xk,
                     mask=mm[:, None] & mc[None, :], other=0.0)
        if UPCAST:
            dyt = dyt.to(tl.float32)
            xt = xt.to(tl.float32)
        g = tl.dot(tl.trans(dyt), xt, g, input_precision=PREC)
    mask = mo[:, None] & mc[None, :]
    e = offs_o[:, None] * I + offs_c[None, :]
    part = _part_index(e, numel, key, K, MODE)
    out_p = partial_ptr + pid.to(tl.int64) * N * K
    tau_i = tau_ptr  # 64-bit scalar slab base; int32 offsets within the slab
    for i in range(N):
        t = tl.load(tau_i + e, mask=mask, other=0.0).to(tl.float32)
        if HAS_SCALE:
            s = tl.load(scale_ptr + i * O + offs_o, mask=mo, other=0.0)
            t = t * s[:, None]
        prod = g * t
        for kk in tl.static_range(K):
            if K == 1:
                v = tl.sum(tl.sum(prod, 1), 0)
            else:
                v = tl.sum(tl.sum(tl.where(part == kk, prod, 0.0), 1), 0)
            tl.store(out_p + i * K + kk, v)
        tau_i += numel


# ----------------------------------------------------------------------------------------------
# launch configuration (the tuning space and its pruning: ._linear_tuning)
# ----------------------------------------------------------------------------------------------
if INTERPRET:
    _fused_launch = _fused_linear_kernel
    _fused_dx_launch = _fused_linear_dx_kernel
    _lcg_launch = _linear_coef_grad_kernel
    _FUSED_FIXED = {"BLOCK_O": 64, "BLOCK_K": 128}
    _FUSED_DX_FIXED = {"BLOCK_I": 64, "BLOCK_K": 128}
    _LCG_FIXED: dict = {}
else:  # pragma: no cover - GPU only
    # Tile shapes of the fused GEMMs may be tuned freely: every config writes every output (or
    # every split-K partial) element, and the split count is fixed by the launcher. Configs that
    # make ptxas spill registers for a specialization are pruned before tuning (see _prune_*);
    # atlas_kernels_tests/_compile_kernels.py --spills checks every remaining config for sm_90.
    _fused_launch = triton.autotune(
        configs=_fused_configs(FUSED_SAFE, FUSED_LIGHT, "BLOCK_O"),
        key=["M_BUCKET", "O", "I", "N", "K", "SPLIT_K"],
        prune_configs_by={"early_config_prune": _prune_fused},
    )(_fused_linear_kernel)
    _fused_dx_launch = triton.autotune(
        configs=_fused_configs(FUSED_DX_SAFE, FUSED_DX_LIGHT, "BLOCK_I"),
        key=["M_BUCKET", "O", "I", "N", "K", "SPLIT_K"],
        prune_configs_by={"early_config_prune": _prune_fused},
    )(_fused_linear_dx_kernel)
    # The coefficient-gradient tile shape sets the number of partial rows, so it is chosen by
    # `_lcg_tiles` (a function of the M bucket) and only warps/stages are tuned.
    _lcg_launch = triton.autotune(
        configs=[triton.Config({}, num_warps=w, num_stages=s) for w, s in LCG_CONFIGS],
        key=["M_BUCKET", "O", "I", "N", "K", "BLOCK_O", "BLOCK_I"],
        prune_configs_by={"early_config_prune": _prune_lcg},
    )(_linear_coef_grad_kernel)
    _FUSED_FIXED = {}
    _FUSED_DX_FIXED = {}
    _LCG_FIXED = {}



def _check_int32(o: int, i: int):
    if o * i + max(o, i) * 256 >= 2**31:
        raise ValueError(f"a linear weight of {o} x {i} elements is too large for int32 tile offsets")


def _prep_weight(w0, w_tau, w_coef, partition, w_scale):
    o, i = w0.shape
    lb = launch_block(w_tau, (o, i), partition, coef=w_coef, scale=w_scale, names=("w_tau", "w0"))
    _check_int32(o, i)
    return o, i, lb.n, lb.k, lb.code, lb.key, lb.coef, lb.scale


def _out_and_split(out, m: int, cols: int, red: int, out_dtype, dev, split_k):
    """The ``[M, cols]`` output of a fused GEMM (``out`` checked, or a new one), its row tile, the
    split-K count over the reduction of length ``red``, and where the programs store (``out``
    itself, or fp32 partials ``[split, M, cols]``)."""
    if out is None:
        out = torch.empty(m, cols, dtype=out_dtype, device=dev)
    elif out.shape != (m, cols) or out.dtype != out_dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous [{m}, {cols}] tensor of {out_dtype}")
    bm = _block_m(m)
    sk = _split_k(dev, triton.cdiv(m, bm) * triton.cdiv(cols, 64), red, split_k)
    return out, bm, sk, (out if sk == 1 or m * cols == 0 else scratch((sk, m, cols), dev))


def fused_linear(
    x2d: torch.Tensor,
    w0: torch.Tensor,
    w_tau: torch.Tensor,
    w_coef: torch.Tensor,
    partition: Optional[Partition] = None,
    bias: Optional[torch.Tensor] = None,
    w_scale: Optional[torch.Tensor] = None,
    out_dtype: Optional[torch.dtype] = None,
    out: Optional[torch.Tensor] = None,
    split_k: Optional[int] = None,
) -> torch.Tensor:
    """``y = x W^T + bias`` (``[M, O]``) with W composed tile by tile, never stored.

    x2d ``[M, I]`` in the compute dtype (any strides), w0 ``[O, I]``, w_tau ``[N, O, I]``, w_coef
    ``[N]``/``[N, K]``, bias ``None`` or ``[O]`` (already composed), w_scale ``None`` or ``[N, O]``.
    W tiles are rounded to x's dtype before the dot (as the compose path does); fp32 accumulation.
    """
    m, ii = x2d.shape
    o, i, n, k, code, key, coef2, scale2 = _prep_weight(w0, w_tau, w_coef, partition, w_scale)
    if ii != i:
        raise ValueError(f"x has {ii} features, the weight {i}")
    dev = x2d.device
    out, bm, sk, dst = _out_and_split(out, m, o, i, out_dtype or x2d.dtype, dev, split_k)
    if m == 0 or o == 0:
        return out
    if i == 0:
        return out.copy_(bias.expand(m, o) if bias is not None else torch.zeros((), device=dev))
    bias_c = bias.contiguous() if bias is not None else None
    grid = lambda meta: (triton.cdiv(m, bm), triton.cdiv(o, meta["BLOCK_O"]), sk)  # noqa: E731
    launch(_fused_launch, grid,
        x2d, w0.contiguous(), w_tau.contiguous(), coef2, scale2 if scale2 is not None else coef2,
        bias_c if bias_c is not None else coef2, dst,
        m, o, i, o * i, n, key, x2d.stride(0), x2d.stride(1), m_bucket(m),
        K=k, MODE=code, HAS_SCALE=scale2 is not None, HAS_BIAS=bias is not None,
        SPLIT_K=sk, UPCAST=upcast_dot(x2d.dtype), PREC=dot_precision(x2d.dtype), BLOCK_M=bm, **_FUSED_FIXED,
    )
    if sk > 1:
        y = dst.sum(0)
        if bias is not None:
            y += bias.to(torch.float32)
        out.copy_(y)
    return out


def fused_linear_dx(
    dy2d: torch.Tensor,
    w0: torch.Tensor,
    w_tau: torch.Tensor,
    w_coef: torch.Tensor,
    partition: Optional[Partition] = None,
    w_scale: Optional[torch.Tensor] = None,
    out_dtype: Optional[torch.dtype] = None,
    out: Optional[torch.Tensor] = None,
    split_k: Optional[int] = None,
) -> torch.Tensor:
    """``dx = dy W`` (``[M, I]``) with W composed tile by tile (rounded to dy's dtype), never stored."""
    m, oo = dy2d.shape
    o, i, n, k, code, key, coef2, scale2 = _prep_weight(w0, w_tau, w_coef, partition, w_scale)
    if oo != o:
        raise ValueError(f"dy has {oo} features, the weight {o} outputs")
    dev = dy2d.device
    out, bm, sk, dst = _out_and_split(out, m, i, o, out_dtype or dy2d.dtype, dev, split_k)
    if m == 0 or i == 0:
        return out
    if o == 0:
        return out.zero_()
    grid = lambda meta: (triton.cdiv(m, bm), triton.cdiv(i, meta["BLOCK_I"]), sk)  # noqa: E731
    launch(_fused_dx_launch, grid,
        dy2d, w0.contiguous(), w_tau.contiguous(), coef2, scale2 if scale2 is not None else coef2, dst,
        m, o, i, o * i, n, key, dy2d.stride(0), dy2d.stride(1), m_bucket(m),
        K=k, MODE=code, HAS_SCALE=scale2 is not None,
        SPLIT_K=sk, UPCAST=upcast_dot(dy2d.dtype), PREC=dot_precision(dy2d.dtype), BLOCK_M=bm, **_FUSED_DX_FIXED,
    )
    if sk > 1:
        out.copy_(dst.sum(0))
    return out


def linear_coef_grad(
    x2d: torch.Tensor,
    dy2d: torch.Tensor,
    w_tau: torch.Tensor,
    k: int = 1,
    partition: Optional[Partition] = None,
    w_scale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """float32 ``[N, K]``: ``dlam[i, k] = sum_{(o, c) in part k} G[o, c] * tau_i[o, c]``, ``G = dy^T x``.

    x2d ``[M, I]`` and dy2d ``[M, O]`` in the same dtype (any strides), w_tau ``[N, O, I]``.
    ``G`` is formed tile by tile in registers (fp32); per-tile partial sums are reduced by a
    fixed-order ``torch.sum`` (deterministic, no atomics).
    """
    m, i = x2d.shape
    m2, o = dy2d.shape
    if m != m2:
        raise ValueError(f"x has {m} rows, dy {m2}")
    if dy2d.dtype != x2d.dtype:
        dy2d = dy2d.to(x2d.dtype)
    lb = launch_block(w_tau, (o, i), partition, k=k, scale=w_scale, names=("w_tau", "dy^T x [O, I]"))
    _check_int32(o, i)
    n, dev, scale2 = lb.n, w_tau.device, lb.scale
    if o * i == 0 or m == 0:
        return torch.zeros(n, k, dtype=torch.float32, device=dev)
    bm, bo, bi = _lcg_tiles(m)
    programs = triton.cdiv(o, bo) * triton.cdiv(i, bi)
    partial = scratch((programs, n, k), dev)
    launch(_lcg_launch, (programs,),
        x2d, dy2d, w_tau.contiguous(), scale2 if scale2 is not None else partial, partial,
        m, o, i, o * i, n, lb.key,
        x2d.stride(0), x2d.stride(1), dy2d.stride(0), dy2d.stride(1), m_bucket(m),
        K=k, MODE=lb.code, HAS_SCALE=scale2 is not None, UPCAST=upcast_dot(x2d.dtype), PREC=dot_precision(x2d.dtype),
        BLOCK_M=bm, BLOCK_O=bo, BLOCK_I=bi, **_LCG_FIXED,
    )
    return partial.sum(0) if programs > 1 else partial[0].clone()
