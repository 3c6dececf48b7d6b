"""Where a patched module keeps its adapted blocks, and :func:`coefficients`, which lists them.

An adapted block sits in one of two places: on a swapped-in
:class:`~atlas_kernels.modules.AtlasModule` (``adapted_blocks()``), or as an
:class:`~atlas_kernels.modules.AtlasParameter` in a ``torch.nn.utils.parametrize`` chain of its
owner (``owner.parametrizations.<name>``). :func:`atlas_parametrizations` is the one walk over the
second kind, used by patching, unpatching, small-block grouping and the linearised export.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch.nn as nn

from .modules import AtlasModule, AtlasParameter
from .patch_config import PatchConfig, unwrap

__all__ = ["coefficients", "atlas_parametrizations"]


def join(a: str, b: str) -> str:
    """``a.b``, or ``b`` at the root (``a == ""``)."""
    return f"{a}.{b}" if a else b


def atlas_parametrizations(m: nn.Module) -> List[Tuple[str, nn.Module, AtlasParameter]]:
    """``(name, chain, atlas_parameter)`` for each parametrized tensor of ``m`` itself (not of its
    children) whose chain holds an :class:`AtlasParameter`: the first one in the chain (patch
    registers one); ``chain.original`` is the block's frozen theta0. A list, so that callers may
    remove parametrizations while they go."""
    out = []
    plist = getattr(m, "parametrizations", None)
    if isinstance(plist, nn.ModuleDict):
        for name, chain in plist.items():
            p = next((p for p in chain if isinstance(p, AtlasParameter)), None)
            if p is not None:
                out.append((name, chain, p))
    return out


def coefficients(module: nn.Module, _check: bool = True) -> Dict[str, nn.Parameter]:
    """Original parameter name -> its coefficients ``nn.Parameter`` (``(N,)`` or ``(N, K)``).
    A ``torch.compile``, ``DistributedDataParallel`` or ``nn.DataParallel`` wrapper gives the same
    names as the module it wraps."""
    module = unwrap(module)
    if _check:
        PatchConfig.of(module)
    out: Dict[str, nn.Parameter] = {}
    seen = set()  # a tied block is listed once, under its first name (as named_parameters() does)
    for path, m in module.named_modules():
        if isinstance(m, AtlasModule):
            for local, c in m.adapted_blocks().items():
                out[join(path, local)] = c
        for local, _, p in atlas_parametrizations(m):
            if id(p.coef) not in seen:
                seen.add(id(p.coef))
                out[join(path, local)] = p.coef
    return out
