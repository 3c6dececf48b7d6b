"""The ``"triton"`` backend: autograd and ``torch.library`` wiring of :mod:`atlas_kernels.kernels`.

Same signatures as :mod:`.torch_backend`:

- ``compose(block, out_dtype)``
- ``linear(x, wblock, bblock=None, fused_max_m=None)``

plus ``compose_packed(theta0_flat, tau_flat, coef_flat, layout, out_dtype, scale_flat=None)`` for
many small blocks in one launch (see :func:`atlas_kernels.kernels.make_packed_layout`).

One autograd wiring per op (the shape of flash-attention's interface): the kernels are registered
as custom ops in the ``atlas_kernels`` namespace (``atlas_kernels::triton_*``, fake implementations
for tracing), and one ``torch.autograd.Function`` per op sits on top. Its forward and backward call
:func:`_route`: the custom op while ``torch.compile`` traces (``torch.compiler.is_compiling()``, or
always with ``USE_CUSTOM_OPS=True``), so ``fullgraph=True`` traces through opaque ops; otherwise the
implementation directly (a custom op costs ~15 us of dispatch per call, which matters at ~150
blocks per step). The forward custom ops carry the same Function's ``setup_context`` and
``backward`` (``register_autograd``), so a direct call of ``torch.ops.atlas_kernels.triton_*`` is
differentiable by the very same rule.

Linear dispatch on the row count ``M`` (all leading dims of x flattened):

- ``M <= FUSED_MAX_M``: the fused GEMMs build each W tile from w0 and the N task-vector tiles while
  streaming (``kernels.fused_linear`` / ``kernels.fused_linear_dx``); W never exists in memory.
- otherwise: W is composed once (``kernels.compose``, in the compute dtype) and kept for backward;
  cuBLAS does ``y = x W^T + c`` and ``dx = dy W``.

Coefficient gradients never form a dense G: ``kernels.linear_coef_grad`` for the weight, and
``kernels.coef_grad`` on ``sum_rows dy`` for the bias.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .. import kernels
from ..blocks import Block, coef_matrix
from ..kernels._common import as_partition
from ..kernels._compose import PackedLayout
from ..partitions import Partition
from .torch_backend import compute_dtype, dense

__all__ = ["compose", "linear", "compose_packed", "compute_dtype", "FUSED_MAX_M", "USE_CUSTOM_OPS"]

# Rows (M = prod of x's leading dims) at or below which `linear` uses the fused GEMMs; set from the
# byte model, not yet measured (docs/PERFORMANCE.md, dispatch). Override per call with ``fused_max_m=``.
FUSED_MAX_M = 64

# "auto": custom ops only while torch.compile traces; True: always; False: never.
USE_CUSTOM_OPS = "auto"


def _use_ops() -> bool:
    if USE_CUSTOM_OPS == "auto":
        return torch.compiler.is_compiling()
    return bool(USE_CUSTOM_OPS)


def _route(op, impl, ctx=None):
    """``op`` (the registered custom op) while torch.compile traces, else ``impl`` (no dispatcher).
    In a backward (``ctx``): the route its forward took, so a graph traced through the custom ops
    (torch.compile, ``opcheck``, a direct ``torch.ops`` call) stays on them."""
    via_ops = _use_ops() if ctx is None else ctx.via_ops
    return op if via_ops else impl


def _part(p: Partition) -> Tuple[int, str, int]:
    return p.k, p.mode, p.key


def _no_autocast(device: torch.device):
    return torch.autocast(device.type, enabled=False)


# ------------------------------------------------------------------------------------------------
# implementations (plain tensors in, plain tensors out; no autograd)
# ------------------------------------------------------------------------------------------------
def _compose_impl(theta0, tau, coef, k, mode, key, out_dtype, scale):
    return kernels.compose(theta0, tau, coef, Partition(k, mode, key), scale=scale, out_dtype=out_dtype)


def _coef_grad_impl(grad, tau, k, mode, key, scale):
    return kernels.coef_grad(grad, tau, k, Partition(k, mode, key), scale=scale)


def _bias(b0, b_tau, b_coef, bk, bmode, bkey, b_scale, dtype):
    if b0 is None:
        return None
    if b_tau is None:
        return b0.to(dtype)
    return kernels.compose(b0, b_tau, b_coef, Partition(bk, bmode, bkey), scale=b_scale, out_dtype=dtype)


def _linear_fwd_impl(x, w0, w_tau, w_coef, wk, wmode, wkey, b0, b_tau, b_coef, bk, bmode, bkey,
                     w_scale, b_scale, fused):
    """``(y, w_saved)``: ``y = x W^T + c`` in x's dtype; ``w_saved`` is the composed W kept for
    backward on the compose path, an empty tensor otherwise."""
    dtype = x.dtype
    with _no_autocast(x.device):
        b = _bias(b0, b_tau, b_coef, bk, bmode, bkey, b_scale, dtype)
        empty = x.new_empty(0)
        if w_tau is None:
            return F.linear(x, w0.to(dtype), b), empty
        if fused:
            y = kernels.fused_linear(x, w0, w_tau, w_coef, Partition(wk, wmode, wkey), bias=b, w_scale=w_scale,
                               out_dtype=dtype)
            return y, empty
        w = kernels.compose(w0, w_tau, w_coef, Partition(wk, wmode, wkey), scale=w_scale, out_dtype=dtype)
        return F.linear(x, w, b), w


def _linear_dx_impl(dy, w0, w_tau, w_coef, wk, wmode, wkey, w_scale, w_saved, fused):
    """``dx = dy W`` in dy's dtype."""
    dtype = dy.dtype
    with _no_autocast(dy.device):
        if w_tau is None:
            return dy @ w0.to(dtype)
        if fused:
            return kernels.fused_linear_dx(dy, w0, w_tau, w_coef, Partition(wk, wmode, wkey), w_scale=w_scale,
                                     out_dtype=dtype)
        return dy @ w_saved


