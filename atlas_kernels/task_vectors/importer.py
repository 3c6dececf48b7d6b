"""``python -m atlas_kernels.task_vectors import ROOT --model NAME --out tvs.safetensors``.

Reads a whole folder of published task-vector checkpoints, without running code from them, in
either layout:

- task_vectors: ``ROOT/zeroshot.pt`` and ``ROOT/<Dataset>/finetuned.pt`` (heads ``ROOT/head_<Dataset>.pt``);
- the aTLAS paper's code: ``ROOT/<Dataset>Val/{zeroshot,finetuned}.pt`` and ``ROOT/head_<Dataset>Val.pt``;
- linearised checkpoints ``linear_zeroshot.pt`` / ``linear_finetuned.pt`` beside them are imported
  into a second file when the linearised support is installed, else named as skipped.

Every dataset's image tower is checked against the open_clip model ``--model`` (names and shapes),
one line per dataset gives the task vector's norm and size, and two datasets with identical task
vectors are reported (one published set has a mislabelled checkpoint).
"""
from __future__ import annotations

import os
import sys
from typing import Dict, List, Optional

import torch

from ..checkpoints import dropped_note, linearised_formats, load_head, load_state_dict_file, save_head, select_tower

_EXTS = (".pt", ".pth", ".safetensors")


def _file(folder: str, stem: str) -> Optional[str]:
    for ext in _EXTS:
        p = os.path.join(folder, stem + ext)
        if os.path.isfile(p):
            return p
    return None


