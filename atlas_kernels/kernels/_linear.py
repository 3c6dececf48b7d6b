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

from ..partitions import Partition
from ._common import (
    INTERPRET,
    MODE_HASH,
    _cast_out,
    _part_index,
    as_partition,
    check_hash_numel,
    check_scale,
    coef2d,
    device_sms,
    dot_precision,
    mode_code,
    next_pow2,
    scratch,
    upcast_dot,
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
def _fused_linear_kernel(
    x_ptr, w0_ptr, tau_ptr, coef_ptr, scale_ptr, bias_ptr, out_ptr,
    M, O, I, numel, N, key, stride_xm, stride_xk, M_BUCKET,
    K: tl.constexpr, MODE: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr,
    SPLIT_K: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``out[m, o] = sum_c x[m, c] W[o, c] (+ bias[o])``; with SPLIT_K > 1, program ``s`` sums the
    c-chunk ``s`` and stores fp32 to ``out[s, m, o]`` (bias added by the launcher)."""
    pid_m = tl.program_id(0)
    pid_o = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    chunk = tl.cdiv(tl.cdiv(I, SPLIT_K), BLOCK_K) * BLOCK_K
    c_begin = pid_s * chunk
    c_end = tl.minimum(c_begin + chunk, I)
    acc = tl.zeros([BLOCK_M, BLOCK_O], dtype=tl.float32)
    for c0 in range(c_begin, c_end, BLOCK_K):
        offs_c = c0 + tl.arange(0, BLOCK_K)
        xt = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_c[None, :].to(tl.int64) * stride_xk,
                     mask=(offs_m[:, None] < M) & (offs_c[None, :] < I), other=0.0)
        w = _w_tile(w0_ptr, tau_ptr, coef_ptr, scale_ptr, offs_o, offs_c, O, I, numel, N, key,
                    K, MODE, HAS_SCALE)
        w = _cast_out(w, x_ptr.dtype.element_ty)  # the compute-dtype weight, as the compose path rounds it
        if UPCAST:
            xt = xt.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(xt, tl.trans(w), acc, input_precision=PREC)
    mask = (offs_m[:, None] < M) & (offs_o[None, :] < O)
    o_idx = offs_m[:, None].to(tl.int64) * O + offs_o[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_o, mask=offs_o < O, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + o_idx, _cast_out(acc, out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(out_ptr + pid_s.to(tl.int64) * M * O + o_idx, acc, mask=mask)


@triton.jit
def _fused_linear_dx_kernel(
    dy_ptr, w0_ptr, tau_ptr, coef_ptr, scale_ptr, out_ptr,
    M, O, I, numel, N, key, stride_dm, stride_do, M_BUCKET,
    K: tl.constexpr, MODE: tl.constexpr, HAS_SCALE: tl.constexpr,
    SPLIT_K: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``out[m, c] = sum_o dy[m, o] W[o, c]``; SPLIT_K as in ``_fused_linear_kernel`` (over O)."""
    pid_m = tl.program_id(0)
    pid_i = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    chunk = tl.cdiv(tl.cdiv(O, SPLIT_K), BLOCK_K) * BLOCK_K
    o_begin = pid_s * chunk
    o_end = tl.minimum(o_begin + chunk, O)
    acc = tl.zeros([BLOCK_M, BLOCK_I], dtype=tl.float32)
    for o0 in range(o_begin, o_end, BLOCK_K):
        offs_o = o0 + tl.arange(0, BLOCK_K)
        dyt = tl.load(dy_ptr + offs_m[:, None].to(tl.int64) * stride_dm + offs_o[None, :].to(tl.int64) * stride_do,
                      mask=(offs_m[:, None] < M) & (offs_o[None, :] < O), other=0.0)
        w = _w_tile(w0_ptr, tau_ptr, coef_ptr, scale_ptr, offs_o, offs_c, O, I, numel, N, key,
                    K, MODE, HAS_SCALE)
        w = _cast_out(w, dy_ptr.dtype.element_ty)
        if UPCAST:
            dyt = dyt.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(dyt, w, acc, input_precision=PREC)
    mask = (offs_m[:, None] < M) & (offs_c[None, :] < I)
    o_idx = offs_m[:, None].to(tl.int64) * I + offs_c[None, :]
    if SPLIT_K == 1:
        tl.store(out_ptr + o_idx, _cast_out(acc, out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(out_ptr + pid_s.to(tl.int64) * M * I + o_idx, acc, mask=mask)


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
# launch configuration
# ----------------------------------------------------------------------------------------------
# Autotune configs: (BLOCK_O or BLOCK_I, BLOCK_K, num_warps) of the fused GEMMs. Chosen from a
# ptxas sweep for sm_90 (every tile of 32..128 x 32..128 on 4 and 8 warps, BLOCK_M 16 and 64,
# bf16/int8 storage, bf16/fp32 compute, K 1 and 4): the *_SAFE configs never spilled; the *_LIGHT
# ones spill only where elements carry a part index or a scale (K > 1, int8/fp8), so they are
# pruned there. `python -m atlas_kernels_tests._compile_kernels --spills` re-checks the survivors.
FUSED_SAFE = [(32, 32, 4), (32, 64, 4), (32, 64, 8), (32, 128, 8), (64, 64, 8)]
FUSED_LIGHT = [(64, 128, 8), (128, 64, 8), (128, 32, 4)]
FUSED_DX_SAFE = [(32, 32, 8), (32, 128, 8), (64, 32, 8)]
FUSED_DX_LIGHT = [(64, 64, 4), (32, 64, 4), (128, 32, 4), (128, 64, 8), (64, 128, 8)]
# (num_warps, num_stages) of the coefficient gradient, whose tile is fixed by `_lcg_tiles`.
LCG_CONFIGS = [(4, 3), (8, 3), (4, 4), (8, 2)]


def _arg(named_args, kwargs, name, default=None):
    return kwargs.get(name, named_args.get(name, default))


def _heavy(named_args, kwargs) -> bool:
    """Elements carry a part index (K > 1) or a dequantization scale: more live registers."""
    return _arg(named_args, kwargs, "K", 1) > 1 or bool(_arg(named_args, kwargs, "HAS_SCALE", False))


def _prune_fused(configs, named_args, **kwargs):
    if not _heavy(named_args, kwargs):
        return configs
    kept = [c for c in configs if not getattr(c, "atlas_light", False)]
    return kept or configs


def _prune_lcg(configs, named_args, **kwargs):
    """The fp32 G tile lives through the N-slab epilogue: large tiles, and 64 x 64 tiles whose
    elements carry a part or scale, get 8 warps (ptxas, sm_90: 4 warps spilled 140-196 bytes)."""
    tile = _arg(named_args, kwargs, "BLOCK_O", 64) * _arg(named_args, kwargs, "BLOCK_I", 64)
    limit = 4096 if _heavy(named_args, kwargs) else 8192
    kept = [c for c in configs if not (tile >= limit and c.num_warps < 8)]
    return kept or configs


def _fused_configs(safe, light, tile_name):
    out = []
    for group, is_light in ((safe, False), (light, True)):
        for t, bk, w in group:
            cfg = triton.Config({tile_name: t, "BLOCK_K": bk}, num_warps=w, num_stages=3)
            cfg.atlas_light = is_light  # read by _prune_fused
            out.append(cfg)
    return out


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


def _block_m(m: int) -> int:
    return min(64, max(16, next_pow2(m)))


def _split_k(device, tiles: int, red: int, split_k: Optional[int]) -> int:
    """Programs along the reduction so that about 2 programs per SM run (GPU); 1 in the interpreter."""
    if split_k is not None:
        return max(1, int(split_k))
    if INTERPRET or device.type != "cuda":
        return 1
    want = triton.cdiv(2 * device_sms(device), max(tiles, 1))
    return int(max(1, min(want, triton.cdiv(red, 256), 16)))


def _lcg_tiles(m: int):
    """(BLOCK_M, BLOCK_O, BLOCK_I) for the coefficient gradient: 64 x 64 (O, I) tiles at small M
    (more programs for the memory-bound task-vector pass), 64 x 128 at large M. The fp32 G tile,
    its int32 offsets and parts stay live through the N-slab epilogue, so 128 x 128 would spill;
    tune these on a GPU (only warps/stages are autotuned: the tile sets the partial-buffer rows)."""
    if INTERPRET:
        return 64, 64, 128
    if m <= 64:
        return 16 if m <= 16 else 32, 64, 64
    return 32, 64, 128


def _check_int32(o: int, i: int):
    if o * i + max(o, i) * 256 >= 2**31:
        raise ValueError(f"a linear weight of {o} x {i} elements is too large for int32 tile offsets")


def _prep_weight(w0, w_tau, w_coef, partition, w_scale):
    o, i = w0.shape
    n = w_tau.shape[0]
    if w_tau.numel() != n * o * i:
        raise ValueError(f"w_tau {tuple(w_tau.shape)} does not match w0 {tuple(w0.shape)}")
    coef2 = coef2d(w_coef, n, w_tau.device)
    k = coef2.shape[1]
    p = as_partition(partition, k)
    code = mode_code(k, p.mode)
    check_hash_numel(o * i, code)
    _check_int32(o, i)
    scale2 = check_scale(w_scale, n, (o, i), w_tau.device)
    return o, i, n, k, code, (p.key if code == MODE_HASH else 0), coef2, scale2


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
    out_dtype = out_dtype or x2d.dtype
    dev = x2d.device
    if out is None:
        out = torch.empty(m, o, dtype=out_dtype, device=dev)
    elif out.shape != (m, o) or out.dtype != out_dtype or not out.is_contiguous():
        raise ValueError("out must be a contiguous [M, O] tensor of out_dtype")
    if m == 0 or o == 0:
        return out
    if i == 0:
        return out.copy_(bias.expand(m, o) if bias is not None else torch.zeros((), device=dev))
    bm = _block_m(m)
    sk = _split_k(dev, triton.cdiv(m, bm) * triton.cdiv(o, 64), i, split_k)
    dst = out if sk == 1 else scratch((sk, m, o), dev)
    bias_c = bias.contiguous() if bias is not None else None
    grid = lambda meta: (triton.cdiv(m, bm), triton.cdiv(o, meta["BLOCK_O"]), sk)  # noqa: E731
    _fused_launch[grid](
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
    out_dtype = out_dtype or dy2d.dtype
    dev = dy2d.device
    if out is None:
        out = torch.empty(m, i, dtype=out_dtype, device=dev)
    elif out.shape != (m, i) or out.dtype != out_dtype or not out.is_contiguous():
        raise ValueError("out must be a contiguous [M, I] tensor of out_dtype")
    if m == 0 or i == 0:
        return out
    if o == 0:
        return out.zero_()
    bm = _block_m(m)
    sk = _split_k(dev, triton.cdiv(m, bm) * triton.cdiv(i, 64), o, split_k)
    dst = out if sk == 1 else scratch((sk, m, i), dev)
    grid = lambda meta: (triton.cdiv(m, bm), triton.cdiv(i, meta["BLOCK_I"]), sk)  # noqa: E731
    _fused_dx_launch[grid](
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
    n = w_tau.shape[0]
    if w_tau.numel() != n * o * i:
        raise ValueError(f"w_tau {tuple(w_tau.shape)} does not match [N, {o}, {i}]")
    p = as_partition(partition, k)
    code = mode_code(k, p.mode)
    check_hash_numel(o * i, code)
    _check_int32(o, i)
    dev = w_tau.device
    scale2 = check_scale(w_scale, n, (o, i), dev)
    if o * i == 0 or m == 0:
        return torch.zeros(n, k, dtype=torch.float32, device=dev)
    bm, bo, bi = _lcg_tiles(m)
    programs = triton.cdiv(o, bo) * triton.cdiv(i, bi)
    partial = scratch((programs, n, k), dev)
    _lcg_launch[(programs,)](
        x2d, dy2d, w_tau.contiguous(), scale2 if scale2 is not None else partial, partial,
        m, o, i, o * i, n, p.key if code == MODE_HASH else 0,
        x2d.stride(0), x2d.stride(1), dy2d.stride(0), dy2d.stride(1), m_bucket(m),
        K=k, MODE=code, HAS_SCALE=scale2 is not None, UPCAST=upcast_dot(x2d.dtype), PREC=dot_precision(x2d.dtype),
        BLOCK_M=bm, BLOCK_O=bo, BLOCK_I=bi, **_LCG_FIXED,
    )
    return partial.sum(0) if programs > 1 else partial[0].clone()