def _linear_coef_grad_impl(x, dy, w_tau, wk, wmode, wkey, w_scale):
    return kernels.linear_coef_grad(x, dy, w_tau, wk, Partition(wk, wmode, wkey), w_scale=w_scale)


def _layout(table, tile_map, block, kmax, total_numel, total_cols, total_rows) -> PackedLayout:
    return PackedLayout(table, tile_map, block, kmax, total_numel, total_cols, total_rows, [], [])


def _compose_packed_impl(theta0_flat, tau_flat, coef_flat, table, tile_map, block, kmax, total_cols,
                         total_rows, out_dtype, scale_flat):
    lay = _layout(table, tile_map, block, kmax, theta0_flat.numel(), total_cols, total_rows)
    return kernels.compose_packed(theta0_flat, tau_flat, coef_flat, lay, scale_flat=scale_flat, out_dtype=out_dtype)


def _coef_grad_packed_impl(grad_flat, tau_flat, table, tile_map, block, kmax, total_cols, total_rows, scale_flat):
    lay = _layout(table, tile_map, block, kmax, grad_flat.numel(), total_cols, total_rows)
    return kernels.coef_grad_packed(grad_flat, tau_flat, lay, scale_flat=scale_flat)


# ------------------------------------------------------------------------------------------------
# custom ops: the kernel boundary (tensors and scalars only; fake implementations for tracing)
# ------------------------------------------------------------------------------------------------
_NS = "atlas_kernels"
Tensor = torch.Tensor
OptTensor = Optional[torch.Tensor]


@torch.library.custom_op(f"{_NS}::triton_compose", mutates_args=())
def _compose_op(theta0: Tensor, tau: Tensor, coef: Tensor, k: int, mode: str, key: int,
                out_dtype: torch.dtype, scale: OptTensor) -> Tensor:
    return _compose_impl(theta0, tau, coef, k, mode, key, out_dtype, scale)


@_compose_op.register_fake
def _(theta0, tau, coef, k, mode, key, out_dtype, scale):
    return theta0.new_empty(theta0.shape, dtype=out_dtype)


@torch.library.custom_op(f"{_NS}::triton_coef_grad", mutates_args=())
def _coef_grad_op(grad: Tensor, tau: Tensor, k: int, mode: str, key: int, scale: OptTensor) -> Tensor:
    return _coef_grad_impl(grad, tau, k, mode, key, scale)


@_coef_grad_op.register_fake
def _(grad, tau, k, mode, key, scale):
    return grad.new_empty((tau.shape[0], k), dtype=torch.float32)


