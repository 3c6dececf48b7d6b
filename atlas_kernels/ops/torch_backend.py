"""The ``"torch"`` backend: plain PyTorch, but not the naive way.

Per block, one matrix product of the ``[N, numel]`` slab with the coefficients composes the block,
and one product of the block's gradient with the slab gives all N (or N x K) coefficient
gradients. No Python loop over task vectors, and nothing kept for backward beyond what the
framework's own op (``F.linear``, ``F.layer_norm``, ...) keeps for the composed block.

Slabs stored in a compact dtype (bf16, fp16, int8 with scales) are widened to fp32 a bounded chunk
of columns at a time, so coefficients are never rounded to the storage dtype and no fp32 copy of a
whole slab is ever made.
"""
from __future__ import annotations

from typing import Optional

import torch

from .._launches import region
from ..blocks import Block, coef_matrix
from ..partitions import Partition
from ..storage import scale_rows
from .backend import Backend

# Widen at most this many slab elements to fp32 at once: 64 MiB of fp32 temporaries on a GPU (few,
# large launches), 2 MiB on a CPU (the chunk stays in cache; measured: docs/PERFORMANCE.md).
_CHUNK_ELEMS = 1 << 24
_CHUNK_ELEMS_CPU = 1 << 19


def _row_width(shape) -> int:
    """Elements per scale row (the layout of :func:`atlas_kernels.storage.scale_rows`)."""
    return max(1, torch.Size(shape).numel() // scale_rows(shape))


def acc_dtype(*dtypes) -> torch.dtype:
    """Accumulation dtype: float32, or float64 when any input is float64 (reference work)."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _widen(tau2d: torch.Tensor, start: int, stop: int, scale: Optional[torch.Tensor], width: int, acc):
    """Columns ``[start, stop)`` of the flattened slab in ``acc`` (fp32), dequantized."""
    t = tau2d[:, start:stop].to(acc)
    if scale is None:
        return t
    rows = torch.arange(start, stop, device=t.device) // width
    return t * scale.to(acc)[:, rows]


def _chunks(n: int, numel: int, device: torch.device = None, widen: bool = True):
    budget = _CHUNK_ELEMS_CPU if (widen and device is not None and device.type == "cpu") else _CHUNK_ELEMS
    step = max(1, budget // max(1, n))
    if numel <= step:
        yield 0, numel
        return
    for s in range(0, numel, step):
        yield s, min(numel, s + step)


def _segments(n: int, numel: int, k: int, device=None, widen=True):
    """``(start, stop, part)`` pieces of a contiguous partition, cut at chunk boundaries too.
    Part ``p`` covers ``[ceil(p*numel/k), ceil((p+1)*numel/k))`` (= ``floor(e*k/numel) == p``)."""
    bounds = [-(-p * numel // k) for p in range(k + 1)]
    for s, e in _chunks(n, numel, device, widen):
        for p in range(k):
            lo, hi = max(s, bounds[p]), min(e, bounds[p + 1])
            if lo < hi:
                yield lo, hi, p


def _contiguous(partition: Optional[Partition], k: int) -> bool:
    return k == 1 or partition is None or partition.mode == "contiguous"


def compose_values(theta0, tau, coef, partition: Optional[Partition], out_dtype, scale=None):
    """``theta0 + sum_i coef[i, part(e)] * tau[i, e]`` in fp32, cast to ``out_dtype``. No autograd.

    Out of place, and no same-dtype ``.to()`` on the result: torch.compile of torch 2.11 traces an
    autograd Function whose forward returns an in-place-updated clone of an input, or a no-op
    ``.to()`` of its result, as if the output did not depend on ``coef``, giving exactly-zero
    coefficient gradients with no error (torch 2.13 and 2.14 are right).
    """
    n = tau.shape[0]
    numel = theta0.numel()
    acc = acc_dtype(theta0.dtype, tau.dtype, coef.dtype)
    c = coef_matrix(coef, n).to(acc)
    k = c.shape[1]
    tau2d = tau.reshape(n, numel)
    width = _row_width(theta0.shape)
    base = theta0.reshape(-1).to(acc)
    fast = tau.dtype == acc and scale is None
    pieces = []
    if _contiguous(partition, k):
        # Contiguous parts are slices: one slab product per piece, no index tensors.
        for s, e, p in _segments(n, numel, k, tau.device, not fast):
            t = tau2d[:, s:e] if fast else _widen(tau2d, s, e, scale, width, acc)
            # addmv on the transposed view (faster than `c @ t` on CPU BLAS: docs/PERFORMANCE.md)
            pieces.append(torch.addmv(base[s:e], t.t(), c[:, p]))
    else:
        part = partition.index(numel, device=theta0.device)
        for s, e in _chunks(n, numel, tau.device, not fast):
            t = tau2d[:, s:e] if fast else _widen(tau2d, s, e, scale, width, acc)
            # [K, chunk]: every part's composition, then each element picks its own part.
            allk = c.t() @ t
            pieces.append(base[s:e] + allk.gather(0, part[None, s:e]).squeeze(0))
    if not pieces:  # an empty block
        out = base.clone()
    else:
        out = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
    out = out.reshape(theta0.shape)
    # No same-dtype `.to()` either: torch 2.11's tracing mishandles that no-op alias alike.
    return out if out.dtype == out_dtype else out.to(out_dtype)


def coef_grad_values(grad, tau, k: int, partition: Optional[Partition], scale=None):
    """``dcoef[i, k] = sum_{e in part k} grad[e] * tau[i, e]`` in fp32: shape ``[N, K]``."""
    n = tau.shape[0]
    numel = grad.numel()
    acc = acc_dtype(grad.dtype, tau.dtype)
    g = grad.reshape(-1).to(acc)
    tau2d = tau.reshape(n, numel)
    width = _row_width(grad.shape)
    out = torch.zeros(n, k, dtype=acc, device=grad.device)
    fast = tau.dtype == acc and scale is None
    if _contiguous(partition, k):
        for s, e, p in _segments(n, numel, k, tau.device, not fast):
            t = tau2d[:, s:e] if fast else _widen(tau2d, s, e, scale, width, acc)
            out[:, p].addmv_(t, g[s:e])
        return out
    part = partition.index(numel, device=grad.device)
    for s, e in _chunks(n, numel, tau.device, not fast):
        t = tau2d[:, s:e] if fast else _widen(tau2d, s, e, scale, width, acc)
        # Scatter the gradient into K masked rows, then one product with the slab.
        gk = torch.zeros(k, e - s, dtype=acc, device=grad.device)
        gk.scatter_(0, part[None, s:e], g[None, s:e])
        out += t @ gk.t()
    return out


class ComposeFunction(torch.autograd.Function):
    """``W = theta0 + sum_i coef[i, part(e)] * tau_i`` (differentiable in ``coef`` only).

    Chain rule: ``dL/dcoef[i, k] = sum_{e : part(e) = k} dL/dW[e] * tau[i, e]``, i.e. one product
    of the flattened block gradient with the ``[N, numel]`` slab (per part when K > 1).
    """

    @staticmethod
    def forward(ctx, coef, theta0, tau, scale, partition, out_dtype):
        ctx.save_for_backward(tau, scale)
        ctx.partition = partition
        ctx.coef_shape, ctx.coef_dtype = coef.shape, coef.dtype
        with torch.autocast(theta0.device.type, enabled=False):
            return compose_values(theta0, tau, coef.detach(), partition, out_dtype, scale)

    @staticmethod
    def backward(ctx, grad_w):
        tau, scale = ctx.saved_tensors
        k = ctx.coef_shape[1] if len(ctx.coef_shape) == 2 else 1
        with torch.autocast(tau.device.type, enabled=False), region():
            g = coef_grad_values(grad_w, tau, k, ctx.partition, scale)
        return g.reshape(ctx.coef_shape).to(ctx.coef_dtype), None, None, None, None, None


def dense(block: Block, what: str = "block") -> Block:
    """``block`` checked to be dense or frozen: LoRA blocks take :mod:`.lora` (through
    :func:`atlas_kernels.ops.compose` / :func:`atlas_kernels.ops.linear`), never a dense backend."""
    if block.lora is not None:
        raise ValueError(f"{what} holds LoRA factors; a dense backend needs a [N, *shape] slab "
                         f"(call atlas_kernels.ops.compose/linear, which route LoRA blocks)")
    return block


class TorchBackend(Backend):
    """Plain PyTorch: one slab product per block to compose (:func:`compose_values`), one per block
    to reduce the coefficient gradient (:func:`coef_grad_values`); float64 inputs accumulate in
    float64 (the backend every float64 block takes)."""

    name = "torch"

    def compose(self, block: Block, out_dtype):
        b = dense(block)
        return ComposeFunction.apply(b.coef, b.theta0, b.tau, b.scale, b.partition, out_dtype)

    def compose_values(self, theta0, tau, coef, partition, out_dtype, scale=None):
        return compose_values(theta0, tau, coef, partition, out_dtype, scale)

    def coef_grad_values(self, grad, tau, k, partition, scale=None):
        return coef_grad_values(grad, tau, k, partition, scale)

    def prepare_group(self, group):
        for e in group.entries:
            prepare_entry(e)

    def compose_group(self, group, dtypes):
        return [compose_entry(e, dtypes[e.sel]) for e in group.entries]

    def coef_grad_group(self, group, grads, cast=True):
        return [coef_grad_entry(e, g, cast) for e, g in zip(group.entries, grads)]


def prepare_entry(e) -> None:
    """The common case (K = 1, unscaled fp32 slabs, fp32 theta0, every task vector held): views
    for one addmv (compose) and one mv (gradient), made once; ``e.fast`` None otherwise."""
    e.fast = None
    if (e.partition.k == 1 and e.scale is None and e.index is None
            and e.tau.dtype == e.theta0.dtype == e.coef.dtype == torch.float32):
        t2 = e.tau.view(e.tau.shape[0], -1)
        e.fast = (e.theta0.view(-1), t2.t(), t2, len(e.shape) != 1)


def compose_entry(e, dtype):
    """One grouped block's value in ``dtype`` (no autograd): one addmv in the common case."""
    fast = e.fast
    if fast is not None and dtype == fast[0].dtype:
        w = torch.addmv(fast[0], fast[1], e.coef)
        return w.view(e.shape) if fast[3] else w
    coef = e.coef if e.index is None else e.coef.index_select(0, e.index)
    return compose_values(e.theta0, e.tau, coef, e.partition, dtype, e.scale)


def coef_grad_entry(e, g, cast=True):
    """One grouped block's coefficient gradient, shaped like its coefficients (None: unused), in
    the coefficients' dtype (``cast=False``: the accumulation dtype)."""
    if g is None:
        return None
    fast = e.fast
    if fast is not None and g.dtype == fast[0].dtype:
        return torch.mv(fast[2], g.reshape(-1) if fast[3] else g)
    v = coef_grad_values(g, e.tau, e.partition.k, e.partition, e.scale)
    if e.index is not None:
        v = torch.zeros((e.coef.shape[0], v.shape[1]), dtype=v.dtype, device=v.device).index_copy_(0, e.index, v)
    v = v.reshape(e.coef.shape)
    return v.to(e.coef.dtype) if cast else v


BACKEND = TorchBackend()
