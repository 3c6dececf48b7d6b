"""Where a patched module keeps its adapted blocks, and :func:`coefficients`, which lists them.

Every adapted block sits on a module that mixes in
:class:`~atlas_kernels.modules._BlockHolder`: a swapped-in
:class:`~atlas_kernels.modules.AtlasModule` or a generic owner adopted by
:class:`~atlas_kernels.modules.AtlasParameter`; its coefficients are ``<block>_coef``.
"""
from __future__ import annotations

from typing import Dict

import torch.nn as nn

from .modules import _BlockHolder
from .patch_config import PatchConfig, unwrap

__all__ = ["coefficients", "join"]


def join(a: str, b: str) -> str:
    """``a.b``, or ``b`` at the root (``a == ""``)."""
    return f"{a}.{b}" if a else b


def coefficients(module: nn.Module, _check: bool = True) -> Dict[str, nn.Parameter]:
    """Original parameter name -> its coefficients ``nn.Parameter`` (``(N,)`` or ``(N, K)``), in the
    order of the module's own walk (the order an optimizer's state refers to).
    A ``torch.compile``, ``DistributedDataParallel`` or ``nn.DataParallel`` wrapper gives the same
    names as the module it wraps. A tied block is listed once, under the name of the owner that holds it."""
    module = unwrap(module)
    if _check:
        PatchConfig.of(module)
    out: Dict[str, nn.Parameter] = {}
    for path, m in module.named_modules():
        if isinstance(m, _BlockHolder):
            for local, c in m._atlas_adapted().items():
                out[join(path, local)] = c
    return out
