"""The ``"ext"`` backend: the compiled extension ``atlas_kernels._C`` (sources in ``csrc/``).

The extension has CPU kernels (always built) and CUDA kernels (built when ``CUDA_HOME`` is set); the
dispatcher runs the ones matching the tensors' device. Its ops are ``torch.ops.atlas_kernels_ext.*``
(schemas in ``csrc/README.md``), registered in C++ with CPU, CUDA and Meta kernels; their chain rules
are registered here with ``torch.library.register_autograd``, so eager mode and
``torch.compile(fullgraph=True)`` run the very same ops.

- ``compose`` / ``coef_grad``: one block (the grouped pass loops over blocks with them);
- ``fused_linear`` / ``fused_linear_backward`` (CPU): ``y = x W^T`` with ``W`` composed one block at
  a time into a per-thread scratch, never allocated or kept, and its gradient reduced in the same
  pass that recomposes ``W`` for ``dx`` (:class:`FusedLinearFunction`).

Importing this module without the built extension raises ImportError, which
:func:`atlas_kernels.ops.get` turns into an error saying how to build it.
"""
from __future__ import annotations

import torch

from .._launches import region
from ..blocks import Block, coef_matrix
from .backend import Backend, compute_dtype
from .torch_backend import coef_grad_entry, compose_entry, dense, prepare_entry

try:
    from .. import _C  # noqa: F401  (loading the library registers torch.ops.atlas_kernels_ext)
except ImportError as exc:  # not built: plain `pip install -e .`
    raise ImportError(f"atlas_kernels._C (the compiled extension) is not built: {exc}") from exc

__all__ = ["ExtBackend", "BACKEND", "has_device_kernels", "FUSED_MIN_NUMEL"]

_ops = torch.ops.atlas_kernels_ext
BUILD_HINT = ("rebuild the extension with its CUDA kernels: "
              "CUDA_HOME=/usr/local/cuda TORCH_CUDA_ARCH_LIST=\"8.0;9.0\" "
              "ATLAS_KERNELS_BUILD_EXT=1 pip install -e . --no-build-isolation "
              "(or python setup.py build_ext --inplace)")

# Device types the built extension has kernels for (fixed once loaded; a constant for torch.compile).
_DEVICE_TYPES = frozenset(dt for dt, key in (("cpu", "CPU"), ("cuda", "CUDA"), ("meta", "Meta"))
                          if torch._C._dispatch_has_kernel_for_dispatch_key("atlas_kernels_ext::compose", key))
HAS_FUSED_CPU = torch._C._dispatch_has_kernel_for_dispatch_key("atlas_kernels_ext::fused_linear", "CPU")
_FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# The grouped pass composes blocks of at least this many elements with the extension's op, and smaller
# ones with the torch backend's one addmv, whose fixed cost per call is several times lower
# (docs/PERFORMANCE.md, "Which backend auto picks").
GROUP_MIN_NUMEL = 1 << 14
# fused_linear="auto" on CPU: linear weights of at least this many elements run the fused op (W and
# G never allocated; faster than compose + matmul at ViT-B/32 sizes); smaller ones read their weight
# from the grouped compose, where one op call per block would cost more host time than the block's
# work (docs/PERFORMANCE.md).
FUSED_MIN_NUMEL = 1 << 16


def has_device_kernels(device_type: str) -> bool:
    """Whether the built extension has kernels for ``device_type`` ("cpu", "cuda")."""
    return device_type in _DEVICE_TYPES


def _check_device(t: torch.Tensor):
    if t.device.type not in _DEVICE_TYPES:
        raise RuntimeError(f"backend='ext': the compiled extension has no kernels for {t.device.type} tensors; "
                           + (BUILD_HINT if t.device.type == "cuda" else "use backend='torch'"))


# ------------------------------------------------------------------------------------------------
# the chain rule of the compose op (the same wiring serves eager and torch.compile)
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
    with region():
        return None, None, _ops.coef_grad(grad.contiguous(), tau, scale, k, mode, key), None, None, None, None


torch.library.register_autograd("atlas_kernels_ext::compose", _compose_backward, setup_context=_compose_setup)


