"""The backend protocol (:class:`Backend`) and the one compute-dtype rule (:func:`compute_dtype`).

A backend implements, per block, ``compose_values`` / ``coef_grad_values`` (plain tensors, no
autograd) and the differentiable ``compose`` / ``linear``; the grouped pass over many blocks
(``compose_group`` / ``coef_grad_group``) defaults to a loop over those per-block functions, which
the Triton backend replaces with its two-launch kernels.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F

from ..blocks import Block

__all__ = ["Backend", "compute_dtype"]


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul on ``x`` runs in: the autocast dtype where autocast is on, else ``x``'s."""
    dev = x.device.type
    if dev in ("cuda", "cpu", "xpu") and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


class Backend:
    """One way of running the ops. Subclasses set :attr:`name` and implement :meth:`compose`,
    :meth:`compose_values` and :meth:`coef_grad_values`; the rest has working defaults."""

    name = "?"

    # ------------------------------------------------------------------ one block
    def compose(self, block: Block, out_dtype) -> torch.Tensor:
        """``theta0 + sum_i coef[i, part(e)] * tau_i`` of a dense adapted block in ``out_dtype``,
        differentiable in ``block.coef``."""
        raise NotImplementedError

    def linear(self, x: torch.Tensor, wblock: Block) -> torch.Tensor:
        """``y = x W^T`` with ``W`` composed in :func:`compute_dtype` of ``x`` (no bias),
        differentiable in ``x`` and ``wblock.coef``. Default: compose, then ``F.linear`` (whose
        backward hands ``G = dy^T x`` to the compose op's backward: ``dcoef_i = <G, tau_i>``)."""
        dtype = compute_dtype(x)
        return F.linear(x.to(dtype), self.compose(wblock, dtype))

    def own_linear(self, wblock: Block, device: torch.device, fused_linear) -> bool:
        """Whether a linear layer with weight ``wblock`` runs :meth:`linear` itself instead of
        reading its weight from the grouped compose. ``fused_linear``: the patch's setting (True,
        False or ``"auto"``: this backend's measured rule)."""
        return fused_linear is True

    # ------------------------------------------------------------------ plain values (no autograd)
    def compose_values(self, theta0, tau, coef, partition, out_dtype, scale=None) -> torch.Tensor:
        raise NotImplementedError

    def coef_grad_values(self, grad, tau, k: int, partition, scale=None) -> torch.Tensor:
        """``[N, K]`` float32 (float64 for float64 inputs): ``sum_{e in part k} grad[e] * tau[i, e]``."""
        raise NotImplementedError

    # ------------------------------------------------------------------ every block of a group
    def prepare_group(self, group) -> None:
        """Called when a plan (re)builds ``group``: build any launch tables (default: none)."""
        return None

    def compose_group(self, group, dtypes: Sequence[torch.dtype]) -> List[torch.Tensor]:
        """The composed value of every entry of ``group`` (entry ``e`` in ``dtypes[e.sel]``), no
        autograd. Default: one :meth:`compose_values` per entry."""
        out = []
        for e in group.entries:
            coef = e.coef if e.index is None else e.coef.index_select(0, e.index)
            out.append(self.compose_values(e.theta0, e.tau, coef, e.partition, dtypes[e.sel], e.scale))
        return out

    def coef_grad_group(self, group, grads: Sequence[Optional[torch.Tensor]],
                        cast: bool = True) -> List[Optional[torch.Tensor]]:
        """Each entry's coefficient gradient (shaped like its ``coef``) from the gradient of its
        composed value (None: unused, no gradient), no autograd. ``cast=False`` keeps the
        accumulation dtype (float32; float64 for float64 blocks) instead of rounding to the
        coefficient's dtype: for a caller that sums partial gradients of several processes first,
        so that a float64 model's sum rounds once. Default: one :meth:`coef_grad_values` per entry."""
        out = []
        for e, g in zip(group.entries, grads):
            if g is None:
                out.append(None)
                continue
            v = self.coef_grad_values(g, e.tau, e.partition.k, e.partition, e.scale)
            if e.index is not None:
                v = torch.zeros((e.coef.shape[0], v.shape[1]), dtype=v.dtype, device=v.device).index_copy_(
                    0, e.index, v)
            v = v.reshape(e.coef.shape)
            out.append(v.to(e.coef.dtype) if cast else v)
        return out

    def __repr__(self) -> str:
        return f"<atlas_kernels backend {self.name!r}>"

    # One object per backend: copies of a patched model share it.
    def __deepcopy__(self, memo):
        return self

    def __reduce__(self):
        from . import get

        return get, (self.name,)
