"""Building task vectors: from state dicts, checkpoint files, LoRA factors and PEFT adapters.

Each builder takes the class to build (``cls``: :class:`~atlas_kernels.task_vectors.TaskVectors`
or a subclass) first and is that class's classmethod of the same name: call
``TaskVectors.from_state_dicts(pretrained, finetuned, ...)`` and so on.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Dict, Sequence

import torch

from .._checks import prefix_cut_problem, prefix_matches_nothing, require_finite
from ..checkpoints import dropped_note, load_state_dict_file, select_tower
from ..peft import lora_pair, read_peft_adapter
from ..storage import QMAX, quantize, storage_name, torch_dtypes

__all__ = ["from_state_dicts", "from_checkpoints", "from_lora", "from_peft", "build"]


def from_state_dicts(cls, pretrained: Mapping, finetuned: Sequence[Mapping], *, names=None, prefix=None,
                     storage=None):
    """``tau_i = finetuned[i] - pretrained`` for every floating tensor (integer buffers skipped).

    ``prefix`` (e.g. ``"visual."``) keeps only keys that start with it and strips it. Task vectors
    are computed in float32 and stored in ``storage`` (default float32).
    """
    if isinstance(finetuned, Mapping) or isinstance(finetuned, (str, bytes)):
        raise TypeError("finetuned must be a sequence of state dicts (one per task vector), "
                        "got a single mapping")
    return build(cls, pretrained, list(finetuned), names, prefix, storage, labels=None)


def from_checkpoints(cls, pretrained_path, finetuned_paths: Sequence, *, names=None, prefix=None, storage=None):
    """Like :meth:`from_state_dicts`, reading checkpoint files one fine-tuned file at a time.

    Files: safetensors, torch-saved state dicts, or pickled whole modules as the task-vector papers
    released them (``src.modeling.ImageEncoder``, any open_clip version), read without running
    code (see :func:`~atlas_kernels.checkpoints.load_state_dict_file`). ``prefix`` keeps the keys
    under it, stripped: ``"model.visual."`` for an ImageEncoder, ``"visual."`` for an open_clip
    CLIP state dict, or ``"auto"`` to find the image tower in each file (``visual.``,
    ``model.visual.``, ``module.visual.`` ...). Keys outside it (the text-tower leftovers) are
    dropped, with a note of their size on the ``atlas_kernels`` logger. ``names`` defaults to the
    files' stems."""
    if isinstance(finetuned_paths, (str, os.PathLike)):
        finetuned_paths = [finetuned_paths]
    finetuned_paths = list(finetuned_paths)
    if names is None:
        names = [os.path.splitext(os.path.basename(str(p)))[0] for p in finetuned_paths]
    pre = load_state_dict_file(pretrained_path)
    if prefix:
        pre, dropped, used = select_tower(pre, prefix, str(pretrained_path))
        if dropped:
            logging.getLogger("atlas_kernels").info("%s: %s", pretrained_path, dropped_note(dropped, used))
            # torch files come as views into one buffer per file: copies of the kept tensors let the
            # dropped ones' memory go for the whole build, not only when the build ends
            if any(v.untyped_storage().nbytes() > v.numel() * v.element_size() for v in pre.values()):
                pre = {k: v.clone() for k, v in pre.items()}
        del dropped
    lazy = _LazyDicts(finetuned_paths, prefix)
    return build(cls, pre, lazy, names, None, storage, labels=[str(p) for p in finetuned_paths])


def from_lora(cls, factors: Sequence[Mapping], *, names=None, storage=None):
    """LoRA task vectors: ``factors[i]`` maps block names to ``(A, B)`` with ``A`` of shape
    ``(r, in)`` and ``B`` of shape ``(out, r)``, so task vector i of that block is ``B @ A``.

    Never densified: a block stores ``A [N, r, in]`` and ``B [N, out, r]`` (ranks padded to the
    block's largest with zero rows, which add nothing); the forward uses ``x A^T`` then ``B``, or
    composes ``B diag(lam) A`` once for large batches. A task vector that does not name a block
    contributes nothing to it. ``storage``: float32 (default), bfloat16 or float16.
    """
    if isinstance(factors, Mapping):
        raise TypeError("factors must be a sequence (one mapping per task vector), got a single mapping")
    factors = list(factors)
    storage = storage_name(storage)
    if storage in QMAX:
        raise ValueError(f"LoRA factors take float storage (float32, bfloat16, float16), not {storage}")
    if not factors:
        raise ValueError("factors: need at least one task vector")
    dtype = torch_dtypes()[storage]
    shapes: Dict[str, tuple] = {}
    ranks: Dict[str, int] = {}
    for i, f in enumerate(factors):
        if not isinstance(f, Mapping):
            raise TypeError(f"factors[{i}] must map block names to (A, B), got {type(f).__name__}")
        for b, ab in f.items():
            a, bb = lora_pair(ab, f"factors[{i}][{b!r}]")
            if not (a.is_floating_point() and bb.is_floating_point()):
                raise TypeError(f"factors[{i}][{b!r}]: LoRA factors must be floating, got {a.dtype}, {bb.dtype}")
            shape = (bb.shape[0], a.shape[1])
            if shapes.setdefault(b, shape) != shape:
                raise ValueError(f"block {b!r}: factors[{i}] gives a ({shape[0]}, {shape[1]}) update, an earlier "
                                 f"task vector a {shapes[b]} one")
            ranks[b] = max(ranks.get(b, 0), a.shape[0])
            require_finite(a, f"LoRA factor A of block {b!r} in factors[{i}]")
            require_finite(bb, f"LoRA factor B of block {b!r} in factors[{i}]")
    lora = {}
    n = len(factors)
    for b, (out, inn) in shapes.items():
        r = ranks[b]
        dev = next(f[b][0].device for f in factors if b in f)
        a_all = torch.zeros((n, r, inn), dtype=dtype, device=dev)
        b_all = torch.zeros((n, out, r), dtype=dtype, device=dev)
        for i, f in enumerate(factors):
            if b in f:
                a, bb = f[b]
                a_all[i, : a.shape[0]] = a.to(dtype)
                b_all[i, :, : a.shape[0]] = bb.to(dtype)
        lora[b] = (a_all, b_all)
    return cls({}, names, lora=lora, n=n)


