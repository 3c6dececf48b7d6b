"""Where the image tower comes from: ``model.visual`` of an open_clip model with seeded random
weights (fp32, CPU), through ``open_clip.create_model``, or, when ``import open_clip`` fails for
want of a dependency the tower does not use, through ``open_clip.model`` alone (same seed, same
weights). ``MODEL_SOURCE["how"]`` records which, for the rows."""
from __future__ import annotations

import logging
import os

import torch

MODEL_SOURCE = {"how": None}
# Bench-only towers built with open_clip's own builder, for smoke runs (e.g. the triton backend in
# Triton's CPU interpreter): 2 layers of width 64 on 64 x 64 images, about 0.1M parameters.
TINY_MODELS = {
    "ViT-tiny": {"embed_dim": 32, "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16,
                                                 "head_width": 32}},
}


def _vision_tower_without_open_clip_init(model: str) -> torch.nn.Module:
    """Fallback when ``import open_clip`` fails for want of one of its import-time dependencies
    (regex, ftfy, torchvision, PIL, tqdm, ... which the tokenizer and image transforms need, not the
    image tower). Imports only ``open_clip.model`` from the installed package, without running the
    package's ``__init__``, with a stand-in for ``torchvision.ops.misc.FrozenBatchNorm2d`` (used only
    to freeze ResNet batch norms) when torchvision is missing, and builds the tower from the
    package's own config with ``_build_vision_tower`` exactly as ``CLIP.__init__`` does (first,
    so the same seed gives the same weights as ``create_model``)."""
    import importlib
    import importlib.util
    import json
    import sys
    import types

    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("open_clip_torch is not installed (pip install open_clip_torch)")
    root = list(spec.submodule_search_locations)[0]
    try:
        import torchvision.ops.misc  # noqa: F401
    except Exception:
        tv = types.ModuleType("torchvision")
        ops_m = types.ModuleType("torchvision.ops")
        misc = types.ModuleType("torchvision.ops.misc")

        class FrozenBatchNorm2d(torch.nn.Module):  # never built for a ViT
            def __init__(self, *a, **k):
                raise RuntimeError("torchvision is missing: FrozenBatchNorm2d is unavailable")

        misc.FrozenBatchNorm2d = FrozenBatchNorm2d
        tv.ops, ops_m.misc = ops_m, misc
        tv.__path__, ops_m.__path__ = [], []
        sys.modules.update({"torchvision": tv, "torchvision.ops": ops_m, "torchvision.ops.misc": misc})
    if "open_clip" not in sys.modules:
        pkg = types.ModuleType("open_clip")
        pkg.__path__ = [root]
        sys.modules["open_clip"] = pkg
    oc_model = importlib.import_module("open_clip.model")
    if model in TINY_MODELS:
        cfg = TINY_MODELS[model]
    else:
        with open(os.path.join(root, "model_configs", f"{model}.json")) as f:
            cfg = json.load(f)
    return oc_model._build_vision_tower(cfg["embed_dim"], cfg["vision_cfg"], cfg.get("quick_gelu", False), None)


def build_visual(model: str, seed: int) -> torch.nn.Module:
    """``model.visual`` of an open_clip model with seeded random weights, fp32, on the CPU."""
    logging.getLogger().setLevel(logging.ERROR)  # "No pretrained weights loaded" is expected
    torch.manual_seed(seed)
    try:
        import open_clip

        if model in TINY_MODELS:
            from open_clip.model import _build_vision_tower

            cfg = TINY_MODELS[model]
            visual = _build_vision_tower(cfg["embed_dim"], cfg["vision_cfg"])
        else:
            full = open_clip.create_model(model, pretrained=None)
            visual = full.visual
            del full
        MODEL_SOURCE["how"] = "open_clip.create_model"
    except ImportError as e:
        visual = _vision_tower_without_open_clip_init(model)
        MODEL_SOURCE["how"] = f"open_clip.model._build_vision_tower (import open_clip failed: {e})"
    visual.train()
    for p in visual.parameters():
        p.requires_grad_(False)
    return visual


def image_size(visual) -> tuple:
    s = getattr(visual, "image_size", 224)
    return tuple(s) if isinstance(s, (tuple, list)) else (s, s)