@torch.library.custom_op(f"{_NS}::triton_linear", mutates_args=())
def _linear_op(x: Tensor, w0: Tensor, w_tau: OptTensor, w_coef: OptTensor, wk: int, wmode: str, wkey: int,
               b0: OptTensor, b_tau: OptTensor, b_coef: OptTensor, bk: int, bmode: str, bkey: int,
               w_scale: OptTensor, b_scale: OptTensor, fused: bool) -> Tuple[Tensor, Tensor]:
    return _linear_fwd_impl(x, w0, w_tau, w_coef, wk, wmode, wkey, b0, b_tau, b_coef, bk, bmode, bkey,
                            w_scale, b_scale, fused)


@_linear_op.register_fake
def _(x, w0, w_tau, w_coef, wk, wmode, wkey, b0, b_tau, b_coef, bk, bmode, bkey, w_scale, b_scale, fused):
    y = x.new_empty((x.shape[0], w0.shape[0]))
    w = x.new_empty(w0.shape if (w_tau is not None and not fused) else (0,))
    return y, w


@torch.library.custom_op(f"{_NS}::triton_linear_dx", mutates_args=())
def _linear_dx_op(dy: Tensor, w0: Tensor, w_tau: OptTensor, w_coef: OptTensor, wk: int, wmode: str, wkey: int,
                  w_scale: OptTensor, w_saved: Tensor, fused: bool) -> Tensor:
    return _linear_dx_impl(dy, w0, w_tau, w_coef, wk, wmode, wkey, w_scale, w_saved, fused)


@_linear_dx_op.register_fake
def _(dy, w0, w_tau, w_coef, wk, wmode, wkey, w_scale, w_saved, fused):
    return dy.new_empty((dy.shape[0], w0.shape[1]))


@torch.library.custom_op(f"{_NS}::triton_linear_coef_grad", mutates_args=())
def _linear_coef_grad_op(x: Tensor, dy: Tensor, w_tau: Tensor, wk: int, wmode: str, wkey: int,
                         w_scale: OptTensor) -> Tensor:
    return _linear_coef_grad_impl(x, dy, w_tau, wk, wmode, wkey, w_scale)


@_linear_coef_grad_op.register_fake
def _(x, dy, w_tau, wk, wmode, wkey, w_scale):
    return x.new_empty((w_tau.shape[0], wk), dtype=torch.float32)


@torch.library.custom_op(f"{_NS}::triton_compose_packed", mutates_args=())
def _compose_packed_op(theta0_flat: Tensor, tau_flat: Tensor, coef_flat: Tensor, table: Tensor, tile_map: Tensor,
                       block: int, kmax: int, total_cols: int, total_rows: int, out_dtype: torch.dtype,
                       scale_flat: OptTensor) -> Tensor:
    return _compose_packed_impl(theta0_flat, tau_flat, coef_flat, table, tile_map, block, kmax, total_cols,
                                total_rows, out_dtype, scale_flat)


@_compose_packed_op.register_fake
def _(theta0_flat, tau_flat, coef_flat, table, tile_map, block, kmax, total_cols, total_rows, out_dtype, scale_flat):
    return theta0_flat.new_empty(theta0_flat.shape, dtype=out_dtype)


@torch.library.custom_op(f"{_NS}::triton_coef_grad_packed", mutates_args=())
def _coef_grad_packed_op(grad_flat: Tensor, tau_flat: Tensor, table: Tensor, tile_map: Tensor, block: int,
                         kmax: int, total_cols: int, total_rows: int, scale_flat: OptTensor) -> Tensor:
    return _coef_grad_packed_impl(grad_flat, tau_flat, table, tile_map, block, kmax, total_cols, total_rows,
                                  scale_flat)


@_coef_grad_packed_op.register_fake
def _(grad_flat, tau_flat, table, tile_map, block, kmax, total_cols, total_rows, scale_flat):
    return grad_flat.new_empty((tau_flat.shape[0], total_cols), dtype=torch.float32)


# ------------------------------------------------------------------------------------------------
# one autograd Function per op (inputs in the custom op's schema order). forward(ctx, ...) with the
# saving in `save`, not a `setup_context`: torch binds every apply() of a Function that defines one
# with inspect.signature, which costs more than the dispatcher this eager path avoids. `save` is
# also the setup_context of the op's register_autograd.
# ------------------------------------------------------------------------------------------------
def _grads(n_inputs: int, at: dict) -> tuple:
    """A backward's return value: ``at[pos]``, the gradient of input ``pos``, and None elsewhere."""
    return tuple(at.get(pos) for pos in range(n_inputs))


