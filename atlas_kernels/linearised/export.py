"""A linearised model cannot be merged into plain parameters (no plain model equals
``f(x; theta0) + J f(x; theta0) . D``), so it is exported instead:

- :func:`export_linearised` writes one safetensors file: ``theta0.<name>`` for every entry of the
  plain model's state dict (parameters at theta0 under their original names, and buffers), and
  ``delta.<block>`` = ``D = sum_i lam_i tau_i`` (float32; float64 for a float64 model) per adapted
  block, with metadata (format, blocks, task-vector names).
- :func:`load_linearised` loads theta0 into a plain module of the same architecture and patches it
  linearised with one "task vector" per block, ``D`` itself, at coefficient 1, frozen: evaluation
  then costs one forward-mode pass and builds no training graph.
"""
from __future__ import annotations

import json

import torch
import torch.nn as nn

from .._adapted import coefficients, join
from .._checks import all_finite
from .._io import atomic_save_safetensors
from ..modules import _BlockHolder
from ..patch_config import PatchConfig
from .modules import block_delta

__all__ = ["export_linearised", "read_linearised", "FORMAT"]

FORMAT = "atlas_kernels.linearised"
@torch.no_grad()
def _deltas(module: nn.Module):
    out = {}
    for path, m in module.named_modules():
        if isinstance(m, _BlockHolder):
            for local in m._atlas_parts:
                out[join(path, local)] = (m, local, m._buffers[local].dtype)
    deltas = {}
    for name, (owner, local, dtype) in out.items():
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        d = block_delta(owner, local, acc, "torch")
        if not all_finite(d):
            raise ValueError(f"block {name!r}: its displacement D holds NaN or inf (non-finite coefficients?); "
                             f"not exporting it")
        deltas[name] = d.detach().cpu().contiguous()
    return deltas


def export_linearised(module: nn.Module, path) -> None:
    """Write a linearised patched ``module`` as theta0 (the plain state dict's names) plus ``D`` per
    adapted block, to the safetensors file ``path`` (written atomically)."""
    config = PatchConfig.of(module)
    if not config.linearised:
        raise ValueError("export_linearised needs a module patched with linearised=True; a standard patched "
                         "module merges into a plain model with atlas_kernels.unpatch(module)")
    coef_ids = {id(c) for c in coefficients(module).values()}
    tensors = {}
    for key, value in module.state_dict(keep_vars=True).items():
        if id(value) in coef_ids:
            continue
        tensors["theta0." + key] = value.detach().cpu().contiguous()
    deltas = _deltas(module)
    for name, d in deltas.items():
        tensors["delta." + name] = d
    meta = {"format": FORMAT, "version": "1", "blocks": json.dumps(sorted(deltas)),
            "names": json.dumps(list(config.names))}
    atomic_save_safetensors(tensors, path, metadata=meta)


def read_linearised(path, module: nn.Module):
    """The ``(theta0, displacements)`` state dicts of a linearised export written by
    :func:`export_linearised`, checked against ``module`` (same names and shapes, finite
    displacements). :func:`atlas_kernels.load_linearised` patches a module with them."""
    from ..checkpoints import read_safetensors

    path = str(path)
    meta, tensors = read_safetensors(path)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path!r} is not a linearised export of atlas_kernels (format={meta.get('format')!r})")
    theta0 = {k[len("theta0."):]: v for k, v in tensors.items() if k.startswith("theta0.")}
    deltas = {k[len("delta."):]: v for k, v in tensors.items() if k.startswith("delta.")}
    own = module.state_dict()
    missing, extra = sorted(set(own) - set(theta0)), sorted(set(theta0) - set(own))
    if missing or extra:
        raise ValueError(f"{path!r} does not fit this module: the file lacks {missing[:3]} ({len(missing)}), "
                         f"has extra {extra[:3]} ({len(extra)}) (an export of another architecture?)")
    for k, v in theta0.items():
        if v.shape != own[k].shape:
            raise ValueError(f"{path!r}: {k!r} has shape {tuple(v.shape)} in the file, the module expects "
                             f"{tuple(own[k].shape)}")
    for k, d in deltas.items():
        if k not in theta0 or d.shape != theta0[k].shape or not all_finite(d):
            raise ValueError(f"{path!r}: displacement of block {k!r} does not match theta0 or is not finite")
    return theta0, deltas
