"""The grouped compose: every block of a :class:`~atlas_kernels.grouping.BlockGroup` composed in one
pass over the task vectors, and its coefficient gradients reduced in one pass in backward.

One autograd Function with one input per block's coefficients and one output per block's value:
its backward runs once, with every block's gradient, so the backend reduces them all together
(two kernel launches on the Triton backend) instead of one backward per block.
"""
from __future__ import annotations

import torch

from .._launches import region

__all__ = ["GroupCompose"]


class GroupCompose(torch.autograd.Function):
    """``W_b = theta0_b + sum_i coef_b[index_b(i), part_b(e)] * tau_b[i, e]`` for every entry ``b``
    of the group (``W_b`` in ``dtypes[sel_b]``), differentiable in every ``coef_b``.

    Chain rule, per entry: ``dL/dcoef_b[r, k] = sum_{e : part_b(e) = k} dL/dW_b[e] * tau_b[i, e]``
    for the held slab ``i`` of coefficient row ``r`` (0 for rows a ragged block does not hold; 0 for
    an entry whose value was not used). ``theta0`` and the slabs are frozen.
    """

    @staticmethod
    def forward(ctx, group, dtypes, *coefs):
        ctx.group = group
        ctx.set_materialize_grads(False)
        with torch.autocast(group.device.type, enabled=False), region():
            return tuple(group.backend.compose_group(group, dtypes))

    @staticmethod
    def backward(ctx, *grads):
        group = ctx.group
        with torch.autocast(group.device.type, enabled=False), region():
            return (None, None, *group.backend.coef_grad_group(group, grads))