def from_peft(cls, paths: Sequence, *, names=None, module_prefix=None, storage=None):
    """LoRA task vectors from PEFT adapters (directories holding ``adapter_model.safetensors`` and
    ``adapter_config.json``), with PEFT's ``lora_alpha / r`` scaling folded into ``B``.
    ``module_prefix`` (e.g. ``"visual."``) is stripped from the adapters' module names so they
    match the module you patch. ``names`` defaults to the adapter folders' names."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = list(paths)
    if names is None:
        names = [os.path.basename(os.path.normpath(str(p))) for p in paths]
    factors = [read_peft_adapter(p, module_prefix=module_prefix) for p in paths]
    return from_lora(cls, factors, names=names, storage=storage)


def build(cls, pretrained, finetuned, names, prefix, storage, labels):
    """``cls`` holding ``finetuned[i] - pretrained`` per floating block, computed in float32 and
    stored in ``storage``. ``finetuned`` is any sequence (read one item at a time: a lazy one holds
    one state dict in memory); ``labels[i]`` names item i in errors (default ``finetuned[i]``)."""
    storage = storage_name(storage)
    pre = _select(pretrained, prefix, "the pre-trained state dict")
    n = len(finetuned)
    if n == 0:
        raise ValueError("finetuned: need at least one fine-tuned state dict")
    slabs: Dict[str, torch.Tensor] = {}
    scales: Dict[str, torch.Tensor] = {}
    for i in range(n):
        label = labels[i] if labels else f"finetuned[{i}]"
        ft = _select(finetuned[i], prefix, label)
        missing = [k for k in pre if k not in ft]
        extra = [k for k in ft if k not in pre]
        if missing:
            raise ValueError(f"{label} lacks {len(missing)} block(s) that the pre-trained state dict has, "
                             f"e.g. {missing[:3]}")
        if extra:
            raise ValueError(f"{label} has {len(extra)} block(s) that the pre-trained state dict lacks, "
                             f"e.g. {extra[:3]}")
        for k, p in pre.items():
            f = ft[k]
            if f.shape != p.shape:
                raise ValueError(f"block {k!r}: {label} has shape {tuple(f.shape)}, the pre-trained "
                                 f"state dict has {tuple(p.shape)}")
            tau = f.float() - p.float()
            require_finite(tau, f"block {k!r} of {label} (fine-tuned minus pre-trained)")
            q, sc = quantize(tau, storage, f"block {k!r} of {label} (fine-tuned minus pre-trained)")
            if k not in slabs:
                slabs[k] = torch.empty((n, *p.shape), dtype=q.dtype, device=q.device)
                if sc is not None:
                    scales[k] = torch.empty((n, sc.numel()), dtype=torch.float32, device=q.device)
            slabs[k][i] = q
            if sc is not None:
                scales[k][i] = sc
    return cls(slabs, names, scales)


def _select(sd, prefix, label) -> Dict[str, torch.Tensor]:
    if not isinstance(sd, Mapping):
        raise TypeError(f"{label} is not a state dict (a mapping from names to tensors): got {type(sd).__name__}")
    out = {}
    for k, v in sd.items():
        if not isinstance(k, str):
            raise TypeError(f"{label} is not a state dict: key {k!r} is not a string")
        if prefix:
            if not k.startswith(prefix):
                continue
            why = prefix_cut_problem("prefix", prefix, k)
            if why:
                raise ValueError(f"{label}: {why}")
            k = k[len(prefix):]
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"{label} is not a state dict: key {k!r} holds a {type(v).__name__}, not a tensor")
        if not v.is_floating_point():
            continue  # integer buffers (e.g. position ids, counters) are not adapted
        out[k] = v
    if not out:
        if prefix:
            raise ValueError(prefix_matches_nothing("prefix", prefix, f"no floating tensor in {label}", sd,
                                                    auto=True))
        raise ValueError(f"{label} holds no floating tensor")
    return out


class _LazyDicts:
    """Fine-tuned state dicts read from files one at a time (only one in memory), each cut to the
    keys under ``prefix`` (``"auto"``: found per file)."""

    def __init__(self, paths, prefix=None):
        self.paths, self.prefix = paths, prefix

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        sd = load_state_dict_file(self.paths[i])
        return select_tower(sd, self.prefix, str(self.paths[i]))[0] if self.prefix else sd
