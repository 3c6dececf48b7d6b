"""LoRA task vectors (``tau_i = B_i A_i``, rank r), never densified per task vector.

Shapes: ``A [N, r, in]``, ``B [N, out, r]``; ``coef [N]`` or ``[N, K]``. With ``A_cat = A`` viewed as
``[N r, in]``, ``B_cat`` as ``[out, N r]`` and ``lam_rep`` each coefficient repeated r times:

- composed weight: ``W = theta0 + B_cat diag(lam_rep) A_cat``;
- factored linear (cheaper while ``M (in + out) < out in``, K = 1):
  ``y = x theta0^T + ((x A_cat^T) * lam_rep) B_cat^T + c``.

Gradients come from autograd through these few matmuls; they amount to
``dlam_i = sum((dy B_i) * (x A_i^T))`` (factored) or ``<G, B_i A_i> = sum((G A_i^T) * B_i)``
(composed), with per-part sums when K > 1. Products with the coefficients run in fp32.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..blocks import Block, coef_matrix
from ..partitions import Partition
from .backend import compute_dtype
from .torch_backend import acc_dtype


def _cat(a: torch.Tensor, b: torch.Tensor, dtype):
    n, r, inn = a.shape
    out = b.shape[1]
    return a.reshape(n * r, inn).to(dtype), b.permute(1, 0, 2).reshape(out, n * r).to(dtype), r


def lora_delta(a, b, coef, partition=None, acc=None) -> torch.Tensor:
    """``sum_i coef[i, part(e)] (B_i A_i)[e]`` in ``acc`` (default fp32, float64 for float64
    factors), differentiable in ``coef``."""
    acc = acc or acc_dtype(a.dtype, coef.dtype)
    a_cat, b_cat, r = _cat(a, b, acc)
    c = coef_matrix(coef, a.shape[0]).to(acc)
    k = c.shape[1]
    if k == 1:
        return (b_cat * c[:, 0].repeat_interleave(r)) @ a_cat
    out, inn = b_cat.shape[0], a_cat.shape[1]
    allk = torch.stack([(b_cat * c[:, p].repeat_interleave(r)) @ a_cat for p in range(k)]).reshape(k, -1)
    part = (partition or Partition(k)).index(out * inn, device=a.device)
    return allk.gather(0, part[None]).reshape(out, inn)


def lora_compose(block: Block, out_dtype) -> torch.Tensor:
    """The composed block ``theta0 + B_cat diag(lam) A_cat`` in ``out_dtype`` (``block.lora = (A, B)``)."""
    theta0 = block.theta0
    # float64 when theta0 or the output is float64: float32 factors of a float64 model must not
    # round theta0 (nor, in backward, the block's gradient) to float32
    acc = acc_dtype(block.lora[0].dtype, block.coef.dtype, theta0.dtype, out_dtype)
    with torch.autocast(theta0.device.type, enabled=False):
        delta = lora_delta(*block.lora, block.coef, block.partition, acc)
        return (theta0.to(delta.dtype) + delta).to(out_dtype)


def lora_linear(x, block: Block, bias) -> torch.Tensor:
    """``y = x W^T + c`` for a LoRA-composed ``W`` (``block.lora = (A, B)``; ``bias`` already composed
    or None): factored for small M, composed once otherwise."""
    dtype = compute_dtype(x)
    w0, (a, b), coef = block.theta0, block.lora, block.coef
    out, inn = w0.shape
    m = x.numel() // max(1, x.shape[-1])
    k = coef.shape[1] if coef.dim() == 2 else 1
    bias = None if bias is None else bias.to(dtype)
    if k == 1 and m * (inn + out) < out * inn:
        a_cat, b_cat, r = _cat(a, b, dtype)
        acc = acc_dtype(dtype, coef.dtype)
        xa = F.linear(x.to(dtype), a_cat).to(acc) * coef.to(acc).repeat_interleave(r)
        return F.linear(x.to(dtype), w0.to(dtype), bias) + F.linear(xa.to(dtype), b_cat)
    return F.linear(x.to(dtype), lora_compose(block, dtype), bias)
