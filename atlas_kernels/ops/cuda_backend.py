"""The ``"cuda"`` backend: the compiled extension ``atlas_kernels._C`` (sources in ``csrc/``).

The name is historical: the extension has CPU kernels (always built) and CUDA kernels (built when
``CUDA_HOME`` is set), and the dispatcher runs the ones matching the tensors' device. Same
signatures as :mod:`.torch_backend` and :mod:`.triton_backend`:

- ``compose(block, out_dtype)``
- ``linear(x, wblock, bblock=None)``
- ``compose_packed(theta0_flat, tau_flat, coef_flat, layout, out_dtype, scale_flat=None)`` (the
  :class:`~atlas_kernels.kernels.PackedLayout` table of the Triton kernels, for ``SmallBlockGroup``)

The ops are ``torch.ops.atlas_kernels_ext.*`` (schemas in ``csrc/README.md``), registered in C++
with CPU, CUDA and Meta kernels; their autograd formulas are registered here with
``torch.library.register_autograd``, so eager mode and ``torch.compile(fullgraph=True)`` run the very
same ops. Importing this module without the built extension raises ImportError, which
:func:`atlas_kernels.ops._module` turns into an error saying how to build it.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..blocks import Block, coef_matrix
from ..partitions import Partition
from . import torch_backend
from .torch_backend import compute_dtype, dense

try:
    from .. import _C  # noqa: F401  (loading the library registers torch.ops.atlas_kernels_ext)
except ImportError as exc:  # not built: plain `pip install -e .`
    raise ImportError(f"atlas_kernels._C (the compiled extension) is not built: {exc}") from exc

__all__ = ["compose", "linear", "compose_packed", "compute_dtype", "has_device_kernels"]

_ops = torch.ops.atlas_kernels_ext
_MODE = {"contiguous": 1, "hash": 2}
BUILD_HINT = ("rebuild the extension with its CUDA kernels: "
              "CUDA_HOME=/usr/local/cuda TORCH_CUDA_ARCH_LIST=\"8.0;9.0\" "
              "ATLAS_KERNELS_BUILD_EXT=1 pip install -e . --no-build-isolation "
              "(or python setup.py build_ext --inplace)")


# Device types the built extension has kernels for (fixed once loaded; a constant for torch.compile).
_DEVICE_TYPES = frozenset(dt for dt, key in (("cpu", "CPU"), ("cuda", "CUDA"), ("meta", "Meta"))
                          if torch._C._dispatch_has_kernel_for_dispatch_key("atlas_kernels_ext::compose", key))


def has_device_kernels(device_type: str) -> bool:
    """Whether the built extension has kernels for ``device_type`` ("cpu", "cuda")."""
    return device_type in _DEVICE_TYPES


def _check_device(t: torch.Tensor):
    if t.device.type not in _DEVICE_TYPES:
        raise RuntimeError(f"backend='cuda': the compiled extension has no kernels for {t.device.type} tensors; "
                           + (BUILD_HINT if t.device.type == "cuda" else "use backend='torch'"))


def _part(partition: Optional[Partition], k: int):
    """``(mode code, key)`` of a partition checked against ``k`` coefficient columns."""
    if partition is None:
        partition = Partition(k)
    if partition.k != k:
        raise ValueError(f"partition has k={partition.k} but the coefficients have {k} columns")
    if k == 1:
        return 0, 0
    return _MODE[partition.mode], partition.key if partition.mode == "hash" else 0


# ------------------------------------------------------------------------------------------------
# autograd of the extension's ops (the chain rule; the same wiring serves eager and torch.compile)
# ------------------------------------------------------------------------------------------------
def _compose_setup(ctx, inputs, output):
    theta0, tau, coef, scale, mode, key, out_dtype = inputs
    ctx.save_for_backward(tau, scale)
    ctx.meta = (coef.shape[1], mode, key)


def _compose_backward(ctx, grad):
    """``W = theta0 + sum_i coef[i, part(e)] * tau_i`` gives
    ``dL/dcoef[i, k] = sum_{e : part(e) = k} dL/dW[e] * tau[i, e]`` (``atlas_kernels_ext::coef_grad``:
    one pass over the slab, fixed-order reduction)."""
    tau, scale = ctx.saved_tensors
    k, mode, key = ctx.meta
    g = _ops.coef_grad(grad, tau, scale, k, mode, key)
    return None, None, g, None, None, None, None


def _packed_setup(ctx, inputs, output):
    theta0_flat, tau_flat, coef_flat, scale_flat, table, tile_map, block, kmax, out_dtype = inputs
    ctx.save_for_backward(tau_flat, scale_flat, table, tile_map)
    ctx.meta = (block, kmax, coef_flat.shape[1])


def _packed_backward(ctx, grad):
    """Per block b of the table: ``dL/dcoef_flat[i, col_b + k] = sum_{e in b, part k} dL/dflat[e] *
    tau_flat[i, e]`` (``atlas_kernels_ext::coef_grad_packed``: per-tile partials summed in tile order)."""
    tau_flat, scale_flat, table, tile_map = ctx.saved_tensors
    block, kmax, total_cols = ctx.meta
    g = _ops.coef_grad_packed(grad, tau_flat, scale_flat, table, tile_map, block, kmax, total_cols)
    return None, None, g, None, None, None, None, None, None


torch.library.register_autograd("atlas_kernels_ext::compose", _compose_backward, setup_context=_compose_setup)
torch.library.register_autograd("atlas_kernels_ext::compose_packed", _packed_backward, setup_context=_packed_setup)


# ------------------------------------------------------------------------------------------------
# public API
# ------------------------------------------------------------------------------------------------
def compose(block: Block, out_dtype):
    """Differentiable (in ``block.coef``) ``theta0 + sum_i coef[i, part(e)] * tau_i (* scale per row)``,
    accumulated in fp32 and stored in ``out_dtype`` (see :func:`_compose_backward` for the chain rule)."""
    theta0, tau = dense(block).theta0, block.tau
    if torch.float64 in (theta0.dtype, tau.dtype, out_dtype):
        # the kernels accumulate in fp32; float64 (reference work) is the torch backend's
        return torch_backend.compose(block, out_dtype)
    _check_device(theta0)
    # indexing and .float() are differentiable: the gradient comes back in coef's shape and dtype.
    c = coef_matrix(block.coef, tau.shape[0]).float()
    mode, key = _part(block.partition, c.shape[1])
    return _ops.compose(theta0, tau, c, block.scale, mode, key, out_dtype or theta0.dtype)


def compose_packed(theta0_flat, tau_flat, coef_flat, layout, out_dtype, scale_flat=None):
    """Differentiable (in ``coef_flat``) composition of all blocks of ``layout`` (a
    :class:`~atlas_kernels.kernels.PackedLayout`) in one call: a flat ``[P]`` tensor (split it
    with ``layout.views``). ``coef_flat`` is ``[N, layout.total_cols]``."""
    _check_device(theta0_flat)
    n = tau_flat.shape[0]
    c = coef_flat.reshape(n, layout.total_cols).float()
    s = None if scale_flat is None else scale_flat.reshape(n, layout.total_rows).float()
    return _ops.compose_packed(theta0_flat, tau_flat, c, s, layout.table, layout.tile_map, int(layout.block),
                               int(layout.kmax), out_dtype or theta0_flat.dtype)


def linear(x, wblock: Block, bblock: Optional[Block] = None):
    """``y = x W^T + c`` with ``W`` and ``c`` composed by the extension in the compute dtype.

    Chain rule: ``F.linear``'s backward gives ``dx = dy W`` and the would-be weight gradient
    ``G = dy^T x`` (one block, transient), which the compose op's backward reduces against the slab:
    ``dlam_W[i, k] = <G, tau_i>`` over part k; likewise ``dlam_c[i, k] = <sum_rows dy, tau_c_i>``.
    """
    return torch_backend.linear_with(compose, x, wblock, bblock)
