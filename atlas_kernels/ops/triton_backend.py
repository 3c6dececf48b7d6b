"""The ``"triton"`` backend: the kernels of :mod:`atlas_kernels.kernels`, as custom ops with autograd.

- Grouped (the eager default): :meth:`TritonBackend.compose_group` composes every block of a group
  in one launch (``kernels.compose_group``) into one flat buffer per output dtype, handing out views;
  :meth:`TritonBackend.coef_grad_group` concatenates the blocks' gradients (one ``cat``) and reduces
  every coefficient gradient in two launches (``kernels.coef_grad_group``).
- One block (under ``torch.compile``, and for blocks outside a group): the custom ops
  ``atlas_kernels::triton_compose`` and, for linear layers that run their own op (``fused_linear``),
  ``atlas_kernels::triton_linear``. Each op carries its own chain rule (``register_autograd``), so
  eager calls and compiled graphs run the very same ops (flash-attention's interface habit).

``linear`` at ``M <= fused_max_m`` rows takes the fused GEMMs, which build each W tile from theta0
and the N task-vector tiles while streaming (W never exists in memory; they re-read the slabs once
per M tile, so only small M pays); otherwise it composes W once and calls cuBLAS. Its coefficient
gradient never forms a dense G (``kernels.linear_coef_grad``: G tile by tile in fp32 registers).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .. import kernels
from .._launches import region
from ..blocks import Block, coef_matrix
from ..kernels._group import coef_grad_group, compose_group, group_table
from ..partitions import Partition
from .backend import Backend, compute_dtype
from .torch_backend import coef_grad_values, compose_values, dense

__all__ = ["TritonBackend", "BACKEND", "FUSED_MAX_M"]

# Rows (M = prod of x's leading dims) at or below which `linear` uses the fused GEMMs (the default
# of PatchConfig.fused_max_m; set from the byte model: docs/PERFORMANCE.md, "The fused linear").
FUSED_MAX_M = 64

Tensor = torch.Tensor
OptTensor = Optional[torch.Tensor]


def _partition(k: int, code: int, key: int) -> Partition:
    return Partition(k, "hash" if code == 2 else "contiguous", key)


def _off(device: torch.device):
    return torch.autocast(device.type, enabled=False)


# ------------------------------------------------------------------------------------------------
# custom ops (tensors and ints only; fake implementations for tracing) and their chain rules
# ------------------------------------------------------------------------------------------------
@torch.library.custom_op("atlas_kernels::triton_compose", mutates_args=())
def _compose_op(coef: Tensor, theta0: Tensor, tau: Tensor, scale: OptTensor, k: int, code: int, key: int,
                out_dtype: torch.dtype) -> Tensor:
    return kernels.compose(theta0, tau, coef, _partition(k, code, key), scale=scale, out_dtype=out_dtype)


@_compose_op.register_fake
def _(coef, theta0, tau, scale, k, code, key, out_dtype):
    return theta0.new_empty(theta0.shape, dtype=out_dtype)


@torch.library.custom_op("atlas_kernels::triton_coef_grad", mutates_args=())
def _coef_grad_op(grad: Tensor, tau: Tensor, scale: OptTensor, k: int, code: int, key: int) -> Tensor:
    return kernels.coef_grad(grad, tau, k, _partition(k, code, key), scale=scale)


@_coef_grad_op.register_fake
def _(grad, tau, scale, k, code, key):
    return grad.new_empty((tau.shape[0], k), dtype=torch.float32)


def _compose_setup(ctx, inputs, output):
    coef, theta0, tau, scale, k, code, key, out_dtype = inputs
    ctx.save_for_backward(tau, scale)
    ctx.enc = (k, code, key)


def _compose_backward(ctx, grad):
    """``W = theta0 + sum_i coef[i, part(e)] * tau_i`` gives ``dL/dcoef[i, k] = sum_{e : part(e) = k}
    dL/dW[e] * tau[i, e]`` (``triton_coef_grad``: one pass over the slab, fixed-order sum)."""
    tau, scale = ctx.saved_tensors
    with region():
        return (_coef_grad_op(grad.contiguous(), tau, scale, *ctx.enc),) + (None,) * 7


_compose_op.register_autograd(_compose_backward, setup_context=_compose_setup)


@torch.library.custom_op("atlas_kernels::triton_linear", mutates_args=())
def _linear_op(x: Tensor, coef: Tensor, w0: Tensor, tau: Tensor, scale: OptTensor, k: int, code: int,
               key: int, fused: bool) -> Tuple[Tensor, Tensor]:
    """``(y, w_saved)``: ``y = x W^T``; ``w_saved`` is the composed W kept for backward when not
    fused (cuBLAS then does both products), an empty tensor when fused."""
    with _off(x.device):
        p = _partition(k, code, key)
        if fused:
            return kernels.fused_linear(x, w0, tau, coef, p, w_scale=scale, out_dtype=x.dtype), x.new_empty(0)
        w = kernels.compose(w0, tau, coef, p, scale=scale, out_dtype=x.dtype)
        return F.linear(x, w), w


@_linear_op.register_fake
def _(x, coef, w0, tau, scale, k, code, key, fused):
    return x.new_empty((x.shape[0], w0.shape[0])), x.new_empty((0,) if fused else w0.shape)


@torch.library.custom_op("atlas_kernels::triton_linear_dx", mutates_args=())
def _linear_dx_op(dy: Tensor, coef: Tensor, w0: Tensor, tau: Tensor, scale: OptTensor, k: int, code: int,
                  key: int, w_saved: Tensor, fused: bool) -> Tensor:
    with _off(dy.device):
        if not fused:
            return dy @ w_saved
        return kernels.fused_linear_dx(dy, w0, tau, coef, _partition(k, code, key), w_scale=scale,
                                       out_dtype=dy.dtype)


@_linear_dx_op.register_fake
def _(dy, coef, w0, tau, scale, k, code, key, w_saved, fused):
    return dy.new_empty((dy.shape[0], w0.shape[1]))


@torch.library.custom_op("atlas_kernels::triton_linear_coef_grad", mutates_args=())
def _linear_coef_grad_op(x: Tensor, dy: Tensor, tau: Tensor, scale: OptTensor, k: int, code: int,
                         key: int) -> Tensor:
    with _off(x.device):
        return kernels.linear_coef_grad(x, dy, tau, k, _partition(k, code, key), w_scale=scale)


@_linear_coef_grad_op.register_fake
def _(x, dy, tau, scale, k, code, key):
    return x.new_empty((tau.shape[0], k), dtype=torch.float32)


def _linear_setup(ctx, inputs, output):
    x, coef, w0, tau, scale, k, code, key, fused = inputs
    ctx.save_for_backward(x, coef, w0, tau, scale, output[1])
    ctx.enc = (k, code, key)
    ctx.fused = fused


def _linear_backward(ctx, dy, _dw_saved):
    """``y = x W^T`` with ``W = w0 + sum_i coef[i, part] tau_i`` (x, dy are ``[M, I]``, ``[M, O]``):

    - ``dx = dy W`` (``triton_linear_dx``: fused, W tiles rebuilt while streaming, never stored;
      else the W composed in forward);
    - ``dcoef[i, k] = <G, tau_i>`` over the elements of part k, with ``G = dy^T x`` formed tile by
      tile in registers in fp32 (``triton_linear_coef_grad``: no dense G on either path).
    """
    x, coef, w0, tau, scale, w_saved = ctx.saved_tensors
    need = ctx.needs_input_grad
    with region():
        dy = dy.contiguous()
        dx = _linear_dx_op(dy, coef, w0, tau, scale, *ctx.enc, w_saved, ctx.fused) if need[0] else None
        dc = _linear_coef_grad_op(x, dy, tau, scale, *ctx.enc) if need[1] else None
    return (dx, dc) + (None,) * 7


_linear_op.register_autograd(_linear_backward, setup_context=_linear_setup)


# ------------------------------------------------------------------------------------------------
# the backend
# ------------------------------------------------------------------------------------------------
def _coef2d(block: Block):
    """The block's coefficients as the kernels read them: fp32 ``[N, K]`` (differentiable)."""
    return coef_matrix(block.coef, block.tau.shape[0]).float()


