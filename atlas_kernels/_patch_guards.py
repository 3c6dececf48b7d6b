"""Patch-time guards and fix-ups of :func:`atlas_kernels.patch`: tied parameters, the Triton
backend on the wrong device, BatchNorm running statistics. Used by :mod:`atlas_kernels.patching`
only."""
from __future__ import annotations

from typing import Dict

import torch
import torch.nn as nn

from .task_vectors import TaskVectors


def _tied_aliases(module: nn.Module) -> Dict[str, str]:
    """Every name of a parameter that is also reachable under an earlier name (tensor identity) ->
    that first name (the one ``named_parameters()`` lists)."""
    first: Dict[int, str] = {}
    aliases: Dict[str, str] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        if id(p) in first:
            aliases[name] = first[id(p)]
        else:
            first[id(p)] = name
    return aliases


def _check_tied_agree(tvs: TaskVectors, aliases: Dict[str, str]) -> None:
    """Task vectors naming two names of one tied tensor must hold the same update for both."""
    for alias, canonical in aliases.items():
        if alias not in tvs or canonical not in tvs:
            continue
        why = None
        if tvs.is_lora(alias) != tvs.is_lora(canonical) or tvs.shape(alias) != tvs.shape(canonical):
            why = "they differ in kind or shape"
        else:
            ia, ic = tvs.index(alias), tvs.index(canonical)
            if (ia is None) != (ic is None) or (ia is not None and not torch.equal(ia, ic)):
                why = "they hold different task-vector subsets"
            else:
                for i in range(tvs[alias].shape[0] if not tvs.is_lora(alias) else tvs.lora(alias)[0].shape[0]):
                    if not torch.equal(tvs.dense(alias, i), tvs.dense(canonical, i)):
                        why = f"task vector {i} ({tvs.names[i]!r}) differs between them"
                        break
        if why:
            raise ValueError(f"{canonical!r} and {alias!r} are one tied tensor of the module, and the task vectors "
                             f"name both with different updates ({why}); a tied tensor has one value: drop one "
                             f"of the two names (e.g. task_vectors.subset(...)) or make them equal")


def _check_backend_device(module: nn.Module, backend: str) -> None:
    """``backend="triton"`` needs CUDA tensors (or Triton's CPU interpreter): refuse it here rather
    than at the first forward, deep inside Triton."""
    if backend != "triton":
        return
    from ._env import is_interpreter

    if is_interpreter():
        return
    cpu = next((n for n, p in module.named_parameters() if p.device.type != "cuda"), None)
    if cpu is not None:
        dev = module.get_parameter(cpu).device
        raise ValueError(f"backend='triton' needs the module on a CUDA device, but {cpu!r} is on {dev}; "
                         f"use backend='torch' (or 'auto') on the CPU, move the module with .cuda(), or set "
                         f"TRITON_INTERPRET=1 before importing for tiny tests on the CPU (very slow)")


def _frozen_train(self, mode: bool = True):
    """``train()`` of a BatchNorm layer under ``patch(batchnorm="frozen")``: stays in eval mode
    (theta0's running statistics, never updated)."""
    self.training = False
    return self


def _freeze_batchnorm(module: nn.Module) -> list:
    """Pin every BatchNorm layer with running statistics to eval mode (see ``batchnorm=``); returns
    them with their previous mode, for unpatch."""
    frozen = []
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            frozen.append((m, m.training))
            object.__setattr__(m, "train", _frozen_train.__get__(m))
            m.training = False
    return frozen


def _unfreeze_batchnorm(module: nn.Module, frozen) -> None:
    for m, _ in frozen:
        m.__dict__.pop("train", None)
    for m in module.modules():
        if any(m is f for f, _ in frozen):
            m.training = module.training
