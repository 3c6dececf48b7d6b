"""The specification, in plain PyTorch: every backend is tested against these functions.

Written for clarity, not speed, and usable in float64. Shapes:

- ``theta0``: a block, any shape ``S`` (a weight, a bias, an embedding, ...);
- ``tau``: the block's task-vector slab, ``[N, *S]`` (task vector i is ``tau[i]``);
- ``coef``: the coefficients, ``[N]`` (one per task vector) or ``[N, K]`` (aTLAS x K, with a
  :class:`~atlas_kernels.partitions.Partition` saying which part each element belongs to);
- ``scale`` (compact storage only): ``None``, or ``[N, R]`` with ``R = S[0]`` for blocks of 2 or
  more dimensions and ``R = 1`` for 1-D blocks; the stored slab is then ``tau_q`` and the task vector
  is ``tau_q * scale`` per row (see :func:`dequantize`).

The math (per block ``b``):

    theta_b[e] = theta0_b[e] + sum_i coef[i, part(e)] * tau[i, e]
    dL/dcoef[i, k] = sum_{e : part(e) = k} dL/dtheta_b[e] * tau[i, e]

and for a linear layer ``y = x W^T + c`` the would-be weight gradient is ``G = dy^T x``, so
``dL/dcoef_W[i, k] = <G, tau_i>`` restricted to part ``k``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .partitions import Partition
from .storage import scale_rows

__all__ = [
    "dequantize",
    "compose",
    "coef_grad",
    "linear",
    "linear_coef_grads",
    "naive_compose",
]


def _coef2d(coef: torch.Tensor) -> torch.Tensor:
    return coef if coef.dim() == 2 else coef[:, None]


def dequantize(tau: torch.Tensor, scale: Optional[torch.Tensor] = None, dtype=torch.float64) -> torch.Tensor:
    """The task-vector slab as real numbers: ``tau`` cast to ``dtype``, times ``scale`` per row."""
    t = tau.to(dtype)
    if scale is None:
        return t
    n = t.shape[0]
    rows = scale_rows(t.shape[1:])
    return (t.reshape(n, rows, -1) * scale.to(dtype).reshape(n, rows, 1)).reshape(t.shape)


def compose(
    theta0: torch.Tensor,
    tau: torch.Tensor,
    coef: torch.Tensor,
    partition: Optional[Partition] = None,
    scale: Optional[torch.Tensor] = None,
    dtype=torch.float64,
) -> torch.Tensor:
    """``theta0 + sum_i coef[i, part(e)] * tau[i, e]``, computed in ``dtype``."""
    n = tau.shape[0]
    c = _coef2d(coef).to(dtype)
    k = c.shape[1]
    part = (partition or Partition(k)).index(theta0.numel(), device=theta0.device)
    if int(part.max()) >= k:
        raise ValueError("partition has more parts than coefficient columns")
    t = dequantize(tau, scale, dtype).reshape(n, -1)
    per_elem = c[:, part]  # [N, numel]
    return theta0.to(dtype) + (per_elem * t).sum(0).reshape(theta0.shape)


def coef_grad(
    grad_theta: torch.Tensor,
    tau: torch.Tensor,
    k: int = 1,
    partition: Optional[Partition] = None,
    scale: Optional[torch.Tensor] = None,
    dtype=torch.float64,
) -> torch.Tensor:
    """``dL/dcoef[i, k] = sum over part k of grad_theta * tau_i``: shape ``[N, K]``."""
    n = tau.shape[0]
    part = (partition or Partition(k)).index(grad_theta.numel(), device=grad_theta.device)
    prod = dequantize(tau, scale, dtype).reshape(n, -1) * grad_theta.to(dtype).reshape(1, -1)
    out = torch.zeros(n, k, dtype=dtype, device=grad_theta.device)
    return out.index_add_(1, part, prod)


def linear(
    x: torch.Tensor,
    w0: torch.Tensor,
    w_tau: Optional[torch.Tensor],
    w_coef: Optional[torch.Tensor],
    b0: Optional[torch.Tensor] = None,
    b_tau: Optional[torch.Tensor] = None,
    b_coef: Optional[torch.Tensor] = None,
    w_partition: Optional[Partition] = None,
    b_partition: Optional[Partition] = None,
    dtype=torch.float64,
) -> torch.Tensor:
    """``y = x W^T + c`` with the composed weight and bias (a block without a slab stays at theta0)."""
    w = w0.to(dtype) if w_tau is None else compose(w0, w_tau, w_coef, w_partition, dtype=dtype)
    if b0 is None:
        b = None
    else:
        b = b0.to(dtype) if b_tau is None else compose(b0, b_tau, b_coef, b_partition, dtype=dtype)
    return F.linear(x.to(dtype), w, b)


def linear_coef_grads(
    x: torch.Tensor,
    dy: torch.Tensor,
    w_tau: torch.Tensor,
    k: int = 1,
    w_partition: Optional[Partition] = None,
    b_tau: Optional[torch.Tensor] = None,
    b_k: int = 1,
    b_partition: Optional[Partition] = None,
    dtype=torch.float64,
):
    """Coefficient gradients of a composed linear layer: ``(dcoef_W, dcoef_b or None)``.

    ``G = dy^T x`` over all leading dimensions; ``dcoef_W = <G, tau_i>`` per part;
    ``dcoef_b = <sum_rows dy, tau_i(bias)>`` per part.
    """
    x2 = x.reshape(-1, x.shape[-1]).to(dtype)
    dy2 = dy.reshape(-1, dy.shape[-1]).to(dtype)
    g = dy2.t() @ x2
    gw = coef_grad(g, w_tau, k, w_partition, dtype=dtype)
    gb = None if b_tau is None else coef_grad(dy2.sum(0), b_tau, b_k, b_partition, dtype=dtype)
    return gw, gb


def naive_compose(theta0: torch.Tensor, taus: Sequence[torch.Tensor], coefs: Sequence[torch.Tensor]) -> torch.Tensor:
    """The paper's way, for the naive baseline: ``sum([tau_i * c_i for i]) + theta0``.

    N multiplies and N adds, each a full pass over a block-sized tensor; kept only as the baseline
    that the benchmark measures against.
    """
    return sum([t * c for t, c in zip(taus, coefs)]) + theta0
