"""Reading checkpoints without running code.

State dicts come from safetensors files or from ``torch.load(weights_only=True)``; a pickled whole
module (the format of the task-vector papers' released checkpoints) is refused with the command that
converts it, and :func:`convert_checkpoint` converts one only with ``trust_pickle=True``.
"""
from __future__ import annotations

import os
import pickle
from collections.abc import Mapping
from typing import Dict

import torch

__all__ = ["load_state_dict_file", "convert_checkpoint"]


def load_state_dict_file(path) -> Dict[str, torch.Tensor]:
    """A state dict from a safetensors file or a ``torch.save``'d dict, without running code.

    Accepts ``{"state_dict": {...}}`` wrappers. A pickled whole module is refused with the command
    that converts it."""
    path = str(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    with open(path, "rb") as fh:
        head = fh.read(16)
    if path.endswith(".safetensors") or (len(head) >= 9 and head[8:9] == b"{"):
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except Exception as exc:
            raise ValueError(f"{path!r} is not a readable safetensors file (truncated or corrupted?): {exc}") from exc
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ValueError(
            f"{path!r} is not a plain state dict: it pickles Python objects (the paper's released checkpoints "
            f"are whole pickled modules), and loading it would run code from the file. If you trust it, "
            f"convert it once with `python -m atlas_kernels.task_vectors convert {path} OUT.safetensors "
            f"--trust-pickle` (or atlas_kernels.convert_checkpoint(src, dst, trust_pickle=True)). "
            f"Details: {str(exc).splitlines()[0]}") from None
    except Exception as exc:
        raise ValueError(f"{path!r} could not be read as a checkpoint (truncated or corrupted?): {exc}") from exc
    from .linearised.checkpoints import is_linearised_state_dict, to_named_state_dict

    if is_linearised_state_dict(obj):  # tangent_task_arithmetic's positional format: named, shape-checked
        return to_named_state_dict(obj, what=repr(path))
    return _unwrap(obj, path)


def _unwrap(obj, path):
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model_state_dict", "model"):
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                obj = inner
                break
        if obj and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
            return dict(obj)
        bad = next(((k, v) for k, v in obj.items() if not isinstance(v, torch.Tensor)), None)
        what = f"key {bad[0]!r} holds a {type(bad[1]).__name__}" if bad else "it is empty"
        raise ValueError(f"{path!r} is not a state dict (a mapping from names to tensors): {what}")
    raise ValueError(f"{path!r} is not a state dict: it holds a {type(obj).__name__}")


def convert_checkpoint(src, dst, *, trust_pickle: bool = False) -> Dict[str, torch.Tensor]:
    """Turn a checkpoint (state dict, or a pickled whole module as the paper releases) into a
    safetensors state dict at ``dst``. Unpickling a module runs code from the file, so it is done only
    with ``trust_pickle=True``."""
    src = str(src)
    try:
        sd = load_state_dict_file(src)
    except ValueError:
        if not trust_pickle:
            raise ValueError(f"{src!r} is a pickled object, not a state dict; loading it runs code from the file. "
                             f"Pass trust_pickle=True (CLI: --trust-pickle) only for files you trust.") from None
        obj = torch.load(src, map_location="cpu", weights_only=False)
        if isinstance(obj, torch.nn.Module):
            obj = obj.state_dict()
        sd = _unwrap(obj, src)
    from safetensors.torch import save_file

    sd = {k: v.detach().clone().contiguous() for k, v in sd.items()}
    save_file(sd, str(dst))
    return sd
