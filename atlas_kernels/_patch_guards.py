"""Patch-time guards and fix-ups of :func:`atlas_kernels.patch`: block names the module lacks (with
a hint at the prefix that would fit), shapes, dtypes and devices of the blocks, tied parameters,
the Triton backend on the wrong device, BatchNorm running statistics. Used by
:mod:`atlas_kernels.patching` only. ``tvs`` is always the
:class:`~atlas_kernels.task_vectors.TaskVectors` being patched in (only its reading methods are
used: this file imports nothing above it)."""
from __future__ import annotations

import warnings
from typing import Dict

import torch
import torch.nn as nn

from ._checks import deeper_name


def _buffers_named(tvs, module: nn.Module, params) -> set:
    """Blocks that are buffers of the module (a state dict holds BatchNorm running statistics
    beside the parameters): not parameters, so not adapted; said once, then skipped."""
    bufs = {k for k, _ in module.named_buffers()}
    named = {b for b in tvs.blocks if b not in params and b in bufs}
    if named:
        warnings.warn(f"task vectors name {len(named)} buffer(s) of the module, e.g. {sorted(named)[:3]}; buffers "
                      f"(such as BatchNorm running statistics) are not parameters and stay as they are",
                      stacklevel=3)
    return named


_TV_PREFIXES = ("visual.", "module.", "model.", "vision_model.", "model.visual.")


def tv_prefix_hint(missing, params):
    """``(prefix, fits, whole)`` when a prefix maps missing task-vector names onto the module's
    names (``fits``: those names; ``whole``: other missing names do not start with it, as a
    whole-CLIP state dict's text tower), else None. Every missing name is looked at, not the first
    one (which sorts to a text-tower key of a whole-CLIP state dict). The patch error and the
    training command line word the advice each for its own user."""
    for p in _TV_PREFIXES:
        fits = [b for b in missing if b.startswith(p) and b[len(p):] in params]
        if fits:
            return p, fits, any(not b.startswith(p) for b in missing)
    return None


def _check_blocks_exist(tvs, params, buffers=frozenset()) -> None:
    missing = [b for b in tvs.blocks if b not in params and b not in buffers]
    if missing:
        hint = ""
        sample = missing[0]
        wrap = wrapper_prefix(params)
        found = tv_prefix_hint(missing, params)
        if wrap is not None and all(wrap[0] + b in params for b in missing):
            prefix, how = wrap
            hint = (f" (the module is wrapped by {how}: its parameters are named {prefix!r} + the task vectors' names; "
                    f"patch the module inside, e.g. ak.patch(model.{prefix[:-1]}, ...), or patch before wrapping)")
        elif found:
            p, fits, whole = found
            what = "these look like whole-model task vectors; " if whole else ""
            hint = (f" ({what}{len(fits)} of them are the module's names behind a {p!r} prefix: build the task "
                    f"vectors with prefix={p!r}, or patch the whole model)")
        dotted = [b for b in missing if b.startswith(".") and b[1:] in params]
        if not hint and dotted:
            hint = (f" (names such as {dotted[0]!r} start with a dot: the prefix given when building them lacked its "
                    f"trailing dot; pass e.g. prefix='visual.' rather than prefix='visual')")
        if not hint and (f"visual.{sample}" in params or deeper_name(sample, params) is not None):
            hint = " (the model holds it under a longer path: patch the submodule, e.g. model.visual)"
        raise ValueError(f"task vectors name {len(missing)} block(s) the model does not have, e.g. "
                         f"{missing[:3]}{hint}")


def wrapper_prefix(params):
    """``(prefix, what)`` when every parameter name starts with the prefix a wrapper adds:
    ``'_orig_mod.'`` (torch.compile) or ``'module.'`` (DataParallel / DistributedDataParallel)."""
    names = list(params)
    for prefix, how in (("_orig_mod.", "torch.compile"), ("module.", "DataParallel/DistributedDataParallel")):
        if names and all(n.startswith(prefix) for n in names):
            return prefix, how
    return None


def _check_block(name: str, p: torch.Tensor, tvs) -> None:
    shape = tvs.shape(name)
    if shape != p.shape:
        raise ValueError(f"block {name!r}: the model's parameter has shape {tuple(p.shape)}, the task vectors "
                         f"have {tuple(shape)} (task vectors of another model?)")
    if not p.is_floating_point():
        raise TypeError(f"block {name!r}: the model's parameter is {p.dtype}; only floating blocks can be adapted")
    if tvs.device != p.device:
        raise ValueError(f"block {name!r}: task vectors are on {tvs.device}, the model's parameter on {p.device}; "
                         f"move them with task_vectors.to({str(p.device)!r})")


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


def _check_tied_agree(tvs, aliases: Dict[str, str]) -> None:
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
