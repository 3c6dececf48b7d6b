"""A complete toy setup that runs offline on a CPU in seconds (for the README and the tests).

``python -m atlas_kernels.train.toy DIR`` writes:

- ``DIR/atlas-toy-vit.json``: a tiny open_clip config (ViT: width 64, 2 layers, 32x32 images,
  patch 8; a one-layer text tower);
- ``DIR/data/shapes/{train,val}`` and ``DIR/data/colours/{train,val}``: ImageFolder datasets of
  simple drawn shapes (3 classes each);
- ``DIR/pretrained.safetensors``: the random "pre-trained" model (seeded);
- ``DIR/finetuned_shapes.safetensors``, ``DIR/finetuned_colours.safetensors``: copies whose image
  tower was fine-tuned for a few steps on each dataset against its zero-shot head, so the task
  vectors carry real signal;
- ``DIR/tvs.safetensors``: the two task vectors of the image tower.

It prints the training commands to try next.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, Sequence, Tuple

import torch
import torch.nn.functional as F

from .._io import atomic_write_json

MODEL_NAME = "atlas-toy-vit"
TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32,
                   "patch_size": 8, "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2,
                 "layers": 1},
}
TEMPLATES = "photo"

# (folder name, colour, shape)
SHAPES = [("red_square", (220, 40, 40), "square"), ("green_circle", (40, 200, 60), "circle"),
          ("blue_triangle", (40, 70, 230), "triangle")]
COLOURS = [("yellow_cross", (230, 220, 40), "cross"), ("purple_bar", (150, 50, 200), "bar"),
           ("cyan_ring", (40, 210, 220), "ring")]
DATASETS = {"shapes": SHAPES, "colours": COLOURS}


def write_model_config(directory) -> Path:
    p = Path(directory) / f"{MODEL_NAME}.json"
    p.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(p, TINY_CONFIG)
    return p


def _draw(colour, shape, size: int, g: torch.Generator):
    from PIL import Image, ImageDraw

    def r(lo, hi):
        return lo + (hi - lo) * float(torch.rand((), generator=g))

    bg = tuple(int(r(90, 160)) for _ in range(3))
    im = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(im)
    s = r(0.35, 0.6) * size
    cx, cy = r(s / 2, size - s / 2), r(s / 2, size - s / 2)
    jitter = tuple(max(0, min(255, int(c + r(-25, 25)))) for c in colour)
    box = [cx - s / 2, cy - s / 2, cx + s / 2, cy + s / 2]
    if shape == "square":
        d.rectangle(box, fill=jitter)
    elif shape == "circle":
        d.ellipse(box, fill=jitter)
    elif shape == "triangle":
        d.polygon([(cx, cy - s / 2), (cx - s / 2, cy + s / 2), (cx + s / 2, cy + s / 2)], fill=jitter)
    elif shape == "cross":
        w = s / 5
        d.rectangle([cx - w, box[1], cx + w, box[3]], fill=jitter)
        d.rectangle([box[0], cy - w, box[2], cy + w], fill=jitter)
    elif shape == "bar":
        d.rectangle([box[0], cy - s / 6, box[2], cy + s / 6], fill=jitter)
    elif shape == "ring":
        d.ellipse(box, outline=jitter, width=max(2, int(s / 6)))
    else:  # pragma: no cover
        raise ValueError(shape)
    return im


def make_image_folder(root, classes: Sequence[Tuple[str, Tuple[int, int, int], str]],
                      per_class: int, size: int = 32, seed: int = 0) -> Path:
    """An ImageFolder of drawn shapes: ``root/<class>/<i>.png``."""
    root = Path(root)
    g = torch.Generator().manual_seed(seed)
    for folder, colour, shape in classes:
        (root / folder).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            _draw(colour, shape, size, g).save(root / folder / f"{i:03d}.png")
    return root


def make_datasets(data_dir, train_per_class: int = 12, val_per_class: int = 8,
                  seed: int = 0) -> Dict[str, Dict[str, Path]]:
    out = {}
    for k, (name, classes) in enumerate(DATASETS.items()):
        out[name] = {
            "train": make_image_folder(Path(data_dir) / name / "train", classes, train_per_class,
                                       seed=seed * 1000 + 2 * k),
            "val": make_image_folder(Path(data_dir) / name / "val", classes, val_per_class,
                                     seed=seed * 1000 + 2 * k + 1),
        }
    return out


def finetune_visual(model, train_dir, *, steps: int = 40, lr: float = 2e-3, batch_size: int = 16,
                    seed: int = 0) -> None:
    """Fine-tune ``model.visual`` in place on an ImageFolder against its zero-shot head (text
    tower frozen), with AdamW: the way the task-vector papers make their checkpoints, in small."""
    from . import data as D
    from .model import get_templates, get_tokenizer, logit_scale, zero_shot_head

    classes, samples = D.scan_image_folder(train_dir, "train")
    head = zero_shot_head(model, get_tokenizer(MODEL_NAME), D.classnames_from_folders(classes),
                          get_templates(TEMPLATES), "cpu")
    pre = D.model_preprocess(model)
    ds = D.ImageDataset(samples, [pre.eval])
    xs = torch.stack([ds[i][0] for i in range(len(ds))])
    ys = torch.tensor([s[1] for s in samples])
    scale = logit_scale(model)
    params = [p for p in model.visual.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(xs), (batch_size,), generator=g)
        feats = F.normalize(model.visual(xs[idx]), dim=-1)
        loss = F.cross_entropy(scale * feats @ head, ys[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)


def _save(model, path) -> Path:
    from .._io import atomic_save_safetensors

    atomic_save_safetensors({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(path))
    return Path(path)


def make_demo(directory, *, seed: int = 0, train_per_class: int = 12, val_per_class: int = 8,
              finetune_steps: int = 40) -> Dict[str, object]:
    """Write the whole toy setup into ``directory``; returns the paths."""
    import time

    import atlas_kernels as ak

    from .model import build_model, register_model_config

    t0 = time.perf_counter()

    def stage(what):  # progress on stderr: the demo takes minutes on a small CPU
        print(f"[toy {time.perf_counter() - t0:5.0f} s] {what}", file=sys.stderr, flush=True)

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    stage(f"writing the model config and the data into {d}")
    cfg_path = write_model_config(d)
    register_model_config(cfg_path)
    data = make_datasets(d / "data", train_per_class, val_per_class, seed)
    base = build_model(MODEL_NAME, seed=seed)
    pre_path = _save(base, d / "pretrained.safetensors")
    ft_paths = []
    for k, name in enumerate(DATASETS):
        stage(f"fine-tuning the image tower on {name!r} ({k + 1} of {len(DATASETS)}, {finetune_steps} steps)")
        m = build_model(MODEL_NAME, str(pre_path))
        with torch.random.fork_rng(devices=[]):
            finetune_visual(m, data[name]["train"], steps=finetune_steps, seed=seed + k)
        ft_paths.append(_save(m, d / f"finetuned_{name}.safetensors"))
    tvs = ak.TaskVectors.from_checkpoints(str(pre_path), [str(p) for p in ft_paths],
                                          names=list(DATASETS), prefix="visual.")
    tvs.save(str(d / "tvs.safetensors"))
    stage("done")
    return {"dir": d, "model_config": cfg_path, "data": data, "pretrained": pre_path,
            "finetuned": ft_paths, "task_vectors": d / "tvs.safetensors"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m atlas_kernels.train.toy",
                                description="Write a tiny offline aTLAS setup (model config, data, "
                                "checkpoints, task vectors) into DIR.")
    p.add_argument("dir")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    r = make_demo(a.dir, seed=a.seed)
    d = r["dir"]
    print(f"wrote {d}: {r['model_config'].name}, data/shapes, data/colours, "
          f"pretrained.safetensors, finetuned_*.safetensors, tvs.safetensors")
    print("next:\n  python -m atlas_kernels.train --objective fewshot "
          f"--model-config {r['model_config']} --weights {r['pretrained']} "
          f"--task-vectors {r['task_vectors']} --templates photo --train {d}/data/shapes/train "
          f"--val {d}/data/shapes/val --shots 8 --epochs 10 --batch-size 12 --lr 0.05 "
          f"--out runs/fewshot")  # the README's command, word for word for DIR = demo
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
