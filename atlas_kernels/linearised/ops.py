"""Tangent ops of the linearised model (forward-mode rules, differentiable in the coefficients).

The linearised model around theta0 is ``f_lin(x; theta0 + D) = f(x; theta0) + J f(x; theta0) . D``
with ``D_b = sum_i lam[i, b, part(e)] tau[i, b, e]`` per block. Every op here takes the primal
values (computed without a graph) and returns the tangent, which is differentiable in the
coefficients (and in the incoming tangents).

- :func:`delta`: ``D = sum_i lam_i tau_i`` of one block (the composition with ``theta0 = 0``).
- :func:`tangent_linear`: ``x0 D_W^T + D_c``, the parameter part of a linear layer's tangent; its
  backward reduces ``G = g^T x0`` against the slab (never stored on the Triton path).
- :func:`attention_tangent`: scaled dot-product attention's primal and tangent in one pass.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .. import ops
from ..blocks import Block
from ..ops import torch_backend as TB

__all__ = ["delta", "tangent_linear", "attention_tangent", "TangentLinearFunction"]


def _kernels():
    from .. import kernels

    return kernels


def _backend_name(backend, t: torch.Tensor, dtype: torch.dtype) -> str:
    """The tangent ops' kernels: ``"triton"`` or ``"torch"`` (the extension has no tangent op yet,
    and float64 reference work takes torch). ``backend``: the module's backend object, or a name
    (``"auto"`` decided for ``t``'s device)."""
    name = backend.name if isinstance(backend, ops.Backend) else ops.choose(backend, t.device)
    if name != "triton" or torch.float64 in (t.dtype, dtype):
        return "torch"
    return name


def _zeros(shape, dtype, device):
    return torch.zeros(shape, dtype=dtype, device=device)


def _delta_values(shape, tau, coef, partition, dtype, scale, name):
    """``sum_i coef[i, part(e)] tau[i, e]`` of a block of ``shape`` (no autograd)."""
    if name == "triton":
        return _kernels().compose(_zeros(shape, dtype, tau.device), tau, coef, partition, scale=scale,
                                  out_dtype=dtype)
    return TB.compose_values(_zeros(shape, TB.acc_dtype(dtype, tau.dtype), tau.device), tau, coef, partition,
                             dtype, scale)


def _coef_grad(grad, tau, k, partition, scale, name):
    if name == "triton":
        return _kernels().coef_grad(grad.contiguous(), tau, k, partition, scale)
    return TB.coef_grad_values(grad, tau, k, partition, scale)


class DeltaFunction(torch.autograd.Function):
    """``D = sum_i coef[i, part(e)] tau_i`` (a block's displacement, theta0 = 0).

    Chain rule: ``dL/dcoef[i, k] = sum_{e : part(e) = k} dL/dD[e] tau[i, e]``.
    """

    @staticmethod
    def forward(ctx, coef, shape, tau, scale, partition, dtype, name):
        ctx.save_for_backward(tau, scale)
        ctx.meta = (partition, name, coef.shape, coef.dtype)
        with torch.autocast(tau.device.type, enabled=False):
            return _delta_values(shape, tau, coef.detach(), partition, dtype, scale, name)

    @staticmethod
    def backward(ctx, grad):
        tau, scale = ctx.saved_tensors
        partition, name, cshape, cdtype = ctx.meta
        k = cshape[1] if len(cshape) == 2 else 1
        with torch.autocast(tau.device.type, enabled=False):
            g = _coef_grad(grad, tau, k, partition, scale, name)
        return g.reshape(cshape).to(cdtype), None, None, None, None, None, None


def delta(block: Block, dtype, backend="torch"):
    """Differentiable (in ``block.coef``) displacement of one dense block, in ``dtype``; its shape is
    ``theta0``'s, or (``theta0`` None) the slab's block shape."""
    tau = block.tau
    shape = tau.shape[1:] if block.theta0 is None else block.theta0.shape
    name = _backend_name(backend, tau, dtype)
    return DeltaFunction.apply(block.coef, torch.Size(shape), tau, block.scale, block.partition, dtype, name)


class TangentLinearFunction(torch.autograd.Function):
    """``y_t = x0 D_W^T + D_c``: a linear layer's tangent in the direction of its own blocks, with
    ``D_W = sum_i lam_i tau_i`` (and ``D_c`` alike, or no bias term).

    Chain rule, with ``g = dL/dy_t``:

    - ``dlam_W[i, k] = <G, tau_i>`` over the elements of part k, ``G = g^T x0`` (torch backend: one
      transient block; Triton: ``kernels.linear_coef_grad``, G tile by tile in registers, never
      stored);
    - ``dlam_c[i, k] = <sum_rows g, tau_c_i>`` over part k;
    - ``dx0 = g D_W`` (only when the primal input requires a gradient: ``D_W`` is recomputed, never
      kept).

    Saved for backward: ``x0`` and the slabs; no ``D``.
    """

    @staticmethod
    def forward(ctx, x0, w_coef, b_coef, w_shape, w_tau, w_scale, w_part, b_tau, b_scale, b_part, name,
                fused_max_m):
        dtype = x0.dtype
        m = x0.shape[0]
        with torch.autocast(x0.device.type, enabled=False):
            if name == "triton" and m <= fused_max_m:
                zero = _zeros(w_shape, dtype, x0.device)
                y = _kernels().fused_linear(x0, zero, w_tau, w_coef.detach(), w_part, w_scale=w_scale,
                                            out_dtype=dtype)
            else:
                d_w = _delta_values(w_shape, w_tau, w_coef.detach(), w_part, dtype, w_scale, name)
                y = x0 @ d_w.t()
                del d_w
            if b_tau is not None:
                y = y + _delta_values((w_shape[0],), b_tau, b_coef.detach(), b_part, dtype, b_scale, name)
        ctx.save_for_backward(x0, w_coef, w_tau, w_scale, b_tau, b_scale)
        ctx.meta = (w_shape, w_part, b_part, name, None if b_coef is None else (b_coef.shape, b_coef.dtype))
        return y

    @staticmethod
    def backward(ctx, g):
        x0, w_coef, w_tau, w_scale, b_tau, b_scale = ctx.saved_tensors
        w_shape, w_part, b_part, name, bmeta = ctx.meta
        need = ctx.needs_input_grad
        dx = dwc = dbc = None
        g = g.contiguous()
        with torch.autocast(g.device.type, enabled=False):
            if need[1]:
                kw = w_coef.shape[1] if w_coef.dim() == 2 else 1
                if name == "triton":
                    dwc = _kernels().linear_coef_grad(x0, g.to(x0.dtype), w_tau, kw, w_part, w_scale=w_scale)
                else:
                    acc = TB.acc_dtype(x0.dtype, g.dtype)
                    dwc = TB.coef_grad_values(g.to(acc).t() @ x0.to(acc), w_tau, kw, w_part, w_scale)
                dwc = dwc.reshape(w_coef.shape).to(w_coef.dtype)
            if bmeta is not None and need[2]:
                kb = bmeta[0][1] if len(bmeta[0]) == 2 else 1
                dbc = _coef_grad(g.sum(0), b_tau, kb, b_part, b_scale, name).reshape(bmeta[0]).to(bmeta[1])
            if need[0]:
                d_w = _delta_values(w_shape, w_tau, w_coef.detach(), w_part, g.dtype, w_scale, name)
                dx = (g @ d_w).to(x0.dtype)
        return dx, dwc, dbc, None, None, None, None, None, None, None, None, None


def tangent_linear(x0, wblock: Block, bblock: Optional[Block] = None, backend="torch",
                   fused_max_m: Optional[int] = None):
    """``x0 D_W^T + D_c`` for a dense adapted weight ``wblock`` (``bblock`` None, absent or frozen:
    no bias displacement).

    ``x0 [..., I]`` in the compute dtype; returns ``[..., O]`` in that dtype.
    """
    w_shape, w_tau = wblock.theta0.shape, wblock.tau
    b = bblock if bblock is not None and bblock.theta0 is not None and bblock.tau is not None else Block(None)
    dtype = x0.dtype
    name = _backend_name(backend, x0, dtype)
    lead = x0.shape[:-1]
    x2 = x0.reshape(-1, x0.shape[-1])
    if fused_max_m is None:
        from ..ops.triton_backend import FUSED_MAX_M

        fused_max_m = FUSED_MAX_M if name == "triton" else 0
    y = TangentLinearFunction.apply(x2, wblock.coef, b.coef, torch.Size(w_shape), w_tau, wblock.scale,
                                    wblock.partition, b.tau, b.scale, b.partition, name, fused_max_m)
    return y.reshape(*lead, w_shape[0])


def attention_tangent(q, k, v, qt, kt, vt, mask=None, dropout_p: float = 0.0, need_weights: bool = False):
    """Scaled dot-product attention ``O = softmax(q k^T / sqrt(d) + mask) v`` with its tangent.

    ``q, k, v`` ``[B, h, T, d]`` primal values; ``qt, kt, vt`` their tangents (None: zero).
    Returns ``(O, O_t, P, P_t)`` (``P``, ``P_t`` None unless ``need_weights``). Forward-mode rule:

    - ``S_t = (q_t k^T + q k_t^T) / sqrt(d)``;
    - ``P_t = P * (S_t - sum_j P * S_t)`` (the softmax Jacobian-vector product, row by row);
    - ``O_t = P_t v + P v_t`` (with dropout: the same mask on ``P`` and ``P_t``).

    The primal runs without a graph unless one of ``q, k, v`` requires a gradient; the tangent is
    differentiable (backward keeps the primal ``P``, ``q``, ``k``, ``v``: no extra model-sized state).
    """
    scale = q.shape[-1] ** -0.5
    with torch.set_grad_enabled(torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))):
        s = (q * scale) @ k.transpose(-2, -1)
        if mask is not None:
            s = s + mask
        p = s.softmax(-1)
        keep = None
        if dropout_p > 0.0:
            keep = (torch.rand_like(p) >= dropout_p).to(p.dtype) / (1.0 - dropout_p)
        pd = p if keep is None else p * keep
        out = pd @ v
    st = None
    if qt is not None:
        st = (qt * scale) @ k.transpose(-2, -1)
    if kt is not None:
        term = (q * scale) @ kt.transpose(-2, -1)
        st = term if st is None else st + term
    ot = None
    pt = None
    if st is not None:
        pt = p * (st - (p * st).sum(-1, keepdim=True))
        ot = (pt if keep is None else pt * keep) @ v
    if vt is not None:
        term = pd @ vt
        ot = term if ot is None else ot + term
    if not need_weights:
        p = pt = None
    return out, ot, p, pt


def frozen_linear(x0, w0, b0):
    """The primal ``x0 W0^T + c0`` (no graph unless ``x0`` requires a gradient)."""
    with torch.set_grad_enabled(torch.is_grad_enabled() and x0.requires_grad):
        return F.linear(x0, w0.to(x0.dtype), None if b0 is None else b0.to(x0.dtype))