class FusedLinearFunction(torch.autograd.Function):
    """``y = x W^T`` with ``W = w0 + sum_i lam[i, part(e)] * tau_i`` (``* scale[i, row]``), the
    weight composed inside the op (``atlas_kernels_ext::fused_linear``) into a per-thread scratch
    of one block that the next block reuses: neither ``W`` nor its gradient is ever allocated or
    kept, and only ``x`` (which the plain model's linear keeps too) is saved for backward.

    Chain rule, with ``dy = dL/dy`` over the rows of ``x`` (leading dims flattened):

    - ``dL/dx = dy W`` (``W`` recomposed into the scratch in ``fused_linear_backward``);
    - ``dL/dlam[i, k] = sum_{e : part(e) = k} G[e] * tau_i[e]`` (``* scale``) with ``G = dy^T x``
      (one GEMM into the scratch), reduced chunk by chunk against the slabs in the same pass
      that recomposes ``W`` (each slab element read once for both); per-chunk partials summed in
      a fixed order.

    ``w0`` and the slabs are frozen (no gradient).
    """

    @staticmethod
    def forward(ctx, x2, coef, w0, tau, scale, mode, key):
        ctx.save_for_backward(x2, coef, w0, tau, scale)
        ctx.meta = (mode, key)
        return _ops.fused_linear(x2, w0, tau, coef, scale, mode, key, None)

    @staticmethod
    def backward(ctx, dy):
        x2, coef, w0, tau, scale = ctx.saved_tensors
        need = ctx.needs_input_grad
        with region():
            dx, dcoef = _ops.fused_linear_backward(dy.contiguous(), x2, w0, tau, coef, scale, *ctx.meta, need[0])
        return (dx if need[0] else None, dcoef) + (None,) * 5


def _coef2d(block: Block):
    return coef_matrix(block.coef, block.tau.shape[0]).float()


class ExtBackend(Backend):
    """The compiled extension: CPU kernels, and CUDA kernels when built with them."""

    name = "ext"
    BUILD_HINT = BUILD_HINT
    has_device_kernels = staticmethod(has_device_kernels)

    def compose(self, block: Block, out_dtype):
        b = dense(block)
        _check_device(b.theta0)
        _, code, key = b.encoding()
        return _ops.compose(b.theta0.contiguous(), b.tau, _coef2d(b), b.scale, code, key, out_dtype or b.theta0.dtype)

    def fused_applies(self, x_dtype, wblock: Block, device: torch.device) -> bool:
        """Whether :meth:`linear` can take the CPU fused op for this weight."""
        w0 = wblock.theta0
        return (HAS_FUSED_CPU and wblock.tau is not None and wblock.lora is None and device.type == "cpu"
                and w0.dim() == 2 and wblock.tau.dim() == 3 and x_dtype in _FUSED_DTYPES and w0.dtype in _FUSED_DTYPES)

    def own_linear(self, wblock: Block, device, fused_linear) -> bool:
        if fused_linear is False or not self.fused_applies(wblock.theta0.dtype, wblock, device):
            return False
        return fused_linear is True or wblock.theta0.numel() >= FUSED_MIN_NUMEL

    def linear(self, x, wblock: Block):
        """The CPU fused op (:class:`FusedLinearFunction`) where it applies, else compose then
        ``F.linear``."""
        w = dense(wblock, "the weight")
        dtype = compute_dtype(x)
        if not self.fused_applies(dtype, w, x.device):
            return Backend.linear(self, x, w)
        out_f, in_f = w.theta0.shape
        lead = x.shape[:-1]
        _, code, key = w.encoding()
        with torch.autocast("cpu", enabled=False):
            y = FusedLinearFunction.apply(x.to(dtype).reshape(-1, in_f), _coef2d(w), w.theta0.contiguous(), w.tau,
                                          w.scale, code, key)
        return y.reshape(*lead, out_f)

    # ------------------------------------------------------------------ the grouped pass
    def prepare_group(self, group):
        # per entry: its partition encoding where the extension's op composes it, None where the
        # torch backend's one addmv does (a small block: see GROUP_MIN_NUMEL)
        group.launch = []
        for e in group.entries:
            prepare_entry(e)
            group.launch.append(e.partition.encoding() if e.theta0.numel() >= GROUP_MIN_NUMEL else None)

    def compose_group(self, group, dtypes):
        out = []
        for e, enc in zip(group.entries, group.launch):
            if enc is None:
                out.append(compose_entry(e, dtypes[e.sel]))
                continue
            k, code, key = enc
            coef = e.coef if e.index is None else e.coef.index_select(0, e.index)
            out.append(_ops.compose(e.theta0, e.tau, coef.view(-1, k), e.scale, code, key, dtypes[e.sel]))
        return out

    def coef_grad_group(self, group, grads, cast=True):
        out = []
        for e, enc, g in zip(group.entries, group.launch, grads):
            if enc is None or g is None:
                out.append(coef_grad_entry(e, g, cast))
                continue
            k, code, key = enc
            v = _ops.coef_grad(g.contiguous(), e.tau, e.scale, k, code, key)
            if e.index is not None:
                v = torch.zeros((e.coef.shape[0], k), dtype=v.dtype, device=v.device).index_copy_(0, e.index, v)
            out.append(v.view(e.coef.shape))
        return out

    def compose_values(self, theta0, tau, coef, partition, out_dtype, scale=None):
        _, code, key = partition.encoding()
        c = coef_matrix(coef, tau.shape[0]).float()
        return _ops.compose(theta0.contiguous(), tau, c, scale, code, key, out_dtype)

    def coef_grad_values(self, grad, tau, k, partition, scale=None):
        _, code, key = partition.encoding()
        return _ops.coef_grad(grad.contiguous(), tau, scale, k, code, key)


BACKEND = ExtBackend()