class ComposeFunction(torch.autograd.Function):
    """``W = theta0 + sum_i coef[i, part(e)] * tau_i`` (differentiable in ``coef`` only).

    Chain rule: ``dL/dcoef[i, k] = sum_{e : part(e) = k} dL/dW[e] * tau[i, e]`` (``kernels.coef_grad``:
    one pass over the slab, deterministic).
    """

    @staticmethod
    def forward(ctx, *inputs):
        out = _route(_compose_op, _compose_impl)(*inputs)
        ComposeFunction.save(ctx, inputs, out)
        return out

    @staticmethod
    def save(ctx, inputs, output):
        theta0, tau, coef, k, mode, key, out_dtype, scale = inputs
        ctx.save_for_backward(tau, scale)
        ctx.meta = (k, mode, key)
        ctx.via_ops = _use_ops()

    @staticmethod
    def backward(ctx, grad_w):
        tau, scale = ctx.saved_tensors
        g = _route(_coef_grad_op, _coef_grad_impl, ctx)(grad_w.contiguous(), tau, *ctx.meta, scale)
        return _grads(8, {2: g})


class LinearFunction(torch.autograd.Function):
    """``y = x W^T + c`` with ``W = w0 + sum_i lam_W[i, part] tau_i`` and ``c = b0 + sum_i lam_c[i, part] tau_c_i``.

    Outputs ``(y, w_saved)``: ``w_saved`` is the composed W kept for backward on the compose path
    (an empty tensor on the fused path); it gets no gradient. Chain rule (x, dy are ``[M, I]``, ``[M, O]``):

    - ``dx = dy W``   (fused: W tiles rebuilt on the fly; else the W composed in forward);
    - ``G = dy^T x``  (never stored: each tile lives in registers of ``kernels.linear_coef_grad``);
    - ``dlam_W[i, k] = <G, tau_i>`` over the elements of part k;
    - ``dlam_c[i, k] = <sum_rows dy, tau_c_i>`` over the elements of part k.
    """

    @staticmethod
    def forward(ctx, *inputs):
        out = _route(_linear_op, _linear_fwd_impl)(*inputs)
        LinearFunction.save(ctx, inputs, out)
        return out

    @staticmethod
    def save(ctx, inputs, output):
        (x, w0, w_tau, w_coef, wk, wmode, wkey, b0, b_tau, b_coef, bk, bmode, bkey, w_scale, b_scale, fused) = inputs
        ctx.save_for_backward(x, w0, w_tau, w_coef, w_scale, b_tau, b_scale, output[1])
        ctx.meta = (wk, wmode, wkey, bk, bmode, bkey, fused)
        ctx.via_ops = _use_ops()

    @staticmethod
    def backward(ctx, dy, _dw_saved):
        x, w0, w_tau, w_coef, w_scale, b_tau, b_scale, w_saved = ctx.saved_tensors
        wk, wmode, wkey, bk, bmode, bkey, fused = ctx.meta
        need = ctx.needs_input_grad
        dy = dy.contiguous()
        dx = dwc = dbc = None
        if need[0]:
            dx = _route(_linear_dx_op, _linear_dx_impl, ctx)(dy, w0, w_tau, w_coef, wk, wmode, wkey, w_scale, w_saved,
                                                        fused)
        if need[3] and w_tau is not None:
            dwc = _route(_linear_coef_grad_op, _linear_coef_grad_impl, ctx)(x, dy, w_tau, wk, wmode, wkey, w_scale)
        if need[9] and b_tau is not None:
            dbc = _route(_coef_grad_op, _coef_grad_impl, ctx)(dy.sum(0, dtype=torch.float32), b_tau, bk, bmode, bkey,
                                                         b_scale)
        return _grads(16, {0: dx, 3: dwc, 9: dbc})


