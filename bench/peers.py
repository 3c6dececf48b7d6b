"""Peers' own code beside ours: FusionBench's ``LayerWiseMergedModel`` as the bench method
``fusionbench``.

FusionBench (pip package ``fusion-bench``, tested with 0.2.33) trains the same composition as aTLAS
(``theta0 + sum_i c[i, b] tau_i`` with one coefficient per task vector and parameter) in its
AdaMerging layer-wise wrapper, ``fusion_bench.models.wrappers.layer_wise_fusion.LayerWiseMergedModel``.
Our ``naive`` and ``merge_once`` are re-implementations of other people's ways; this one is their
code, imported and unmodified (never copied here), so that a step time measured for it is theirs.

It is optional (``pip install -e '.[peers]'``): the package pulls lightning, hydra, datasets,
pandas, pyarrow, tensorboard and more (33 packages, about 400 MB), none of which this library needs.
``LayerWiseMergedModel`` itself imports only ``fusion_bench``, ``omegaconf`` (with
``antlr4-python3-runtime``) and ``dill`` beyond torch. Where it is missing, ``python -m bench`` says so
and runs the other methods. This module imports neither torch nor fusion_bench at import time.
"""
from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING, Dict, Optional

if TYPE_CHECKING:
    import torch

DIST = "fusion-bench"
TESTED_VERSION = "0.2.33"
WRAPPER = "fusion_bench.models.wrappers.layer_wise_fusion"
NOT_INSTALLED = (
    "fusionbench: FusionBench (pip package fusion-bench) is not installed, so its LayerWiseMergedModel "
    "is not run beside ours; pip install -e '.[peers]' adds it (see bench/README.md)"
)


def fusionbench_version() -> Optional[str]:
    """The installed fusion-bench's version, or None when it is not installed (nothing imported)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        v = version(DIST)
    except PackageNotFoundError:
        return None
    try:
        found = importlib.util.find_spec("fusion_bench") is not None
    except (ImportError, ValueError):
        found = False
    return v if found else None


def layer_wise_merged_model(visual, slabs: Dict[str, "torch.Tensor"], weights: "torch.Tensor"):
    """FusionBench's ``LayerWiseMergedModel`` over ``visual`` (theta0) and the task vectors ``slabs``
    (``[N, *shape]`` per parameter name), as a FusionBench user builds it: from N fine-tuned models,
    here ``theta0 + tau_i`` (deep copies of ``visual``), from which its constructor takes the task
    vectors back (``finetuned - pretrained``) and keeps them as N modules. ``weights`` is its
    ``layer_wise_weight``, ``[N, parameters]`` in ``named_parameters()`` order. Its task vectors are
    then cast to the slabs' dtype (``nn.Module.to`` on its ``task_vectors``; its code computes them
    in the tower's dtype), so that it holds the same bytes as the other methods.

    ``clamp_weights=False``: aTLAS coefficients are not confined to [0, 1] (the bench starts them in
    [-0.1, 0.1]; FusionBench's default clamp would zero the negative ones and their gradients)."""
    import copy

    import torch
    from fusion_bench.models.wrappers.layer_wise_fusion import LayerWiseMergedModel

    names = [b for b, p in visual.named_parameters() if p.requires_grad]
    n = weights.shape[0]
    if tuple(weights.shape) != (n, len(names)):
        raise ValueError(f"weights must be [N, {len(names)}] (task vectors, parameters), got {tuple(weights.shape)}")
    tv_dtype = next(iter(slabs.values())).dtype
    finetuned = []
    for i in range(n):
        m = copy.deepcopy(visual)
        with torch.no_grad():
            for b, p in m.named_parameters():
                if b in slabs:
                    p.add_(slabs[b][i].to(p.dtype))
        finetuned.append(m)
    model = LayerWiseMergedModel(layer_wise_weight=weights, pretrained_model=visual, finetuned_models=finetuned,
                                 clamp_weights=False)
    del finetuned
    model.task_vectors.to(tv_dtype)
    return model
