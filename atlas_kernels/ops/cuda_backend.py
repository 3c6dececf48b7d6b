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

import os
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

__all__ = ["compose", "linear", "compose_packed", "compute_dtype", "has_device_kernels", "fused_linear",
           "fused_linear_applies"]

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

    CPU tensors take the fused linear (:class:`FusedLinearFunction`: ``W`` and its gradient live
    only in a per-thread scratch of one block, never kept) where :func:`fused_linear_applies`;
    everything else (CUDA tensors: the fused
    op has CPU kernels only; frozen weights; weights that are not 2-D) composes then multiplies.
    Chain rule there: ``F.linear``'s backward gives ``dx = dy W`` and the would-be weight gradient
    ``G = dy^T x`` (one block, transient), which the compose op's backward reduces against the slab:
    ``dlam_W[i, k] = <G, tau_i>`` over part k; likewise ``dlam_c[i, k] = <sum_rows dy, tau_c_i>``.
    """
    if fused_linear_applies(x, wblock):
        return fused_linear(x, wblock, bblock)
    return torch_backend.linear_with(compose, x, wblock, bblock)


# ------------------------------------------------------------------------------------------------
# the fused linear (CPU kernels only; csrc/cpu/atlas_fused_linear.cpp)
# ------------------------------------------------------------------------------------------------
_FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Whether linear takes the fused op on CPU (wherever it applies): True by default; the environment
# variable ATLAS_KERNELS_EXT_FUSED_LINEAR=0 (read once, at import) sets False. Since the op composes
# one whole block into a reused scratch and multiplies with one ATen GEMM, it runs the same GEMMs as
# compose + matmul with fewer memory passes (no W allocated and kept for backward, no G allocated):
# measured faster for float16 and int8 slabs (bench/results/2026-12-01-cpu-ext-scratch.txt). The
# first, tile-fused design (single-threaded tile GEMMs) was slower with float16 slabs, hence the switch.
HAS_FUSED_CPU = torch._C._dispatch_has_kernel_for_dispatch_key("atlas_kernels_ext::fused_linear", "CPU")
FUSED_LINEAR_CPU = os.environ.get("ATLAS_KERNELS_EXT_FUSED_LINEAR", "") != "0"


def fused_linear_applies(x, wblock: Block) -> bool:
    """Whether :func:`linear` takes the fused op: chosen by :data:`FUSED_LINEAR_CPU` (by default
    wherever it applies), CPU tensors, an adapted 2-D weight, a
    float32/bfloat16/float16 compute dtype and ``theta0``. Otherwise (CUDA tensors, where the
    extension has compose/coef_grad kernels but no fused linear; frozen or non-2-D weights; float64)
    :func:`linear` composes the weight, then multiplies."""
    w0, w_tau = wblock.theta0, wblock.tau
    if not HAS_FUSED_CPU or w_tau is None:
        return False
    return (FUSED_LINEAR_CPU and wblock.lora is None and x.device.type == "cpu"
            and w0.device.type == "cpu" and w0.dim() == 2 and w_tau.dim() == 3 and x.dim() >= 1
            and x.shape[-1] == w0.shape[1] and compute_dtype(x) in _FUSED_DTYPES and w0.dtype in _FUSED_DTYPES)


class FusedLinearFunction(torch.autograd.Function):
    """``y = x W^T + c`` with ``W = w0 + sum_i lam[i, part(e)] * tau_i`` (``* scale[i, row]``) and
    ``c = b0 + sum_i mu[i, part(e)] * tau_c_i``, the weight composed inside the op
    (``atlas_kernels_ext::fused_linear``) into a per-thread scratch of one block that the next
    block reuses: neither ``W`` nor its gradient is ever allocated or kept, and only ``x`` (which
    the plain model's linear keeps too) is saved for backward.

    Chain rule, with ``dy = dL/dy`` over the rows of ``x`` (leading dims flattened):

    - ``dL/dx = dy W`` (``W`` recomposed into the scratch in ``fused_linear_backward``);
    - ``dL/dlam[i, k] = sum_{e : part(e) = k} G[e] * tau_i[e]`` (``* scale``) with ``G = dy^T x``
      (one GEMM into the scratch), reduced chunk by chunk against the slabs in the same pass
      that recomposes ``W`` (each slab element read once for both); per-chunk partials summed in
      a fixed order;
    - ``dL/dmu[i, k] = sum_{e : part(e) = k} (sum_rows dy)[e] * tau_c_i[e]`` (``coef_grad``).

    ``w0``, ``b0`` and the slabs are frozen (no gradient).
    """

    @staticmethod
    def forward(ctx, x2, w_coef, b_coef, w0, w_tau, w_scale, w_mode, w_key, b0, b_tau, b_scale, b_mode, b_key):
        dtype = x2.dtype
        if b0 is None:
            b = None
        elif b_tau is None:
            b = b0.to(dtype)
        else:
            b = _ops.compose(b0, b_tau, b_coef, b_scale, b_mode, b_key, dtype)
        y = _ops.fused_linear(x2, w0, w_tau, w_coef, w_scale, w_mode, w_key, b)
        ctx.save_for_backward(x2, w0, w_tau, w_coef, w_scale, b_tau, b_scale)
        ctx.meta = (w_mode, w_key, b_mode, b_key, None if b_coef is None else b_coef.shape[1])
        return y

    @staticmethod
    def backward(ctx, dy):
        x2, w0, w_tau, w_coef, w_scale, b_tau, b_scale = ctx.saved_tensors
        w_mode, w_key, b_mode, b_key, b_k = ctx.meta
        dy = dy.contiguous()
        dx, d_w = _ops.fused_linear_backward(dy, x2, w0, w_tau, w_coef, w_scale, w_mode, w_key,
                                             ctx.needs_input_grad[0])
        d_b = None
        if b_tau is not None and ctx.needs_input_grad[2]:
            d_b = _ops.coef_grad(dy.sum(0, dtype=torch.float32), b_tau, b_scale, b_k, b_mode, b_key)
        return (dx if ctx.needs_input_grad[0] else None, d_w, d_b) + (None,) * 10


def fused_linear(x, wblock: Block, bblock: Optional[Block] = None):
    """``linear`` through :class:`FusedLinearFunction` (CPU tensors; see :func:`fused_linear_applies`),
    in the compute dtype of ``x``; ``x`` may have leading batch dims."""
    dtype = compute_dtype(x)
    w0, w_tau = wblock.theta0, wblock.tau
    out_f, in_f = w0.shape
    wc = coef_matrix(wblock.coef, w_tau.shape[0]).float()
    w_mode, w_key = _part(wblock.partition, wc.shape[1])
    b0 = b_tau = b_scale = bc = None
    b_mode, b_key = 0, 0
    if bblock is not None and bblock.theta0 is not None:
        b0, b_tau, b_scale = dense(bblock).theta0, bblock.tau, bblock.scale
        if b_tau is not None:
            bc = coef_matrix(bblock.coef, b_tau.shape[0]).float()
            b_mode, b_key = _part(bblock.partition, bc.shape[1])
    lead = x.shape[:-1]
    with torch.autocast("cpu", enabled=False):
        y = FusedLinearFunction.apply(x.to(dtype).reshape(-1, in_f), wc, bc, w0, w_tau, wblock.scale, w_mode, w_key,
                                      b0, b_tau, b_scale, b_mode, b_key)
    return y.reshape(*lead, out_f)
