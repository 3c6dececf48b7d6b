"""State dicts of patched modules: a guard that checks every key and shape before
``load_state_dict`` copies anything, and :func:`load_plain_state_dict` for loading a plain
(unpatched) state dict into the frozen ``theta0`` of a patched module.

A patched module's state dict is a plain one plus the coefficients: every adapted block keeps its
key (``c_fc.weight``, ``ln_1.weight``: theta0) and adds ``<block>_coef``. PyTorch's own
``load_state_dict`` copies every matching key module by module and only then reports the missing
and unexpected ones, so a failed strict load would still overwrite theta0. The guard (a
load-state-dict pre-hook on the patched root, which runs before any of its submodules is touched)
raises first.
"""
from __future__ import annotations

from typing import Dict, Mapping

import torch
import torch.nn as nn

from .patch_config import is_patched, unwrap

__all__ = ["load_plain_state_dict", "attach_guard", "detach_guard"]

def _plain_key(key: str) -> str:
    """The plain model's key for a patched state-dict key (the same: theta0 keeps its key)."""
    return key


def _is_coef_key(key: str) -> bool:
    return key.endswith("_coef")


def _guard_hook(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    expected = {prefix + k: tuple(v.shape) for k, v in module.state_dict().items()}
    given = {k: v for k, v in state_dict.items() if k.startswith(prefix)}
    wrong = [(k, tuple(v.shape), expected[k]) for k, v in given.items()
             if k in expected and isinstance(v, torch.Tensor) and tuple(v.shape) != expected[k]]
    problems = []
    if wrong:
        k, got, want = wrong[0]
        problems.append(f"{len(wrong)} tensor(s) of another shape, e.g. {k!r}: given {got}, expected {want}")
    if strict:
        missing = [k for k in expected if k not in given]
        unexpected = [k for k in given if k not in expected]
        if missing:
            problems.append(f"{len(missing)} missing key(s), e.g. {missing[:3]}")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[:3]}")
    if not problems:
        return
    plain = {prefix + _plain_key(k[len(prefix):]) for k in expected if not _is_coef_key(k)}
    hint = ""
    if given and set(given) <= plain | set(expected) and not any(_is_coef_key(k) for k in given):
        theta = [k for k in expected if not _is_coef_key(k)][:2]
        hint = (f" This looks like a plain (unpatched) state dict: the patched module keeps theta0 under the same "
                f"keys (such as {theta}) and adds its coefficients as '<block>_coef'. Unpatch first "
                f"(atlas_kernels.unpatch(module)) and load it into the plain module, or load it into theta0 with "
                f"atlas_kernels.load_plain_state_dict(module, state_dict).")
    raise RuntimeError("load_state_dict into a module patched by atlas_kernels: " + "; ".join(problems)
                       + ". Nothing was loaded (every key and shape is checked before anything is copied)." + hint)


def attach_guard(root: nn.Module) -> None:
    root.register_load_state_dict_pre_hook(_guard_hook)


def detach_guard(root: nn.Module) -> None:
    hooks = root._load_state_dict_pre_hooks
    for key, h in list(hooks.items()):
        if getattr(h, "hook", h) is _guard_hook:
            del hooks[key]


@torch.no_grad()
def load_plain_state_dict(module: nn.Module, state_dict: Mapping[str, torch.Tensor], *, strict: bool = True):
    """Load a plain (unpatched) state dict into a patched module: pre-trained values go into
    theta0 (and unadapted parameters and buffers), the coefficients are kept. Every key and shape
    is checked before anything is copied. Returns ``module``.

    ``strict``: every theta0 / parameter / buffer of the module must be given, and nothing else."""
    module = unwrap(module)
    if not is_patched(module):
        raise RuntimeError("load_plain_state_dict is for modules patched by atlas_kernels.patch; use "
                           "module.load_state_dict for a plain module")
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping from names to tensors, got {type(state_dict).__name__}")
    targets: Dict[str, torch.Tensor] = {}
    for k, v in module.state_dict(keep_vars=True).items():
        if not _is_coef_key(k):
            targets[_plain_key(k)] = v
    missing = [k for k in targets if k not in state_dict]
    unexpected = [k for k in state_dict if k not in targets]
    problems = []
    for k, v in state_dict.items():
        if k in targets:
            if not isinstance(v, torch.Tensor):
                problems.append(f"key {k!r} holds a {type(v).__name__}, not a tensor")
            elif tuple(v.shape) != tuple(targets[k].shape):
                problems.append(f"key {k!r}: given shape {tuple(v.shape)}, the module has {tuple(targets[k].shape)}")
    if strict and missing:
        problems.append(f"{len(missing)} missing key(s), e.g. {missing[:3]}")
    if strict and unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[:3]}")
    if problems:
        raise RuntimeError("load_plain_state_dict: " + "; ".join(problems[:4]) + ". Nothing was loaded.")
    for k, v in state_dict.items():
        if k in targets:
            targets[k].copy_(v.to(targets[k].device, targets[k].dtype))
    return module