def discover(root: str) -> List[Dict[str, Optional[str]]]:
    """One entry per dataset folder: name (``Val`` suffix dropped), folder, finetuned, zeroshot
    (its own or ``ROOT``'s), head, linear_finetuned, linear_zeroshot."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"checkpoint folder {root!r} does not exist")
    out = []
    for d in sorted(os.listdir(root)):
        folder = os.path.join(root, d)
        if not os.path.isdir(folder):
            continue
        ft, lft = _file(folder, "finetuned"), _file(folder, "linear_finetuned")
        if ft is None and lft is None:
            continue
        name = d[:-3] if d.endswith("Val") and len(d) > 3 else d
        head = _file(root, f"head_{d}") or _file(root, f"head_{name}") or _file(folder, f"head_{d}") \
            or _file(folder, f"head_{name}")
        out.append({"name": name, "folder": d, "finetuned": ft,
                    "zeroshot": _file(folder, "zeroshot") or _file(root, "zeroshot"),
                    "head": head, "linear_finetuned": lft,
                    "linear_zeroshot": _file(folder, "linear_zeroshot") or _file(root, "linear_zeroshot")})
    if not out:
        raise ValueError(f"no dataset folders in {root!r}: expected ROOT/<Dataset>/finetuned.pt (task_vectors) "
                         f"or ROOT/<Dataset>Val/finetuned.pt (the aTLAS code)")
    return out


def pick(entries, wanted: Optional[List[str]]):
    if not wanted:
        return entries
    by = {}
    for e in entries:
        by[e["name"].lower()] = by[e["folder"].lower()] = e
    missing = [w for w in wanted if w.lower() not in by]
    if missing:
        raise ValueError(f"--datasets: no checkpoint folder for {missing}; found "
                         f"{', '.join(e['name'] for e in entries)}")
    return [by[w.lower()] for w in wanted]


def expected_shapes(model: str) -> Dict[str, torch.Size]:
    """Floating tensors of ``open_clip.create_model(model).visual`` (built on the meta device)."""
    import logging

    import open_clip

    if model not in open_clip.list_models():
        raise ValueError(f"--model: unknown open_clip model {model!r}")
    level = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        try:
            with torch.device("meta"):
                m = open_clip.create_model(model, pretrained=None, device="meta")
        except Exception:  # pragma: no cover - a model that cannot be built on meta
            m = open_clip.create_model(model, pretrained=None)
    finally:
        logging.disable(level)
    return {k: v.shape for k, v in m.visual.state_dict().items() if v.is_floating_point()}


def check_tower(sd, shapes, model, label) -> None:
    got = {k: v for k, v in sd.items() if v.is_floating_point()}
    missing = [k for k in shapes if k not in got]
    extra = [k for k in got if k not in shapes]
    bad = [(k, tuple(got[k].shape), tuple(shapes[k])) for k in shapes if k in got and got[k].shape != shapes[k]]
    if missing or extra or bad:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[:3]})")
        if extra:
            parts.append(f"{len(extra)} unexpected (e.g. {extra[:3]})")
        if bad:
            parts.append(f"{len(bad)} of another shape (e.g. {bad[0][0]!r}: {bad[0][1]}, the model has {bad[0][2]})")
        raise ValueError(f"{label}: the image tower does not fit open_clip {model!r}: " + "; ".join(parts)
                         + " (check --model)")


class _Finetuned:
    """The fine-tuned towers, read one at a time; a dataset whose own zero-shot checkpoint differs
    from the shared pre-trained one gets ``theta0 + (finetuned - its zeroshot)``."""

    def __init__(self, entries, key, prefix, shapes, model, pre, pre_path, bar, out):
        self.entries, self.key, self.prefix, self.shapes, self.model = entries, key, prefix, shapes, model
        self.pre, self.pre_path, self.bar, self.out = pre, pre_path, bar, out

    def __len__(self):
        return len(self.entries)

    def _tower(self, path):
        sd = select_tower(load_state_dict_file(path), self.prefix, path)[0]
        check_tower(sd, self.shapes, self.model, path)
        return sd

    def __getitem__(self, i):
        e = self.entries[i]
        ft = self._tower(e[self.key])
        zs_path = e[self.key.replace("finetuned", "zeroshot")]
        if zs_path and os.path.abspath(zs_path) != os.path.abspath(self.pre_path):
            zs = self._tower(zs_path)
            if any(not torch.equal(zs[k], self.pre[k]) for k in self.pre):
                self.bar.write(f"warning: {zs_path} differs from {self.pre_path}; the task vector of "
                               f"{e['name']} is taken against its own zero-shot checkpoint", file=self.out)
                ft = {k: (self.pre[k].float() + (ft[k].float() - zs[k].float())) if k in self.pre else v
                      for k, v in ft.items()}
        self.bar.update(1)
        return ft


def build(entries, key, *, model, prefix, storage, out, label="task vectors"):
    """TaskVectors from the ``key`` (``finetuned`` / ``linear_finetuned``) files of ``entries``."""
    from tqdm.auto import tqdm

    from .builders import build as build_task_vectors
    from .core import TaskVectors

    shapes = expected_shapes(model)
    zkey = key.replace("finetuned", "zeroshot")
    pre_path = next((e[zkey] for e in entries if e[zkey]), None)
    if pre_path is None:
        raise ValueError(f"no {zkey}.pt for {label} (looked in every dataset folder and in ROOT)")
    pre, dropped, used = select_tower(load_state_dict_file(pre_path), prefix, pre_path)
    check_tower(pre, shapes, model, pre_path)
    if dropped:
        print(f"{pre_path}: {dropped_note(dropped, used)}", file=out)
    with tqdm(total=len(entries), desc=f"reading {label}", unit="ckpt", file=sys.stderr,
              disable=None) as bar:
        lazy = _Finetuned(entries, key, prefix, shapes, model, pre, pre_path, bar, out)
        return build_task_vectors(TaskVectors, pre, lazy, [e["name"] for e in entries], None, storage,
                                  labels=[e[key] for e in entries])


def report(tvs, out) -> None:
    """One line per task vector (norm, bytes); a warning for each pair of identical ones."""
    n = len(tvs)
    sq = [0.0] * n
    size = [0] * n
    for b in tvs.blocks:
        slab = tvs[b]
        sc = tvs.scale(b)
        if sc is None:
            x = slab.reshape(n, -1).float()
            rows = (x * x).sum(dim=1, dtype=torch.float64).tolist()
        else:
            rows = [float(tvs.dense(b, i).double().pow(2).sum()) for i in range(n)]
        for i in range(n):
            sq[i] += rows[i]
            size[i] += slab[i].numel() * slab.element_size() + (0 if sc is None else sc[i].numel() * 4)
    for i, name in enumerate(tvs.names):
        print(f"  {name:<16} |tau| = {sq[i] ** 0.5:.6g}   {size[i] / 2**20:.1f} MiB ({tvs.storage})", file=out)
    for i in range(n):
        for j in range(i + 1, n):
            if sq[i] == sq[j] and all(torch.equal(tvs[b][i], tvs[b][j]) for b in tvs.blocks):
                print(f"warning: the task vectors of {tvs.names[i]} and {tvs.names[j]} are identical "
                      f"(a mislabelled or duplicated checkpoint?)", file=out)


def linear_out_path(out: str) -> str:
    stem, ext = os.path.splitext(out)
    return f"{stem}.linear{ext or '.safetensors'}"


def run_import(args, out) -> int:
    if args.model_config:
        import open_clip

        if not os.path.isfile(args.model_config):
            raise FileNotFoundError(f"--model-config {args.model_config!r} does not exist")
        open_clip.add_model_config(args.model_config)
        args.model = args.model or os.path.splitext(os.path.basename(args.model_config))[0]
    if not args.model:
        raise ValueError("give the open_clip model the checkpoints belong to: --model NAME (or --model-config)")
    entries = pick(discover(args.root), args.datasets)
    plain = [e for e in entries if e["finetuned"]]
    linear = [e for e in entries if e["linear_finetuned"]]
    if not plain and not linear:  # pragma: no cover - discover() never returns such entries
        raise ValueError(f"no checkpoints in {args.root!r}")
    written = []
    if plain:
        tvs = build(plain, "finetuned", model=args.model, prefix=args.prefix, storage=args.storage, out=out)
        report(tvs, out)
        tvs.save(args.out)
        written.append(args.out)
        print(f"wrote {args.out}: {len(tvs)} task vectors, {len(tvs.blocks)} blocks, "
              f"{tvs.nbytes / 2**20:.1f} MiB", file=out)
    if linear:
        lin_ckpt = linearised_formats()
        files = [e["linear_finetuned"] for e in linear] + sorted({e["linear_zeroshot"] for e in linear
                                                                 if e["linear_zeroshot"]})
        if lin_ckpt is None:
            print(f"skipped {len(files)} linearised checkpoint(s) (this install has no linearised "
                  f"support): {', '.join(files)}", file=out)
        else:
            zs = next((e["linear_zeroshot"] for e in linear if e["linear_zeroshot"]), None)
            # The positional format is recognised (and named, shape-checked) by load_state_dict_file,
            # which from_checkpoints reads through: its output is already a named state dict.
            if zs is None:
                raise ValueError(f"linearised checkpoints without a linear_zeroshot.pt: {files}")
            from .core import TaskVectors

            ltv = TaskVectors.from_checkpoints(zs, [e["linear_finetuned"] for e in linear],
                                               names=[e["name"] for e in linear], prefix=args.prefix,
                                               storage=args.storage)
            report(ltv, out)
            path = linear_out_path(args.out)
            ltv.save(path)
            written.append(path)
            print(f"wrote {path}: {len(ltv)} linearised task vectors", file=out)
    if args.heads:
        os.makedirs(args.heads, exist_ok=True)
        no_head = [e["name"] for e in entries if not e["head"]]
        shapes = expected_shapes(args.model)
        dim = shapes["proj"][1] if "proj" in shapes else (
            shapes["attnpool.c_proj.weight"][0] if "attnpool.c_proj.weight" in shapes else None)
        for e in entries:
            if e["head"]:
                h = load_head(e["head"])
                if dim is not None and h.weight.shape[1] != dim:
                    raise ValueError(f"{e['head']}: head takes {h.weight.shape[1]} features, open_clip "
                                     f"{args.model!r} gives {dim} (check --model)")
                dst = os.path.join(args.heads, f"head_{e['name']}.safetensors")
                save_head(h, dst)
                print(f"  head {e['name']}: {h.weight.shape[0]} classes x {h.weight.shape[1]} features, "
                      f"normalize={h.normalize} -> {dst}", file=out)
        if no_head:
            print(f"no head file for: {', '.join(no_head)}", file=out)
    return 0