class ComposePackedFunction(torch.autograd.Function):
    """All small blocks of a :class:`~atlas_kernels.kernels.PackedLayout` composed in one launch.

    Chain rule, per block b: ``dL/dcoef_flat[i, col_b + k] = sum_{e in b, part k} dL/dflat[e] * tau_flat[i, e]``
    (``kernels.coef_grad_packed``: one launch plus a fixed-order per-segment reduction).
    """

    @staticmethod
    def forward(ctx, *inputs):
        out = _route(_compose_packed_op, _compose_packed_impl)(*inputs)
        ComposePackedFunction.save(ctx, inputs, out)
        return out

    @staticmethod
    def save(ctx, inputs, output):
        (theta0_flat, tau_flat, coef_flat, table, tile_map, block, kmax, total_cols, total_rows, out_dtype,
         scale_flat) = inputs
        ctx.save_for_backward(tau_flat, table, tile_map, scale_flat)
        ctx.meta = (block, kmax, total_cols, total_rows)
        ctx.via_ops = _use_ops()

    @staticmethod
    def backward(ctx, grad):
        tau_flat, table, tile_map, scale_flat = ctx.saved_tensors
        g = _route(_coef_grad_packed_op, _coef_grad_packed_impl, ctx)(grad.contiguous(), tau_flat, table, tile_map,
                                                                 *ctx.meta, scale_flat)
        return _grads(11, {2: g})


def _register_autograd(op, fn):
    """A call of the forward custom ``op`` itself is differentiable by ``fn``'s own rule (one chain
    rule per op), its backward on the custom ops too."""

    def setup_context(ctx, inputs, output):
        fn.save(ctx, inputs, output)
        ctx.via_ops = True

    op.register_autograd(fn.backward, setup_context=setup_context)


_register_autograd(_compose_op, ComposeFunction)
_register_autograd(_linear_op, LinearFunction)
_register_autograd(_compose_packed_op, ComposePackedFunction)


# ------------------------------------------------------------------------------------------------
# public API
# ------------------------------------------------------------------------------------------------
_FROZEN = (1, "contiguous", 0)


def _flat(block: Block):
    """``(coef [N, K] fp32, (k, mode, key))`` of an adapted dense block: what the schema takes."""
    c = coef_matrix(block.coef, block.tau.shape[0]).float()
    p = as_partition(block.partition, c.shape[1])
    return c, (p.k, p.mode, p.key)


def compose(block: Block, out_dtype):
    """Differentiable (in ``block.coef``) ``theta0 + sum_i coef[i, part(e)] * tau_i``; see :class:`ComposeFunction`."""
    b = dense(block)
    c, part = _flat(b)
    return ComposeFunction.apply(b.theta0, b.tau, c, *part, out_dtype or b.theta0.dtype, b.scale)


def compose_packed(theta0_flat, tau_flat, coef_flat, layout: PackedLayout, out_dtype, scale_flat=None):
    """Differentiable (in ``coef_flat``) one-launch composition of many small blocks: flat ``[P]``
    (split with ``layout.views``). ``coef_flat`` is ``[N, layout.total_cols]``; see
    :class:`ComposePackedFunction`."""
    n = tau_flat.shape[0]
    c = coef_flat.reshape(n, layout.total_cols).float()
    return ComposePackedFunction.apply(theta0_flat, tau_flat, c, layout.table, layout.tile_map, layout.block,
                                       layout.kmax, layout.total_cols, layout.total_rows,
                                       out_dtype or theta0_flat.dtype, scale_flat)


def linear(x, wblock: Block, bblock: Optional[Block] = None, fused_max_m: Optional[int] = None):
    """``y = x W^T + c`` with composed ``W`` and ``c`` (see :class:`LinearFunction` for the chain rule).

    x ``[..., I]``; runs in :func:`compute_dtype` (x's dtype, or the autocast dtype) and returns that
    dtype. A frozen block (no ``tau``) stays at theta0; ``bblock`` None or ``Block(None)``: no bias.
    ``fused_max_m`` overrides :data:`FUSED_MAX_M` for this call.
    """
    w = dense(wblock, "the weight")
    b = Block(None) if bblock is None else dense(bblock, "the bias")
    dtype = compute_dtype(x)
    lead, i_feat = x.shape[:-1], x.shape[-1]
    x2 = x.to(dtype).reshape(-1, i_feat)
    m = x2.shape[0]
    wc = bc = None
    wmeta = bmeta = _FROZEN
    if w.tau is not None:
        wc, wmeta = _flat(w)
    b_tau = b.tau if b.theta0 is not None else None
    if b_tau is not None:
        bc, bmeta = _flat(b)
    thr = FUSED_MAX_M if fused_max_m is None else fused_max_m
    fused = w.tau is not None and m <= thr
    y, _ = LinearFunction.apply(x2, w.theta0, w.tau, wc, *wmeta, b.theta0, b_tau, bc, *bmeta, w.scale,
                                b.scale if b_tau is not None else None, fused)
    return y.reshape(*lead, w.theta0.shape[0])
