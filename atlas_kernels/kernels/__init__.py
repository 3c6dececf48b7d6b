"""Triton kernels and their launchers (plain tensor functions: no autograd, no modules).

Modules: ``_compose`` (compose: one block), ``_coef_grad`` (coef_grad: one block), ``_group``
(compose_group, coef_grad_group: every block of a group, from a table of their addresses),
``_linear`` (fused_linear, fused_linear_dx, linear_coef_grad), ``_common`` (partition index,
scratch buffers). They are private so that their names do not shadow the launchers exported here.
Autograd and custom-op wiring lives in :mod:`atlas_kernels.ops.triton_backend`.

Under ``TRITON_INTERPRET=1`` (set before this package is imported) the kernels run on the CPU with
fixed launch configurations; on a GPU the GEMM-like and compose kernels are autotuned (keys bucket M).
"""
from ._coef_grad import coef_grad
from ._compose import compose
from ._group import GroupLaunch, coef_grad_group, compose_group, group_table
from ._linear import fused_linear, fused_linear_dx, linear_coef_grad

__all__ = [
    "compose",
    "coef_grad",
    "compose_group",
    "coef_grad_group",
    "group_table",
    "GroupLaunch",
    "fused_linear",
    "fused_linear_dx",
    "linear_coef_grad",
]
