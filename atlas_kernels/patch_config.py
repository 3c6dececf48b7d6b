"""What :func:`atlas_kernels.patch` was asked to do, kept on the patched module: :class:`PatchConfig`.

A patched module carries one frozen :class:`PatchConfig` (the task vectors' names in order, the
adapted blocks, the partition layout, the backend, the BatchNorm and grouping choices, standard or
linearised). :func:`is_patched` and :meth:`PatchConfig.of` read it, through ``torch.compile``,
``DistributedDataParallel`` and ``nn.DataParallel`` wrappers (:func:`unwrap`). Coefficient files
record it as metadata.

This file imports no other part of atlas_kernels, so patching, state dicts, coefficient files and
the linearised export can all ask "is this module patched, and how?" without importing each other.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Optional, Tuple

import torch.nn as nn

__all__ = ["PatchConfig", "is_patched", "unwrap"]

# The attributes patch() sets on the patched module: the config, and what unpatch() puts back
# (each parameter's requires_grad flag, the BatchNorm layers it pinned to eval mode).
CONFIG_ATTR = "_atlas_config"
RESTORE_ATTR = "_atlas_restore"


@dataclass(frozen=True)
class PatchConfig:
    """The arguments of one :func:`~atlas_kernels.patch` call, as resolved for the module it patched.

    ``names``: the task vectors' names, in coefficient order (coefficient ``i`` belongs to task
    vector ``i``); ``blocks``: the adapted parameter names (after ``blocks=`` and tied names are
    resolved); ``resolved_backend``: the backend that runs (``backend="auto"`` decided); the rest
    as :func:`~atlas_kernels.patch` takes them. Read it with ``PatchConfig.of(module)``.
    """

    names: Tuple[str, ...]
    blocks: Tuple[str, ...]
    partitions: int = 1
    partition_mode: str = "contiguous"
    seed: int = 0
    backend: str = "auto"
    grouped: bool = True
    fused_linear: object = "auto"
    fused_max_m: Optional[int] = None
    batchnorm: str = "frozen"
    linearised: bool = False
    # The backend(s) that run, as the plan resolved ``backend`` for the module's devices ("triton",
    # "torch", "ext"; "+"-joined across devices); set by the plan, redone after ``.to()``.
    resolved_backend: str = ""

    def __post_init__(self):
        object.__setattr__(self, "names", tuple(str(n) for n in self.names))
        object.__setattr__(self, "blocks", tuple(str(b) for b in self.blocks))

    @property
    def n(self) -> int:
        """N, the number of task vectors (coefficients per block, per partition)."""
        return len(self.names)

    def to_json(self) -> str:
        """Every field as one JSON object (what coefficient files record as ``patch_config``)."""
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def of(cls, module: nn.Module) -> "PatchConfig":
        """The config of a module patched by :func:`~atlas_kernels.patch` (or of the module inside a
        ``torch.compile``/DDP/DataParallel wrapper); a clear error for any other module."""
        module = unwrap(module)
        if not is_patched(module):
            inside = [path for path, m in module.named_modules() if path and is_patched(m)]
            if inside:
                shown = ", ".join(f"module.{p}" for p in inside[:3])
                raise RuntimeError(f"this module was not patched by atlas_kernels.patch, but {len(inside)} of its "
                                   f"submodules were: {shown}; pass that submodule (e.g. "
                                   f"atlas_kernels.coefficients(model.{inside[0]}))")
            raise RuntimeError("this module was not patched by atlas_kernels.patch (nothing to do)")
        return getattr(module, CONFIG_ATTR)


def unwrap(module):
    """The module inside ``torch.compile`` (``_orig_mod``), ``DistributedDataParallel`` and
    ``nn.DataParallel`` wrappers (``.module``), so coefficient names are the same for all of them."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    for _ in range(16):
        inner = module.__dict__.get("_modules", {}).get("_orig_mod")
        if isinstance(inner, nn.Module) and type(module).__name__ == "OptimizedModule":
            module = inner
        elif isinstance(module, (DataParallel, DistributedDataParallel)):
            module = module.module
        else:
            break
    return module


def is_patched(module: nn.Module) -> bool:
    return hasattr(unwrap(module), CONFIG_ATTR)
