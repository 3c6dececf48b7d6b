"""Triton kernels and their launchers (plain tensor functions: no autograd, no modules).

Modules: ``_compose`` (compose, compose_packed, coef_grad_packed, the packed layout), ``_coef_grad``
(coef_grad), ``_linear`` (fused_linear, fused_linear_dx, linear_coef_grad), ``_common`` (partition
index, scratch buffers). They are private so that their names do not shadow the launchers exported
here. Autograd and custom-op wiring lives in :mod:`atlas_kernels.ops.triton_backend`.

Under ``TRITON_INTERPRET=1`` (set before this package is imported) the kernels run on the CPU with
fixed launch configurations; on a GPU the GEMM-like and compose kernels are autotuned (keys bucket M).
"""
from ._coef_grad import coef_grad
from ._compose import PackedLayout, coef_grad_packed, compose, compose_packed, make_packed_layout
from ._linear import fused_linear, fused_linear_dx, linear_coef_grad

__all__ = [
    "compose",
    "compose_packed",
    "coef_grad",
    "coef_grad_packed",
    "make_packed_layout",
    "PackedLayout",
    "fused_linear",
    "fused_linear_dx",
    "linear_coef_grad",
]