class TritonBackend(Backend):
    """Triton kernels; CUDA tensors (or CPU tensors under ``TRITON_INTERPRET=1``)."""

    name = "triton"

    def compose(self, block: Block, out_dtype):
        b = dense(block)
        return _compose_op(_coef2d(b), b.theta0.contiguous(), b.tau, b.scale, *b.encoding(),
                           out_dtype or b.theta0.dtype)

    def linear(self, x, wblock: Block, fused_max_m: Optional[int] = None):
        """Fused GEMMs at ``M <= fused_max_m`` rows (default :data:`FUSED_MAX_M`), else the weight
        composed once and cuBLAS; the coefficient gradient never forms a dense G on either path."""
        w = dense(wblock, "the weight")
        dtype = compute_dtype(x)
        lead, feat = x.shape[:-1], x.shape[-1]
        x2 = x.to(dtype).reshape(-1, feat)
        thr = FUSED_MAX_M if fused_max_m is None else fused_max_m
        y, _ = _linear_op(x2, _coef2d(w), w.theta0.contiguous(), w.tau, w.scale, *w.encoding(), x2.shape[0] <= thr)
        return y.reshape(*lead, w.theta0.shape[0])

    def compose_values(self, theta0, tau, coef, partition, out_dtype, scale=None):
        if torch.float64 in (theta0.dtype, out_dtype):
            return compose_values(theta0, tau, coef, partition, out_dtype, scale)
        return kernels.compose(theta0, tau, coef, partition, scale=scale, out_dtype=out_dtype)

    def coef_grad_values(self, grad, tau, k, partition, scale=None):
        if grad.dtype == torch.float64:
            return coef_grad_values(grad, tau, k, partition, scale)
        return kernels.coef_grad(grad, tau, k, partition, scale=scale)

    # ------------------------------------------------------------------ every block: two launches
    def prepare_group(self, group):
        segments = [dict(theta0=e.theta0, tau=e.tau, scale=e.scale, coef=e.coef, index=e.rows,
                         k=e.partition.encoding()[0], mode=e.partition.encoding()[1], key=e.partition.encoding()[2],
                         sel=e.sel, out_off=e.out_off, coef_off=e.coef_off) for e in group.entries]
        group.launch = group_table(segments, group.device)

    def compose_group(self, group, dtypes):
        # One flat buffer per output dtype (one for both classes when their dtypes agree: no
        # autocast), per-block views of it.
        sizes, dev = group.sizes, group.device
        outs = [None, None]
        if dtypes[0] == dtypes[1]:
            flat = torch.empty(sizes[0] + sizes[1], dtype=dtypes[0], device=dev)
            outs = [flat[:sizes[0]], flat[sizes[0]:]]
        else:
            outs = [torch.empty(sizes[sel], dtype=dtypes[sel], device=dev) if sizes[sel] else None for sel in (0, 1)]
        compose_group(group.launch, outs, group.scaled)
        views = []
        for sel in (0, 1):
            if group.shape_refs[sel]:
                views.extend(torch._utils._unflatten_dense_tensors(outs[sel], group.shape_refs[sel]))
        return views

    def coef_grad_group(self, group, grads, cast=True):
        # float32 either way (no float64 block reaches Triton, and coefficients are float32).
        # The blocks' gradients laid out as compose_group's outputs: one cat per output dtype.
        n0 = len(group.shape_refs[0])
        refs = group.shape_refs[0] + group.shape_refs[1]
        dts = [next((g.dtype for g in part if g is not None), None) for part in (grads[:n0], grads[n0:])]
        dts = [dt or dts[1 - i] or torch.float32 for i, dt in enumerate(dts)]

        def flat(gs, rs, dt):
            zero = torch.zeros
            return torch._utils._flatten_dense_tensors(
                [zero(r.shape, dtype=dt, device=group.device) if g is None else g.to(dt) for g, r in zip(gs, rs)])

        if dts[0] == dts[1] or not (group.shape_refs[0] and group.shape_refs[1]):
            dt = dts[0] if group.shape_refs[0] else dts[1]
            whole = flat(grads, refs, dt)
            flats = [whole[:group.sizes[0]], whole[group.sizes[0]:]]
        else:
            flats = [flat(grads[:n0], group.shape_refs[0], dts[0]), flat(grads[n0:], group.shape_refs[1], dts[1])]
        out = coef_grad_group(group.launch, flats, group.scaled)
        return list(torch._utils._unflatten_dense_tensors(out, group.coefs))


BACKEND = TritonBackend()
