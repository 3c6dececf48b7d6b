"""Builds checkpoint files the way the task-vector papers wrote them (run as a script in a
subprocess): ``torch.save`` of whole modules whose classes are ``src.modeling.ImageEncoder`` /
``ClassificationHead`` holding old-style open_clip classes (``open_clip.model.VisualTransformer``
... of open_clip 2.0.2), defined in a temporary package that shadows the installed open_clip, with
torchvision transforms, an ``InterpolationMode`` enum and a plain function as attributes.

    python _published.py PKGDIR JOB.json

JOB.json: ``{"files": [{"sd": "x.safetensors", "out": "y.pt", "kind": "encoder"|"head",
"legacy": bool, "normalize": bool}]}``. The state dicts come from safetensors files the test wrote
from a real open_clip model.
"""
import json
import os
import sys

PACKAGES = {
    "src/__init__.py": "",
    "src/modeling.py": '''
import torch


class ImageEncoder(torch.nn.Module):
    def __init__(self, model, train_preprocess, val_preprocess):
        super().__init__()
        self.model, self.train_preprocess, self.val_preprocess = model, train_preprocess, val_preprocess
        self.cache_dir = None


class ClassificationHead(torch.nn.Linear):
    def __init__(self, normalize, weights, biases=None):
        output_size, input_size = weights.shape
        super().__init__(input_size, output_size)
        self.normalize = normalize
        self.weight = torch.nn.Parameter(weights.clone())
        self.bias = torch.nn.Parameter(biases.clone() if biases is not None else torch.zeros_like(self.bias))
''',
    "open_clip/__init__.py": "from . import model, transform\n",
    "open_clip/transform.py": '''
def _convert_to_rgb(image):
    return image.convert("RGB")
''',
    "open_clip/model.py": '''
import torch
from torch import nn


class _Holder(nn.Module):
    def __init__(self):
        super().__init__()


class CLIP(_Holder):
    pass


class VisualTransformer(_Holder):
    pass


class Transformer(_Holder):
    pass


class ResidualAttentionBlock(_Holder):
    pass


class LayerNorm(nn.LayerNorm):
    pass


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class ModifiedResNet(_Holder):
    pass


class AttentionPool2d(_Holder):
    pass


class Bottleneck(_Holder):
    pass
''',
}


def write_packages(root):
    for rel, text in PACKAGES.items():
        p = os.path.join(root, rel)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "w") as fh:
            fh.write(text)


def _class_for(path, leaf_owner):
    """The old open_clip / torch class of the module at ``path`` (dotted, under CLIP)."""
    import torch.nn as nn
    from open_clip import model as M

    last = path.split(".")[-1]
    if path == "visual":
        return M.ModifiedResNet if leaf_owner == "resnet" else M.VisualTransformer
    if last == "transformer":
        return M.Transformer
    if last in ("resblocks", "downsample", "mlp") or last.startswith("layer"):
        return nn.Sequential
    if ".resblocks." in path + "." and path.split(".")[-2] == "resblocks":
        return M.ResidualAttentionBlock
    if path.split(".")[-2:-1] and path.split(".")[-2].startswith("layer"):
        return M.Bottleneck
    if last == "attnpool":
        return M.AttentionPool2d
    if last.startswith("ln"):
        return M.LayerNorm
    if last.startswith("bn") or (path.split(".")[-2:-1] == ["downsample"] and last == "1"):
        return nn.BatchNorm2d
    if last == "attn":
        return nn.MultiheadAttention
    return M._Holder


def build_module(sd, root_cls):
    """A module tree with ``sd``'s tensors as parameters (buffers for BatchNorm statistics)."""
    import torch
    import torch.nn as nn
    from open_clip import model as M

    kind = "resnet" if any(k.startswith("visual.layer1.") for k in sd) else "vit"
    root = root_cls()
    made = {"": root}
    for key, t in sd.items():
        parts = key.split(".")
        for i in range(1, len(parts)):
            path = ".".join(parts[:i])
            if path not in made:
                cls = _class_for(path, kind)
                mod = cls.__new__(cls)
                nn.Module.__init__(mod)
                made[".".join(parts[:i - 1])].add_module(parts[i - 1], mod)
                made[path] = mod
                if path.endswith(".mlp"):
                    mod.add_module("gelu", M.QuickGELU())
        owner = made[".".join(parts[:-1])]
        name = parts[-1]
        if name in ("running_mean", "running_var", "num_batches_tracked"):
            owner.register_buffer(name, t.clone())
        else:
            owner.register_parameter(name, nn.Parameter(t.clone(), requires_grad=t.is_floating_point()))
    # a non-persistent buffer, as CLIP's attention mask is
    root.register_buffer("attn_mask", torch.full((3, 3), float("-inf")), persistent=False)
    return root


def main(pkgdir, job_path):
    sys.path.insert(0, pkgdir)
    import open_clip
    import torch
    from open_clip import model as M
    from open_clip.transform import _convert_to_rgb
    from safetensors.torch import load_file
    from src.modeling import ClassificationHead, ImageEncoder
    from torchvision import transforms as T

    assert open_clip.__file__.startswith(pkgdir), "the stand-in open_clip must shadow the installed one"
    with open(job_path) as fh:
        job = json.load(fh)
    pre = T.Compose([T.Resize(32, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(32),
                     _convert_to_rgb, T.ToTensor(), T.Normalize((0.5,) * 3, (0.25,) * 3)])
    for f in job["files"]:
        sd = load_file(f["sd"])
        if f["kind"] == "head":
            obj = ClassificationHead(f.get("normalize", True), sd["weight"], sd.get("bias"))
        else:
            obj = ImageEncoder(build_module(sd, M.CLIP), pre, pre)
        kw = {"_use_new_zipfile_serialization": False} if f.get("legacy") else {}
        os.makedirs(os.path.dirname(f["out"]) or ".", exist_ok=True)
        torch.save(obj, f["out"], **kw)


if __name__ == "__main__":
    write_packages(sys.argv[1])
    main(sys.argv[1], sys.argv[2])
