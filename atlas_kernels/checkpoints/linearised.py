"""The published linearised checkpoints (tangent_task_arithmetic, Ortiz-Jimenez et al. 2023, and the
aTLAS paper's code): ``linear_zeroshot.pt`` / ``linear_finetuned.pt``.

Each is a plain state dict, ``torch.save``'d by ``LinearizedImageEncoder.save``:

- ``model.params0.<i>``: the expansion point theta0, and ``model.params.<i>``: the trained point
  (for the zero-shot file, both are theta0), indexed by position ``i``;
- ``model_name``: a string, the open_clip architecture (``"ViT-B-32"``, possibly with a
  ``"__pretrained__<tag>"`` suffix).

Position ``i`` is the i-th entry of ``named_parameters()`` of the paper's ImageEncoder: the
open_clip CLIP model without its text transformer, so the text-tower leftovers
(``positional_embedding``, ``text_projection``, ``logit_scale``) come first, then ``visual.*``,
then ``token_embedding.weight`` and ``ln_final``. :func:`named_parameter_order` rebuilds that order
from open_clip (on the meta device: no weights are made), and :func:`to_named_state_dict` checks
every position's shape against it.
"""
from __future__ import annotations

import re
import warnings
from collections.abc import Mapping
from functools import lru_cache
from typing import Dict, List, Tuple

import torch

__all__ = ["is_linearised_state_dict", "named_parameter_order", "to_named_state_dict", "task_vector"]

_KEY = re.compile(r"^model\.(params0?)\.(\d+)$")


def is_linearised_state_dict(sd) -> bool:
    """True for a mapping in the published linearised format (positional ``model.params.<i>`` and
    ``model.params0.<i>`` tensors and a ``model_name`` string)."""
    if not isinstance(sd, Mapping) or not isinstance(sd.get("model_name"), str):
        return False
    keys = [k for k in sd if k != "model_name"]
    return bool(keys) and all(isinstance(k, str) and _KEY.match(k) and isinstance(sd[k], torch.Tensor)
                              for k in keys)


def _arch(model_name: str) -> str:
    return model_name.split("__pretrained__")[0]


@lru_cache(maxsize=8)
def named_parameter_order(model_name: str) -> Tuple[Tuple[str, Tuple[int, ...]], ...]:
    """``(name, shape)`` of every parameter of the paper's ImageEncoder for ``model_name``, in
    ``named_parameters()`` order, named as in the open_clip CLIP model (``visual.conv1.weight``...)."""
    import open_clip

    arch = _arch(model_name)
    if arch not in open_clip.list_models():
        raise ValueError(f"model_name {model_name!r}: open_clip has no architecture {arch!r} "
                         f"(known, e.g.: {open_clip.list_models()[:5]})")
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        model = open_clip.create_model(arch, pretrained=None, device="meta")
    if hasattr(model, "transformer"):
        delattr(model, "transformer")  # ImageEncoder(keep_lang=False) drops the text transformer
    return tuple((k, tuple(p.shape)) for k, p in model.named_parameters())


def _positional(sd, which: str) -> List[torch.Tensor]:
    found = {}
    for k, v in sd.items():
        m = _KEY.match(k) if isinstance(k, str) else None
        if m and m.group(1) == which:
            found[int(m.group(2))] = v
    if sorted(found) != list(range(len(found))):
        missing = sorted(set(range(max(found, default=-1) + 1)) - set(found))
        raise ValueError(f"linearised checkpoint: model.{which}.<i> is not numbered 0..{len(found) - 1} "
                         f"(missing positions {missing[:5]})")
    return [found[i] for i in range(len(found))]


def to_named_state_dict(sd, which: str = "params", *, what: str = "linearised checkpoint") -> Dict[str, torch.Tensor]:
    """The ``which`` (``"params"`` or ``"params0"``) tensors of a linearised state dict under their
    open_clip names (``visual.*`` for the image tower). Every position's shape is checked against the
    architecture ``model_name`` names."""
    if which not in ("params", "params0"):
        raise ValueError(f"which must be 'params' or 'params0', got {which!r}")
    if not is_linearised_state_dict(sd):
        raise ValueError(f"{what} is not in the linearised format (model.params.<i>, model.params0.<i>, model_name)")
    order = named_parameter_order(sd["model_name"])
    tensors = _positional(sd, which)
    if len(tensors) != len(order):
        raise ValueError(f"{what}: {len(tensors)} positional model.{which} tensors, but the ImageEncoder of "
                         f"{sd['model_name']!r} has {len(order)} parameters (a checkpoint of another model, or "
                         f"of another open_clip version?)")
    out = {}
    for i, ((name, shape), t) in enumerate(zip(order, tensors)):
        if tuple(t.shape) != shape:
            raise ValueError(f"{what}: position {i} (model.{which}.{i}, {name!r} of {sd['model_name']!r}) has "
                             f"shape {tuple(t.shape)}, expected {shape} (a checkpoint of another model?)")
        out[name] = t
    return out


def task_vector(sd, *, what: str = "linearised checkpoint") -> Dict[str, torch.Tensor]:
    """``tau = params - params0`` per named block of one linearised fine-tuned state dict."""
    params = to_named_state_dict(sd, "params", what=what)
    params0 = to_named_state_dict(sd, "params0", what=what)
    return {k: params[k] - params0[k] for k in params}
