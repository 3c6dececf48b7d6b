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

__all__ = ["coefficients", "join", "overflowing_blocks"]


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


def overflowing_blocks(module: nn.Module, dtype=None) -> Dict[str, float]:
    """Adapted blocks whose composed value ``theta0 + sum_i lam_i tau_i`` does not fit ``dtype``
    (default: each block's theta0 dtype; pass torch.float16 for a model trained under fp16 autocast):
    block name -> the largest magnitude of its composed value (computed in float32, or inf/NaN where
    that is already not finite). An fp16 model whose composed weight overflows gives inf there and NaN
    losses after; this names the block. One compose per block: call it when something went wrong,
    not every step."""
    import torch

    from .ops.torch_backend import compose_values

    module = unwrap(module)
    out: Dict[str, float] = {}
    with torch.no_grad():
        for path, m in module.named_modules():
            if not isinstance(m, _BlockHolder):
                continue
            for name in m._atlas_parts:
                b = m._atlas_block(name)
                dt = dtype or b.theta0.dtype
                if not dt.is_floating_point:
                    continue
                if b.lora is not None:
                    from .ops.lora import lora_compose

                    v = lora_compose(b, torch.float32)
                else:
                    v = compose_values(b.theta0.float(), b.tau, b.coef, b.partition, torch.float32, b.scale)
                big = float(v.abs().max()) if v.numel() else 0.0
                if not (big <= torch.finfo(dt).max):  # also NaN
                    out[join(path, name)] = big
    return out
