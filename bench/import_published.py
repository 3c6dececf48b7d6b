"""Time ``python -m atlas_kernels.task_vectors import`` on a synthetic published checkpoint set.

    python -m bench.import_published DIR [--model ViT-B-32] [--datasets 8] [--legacy]

Writes (once) DIR/zeroshot.pt and DIR/<Dataset>/finetuned.pt as the task-vector papers did:
``torch.save`` of whole ``src.modeling.ImageEncoder`` modules holding old open_clip classes
(stand-ins from ``atlas_kernels_tests/_published.py``, text transformer deleted, random weights),
then runs the import in a fresh process and prints its wall time and peak RSS (``ru_maxrss`` of
the child) as one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from atlas_kernels._io import atomic_save_safetensors, atomic_write_text

REPO = Path(__file__).resolve().parents[1]
NAMES = ["Cars", "DTD", "EuroSAT", "GTSRB", "MNIST", "RESISC45", "SUN397", "SVHN", "CIFAR10", "CIFAR100",
         "Flowers102", "Food101", "FER2013", "OxfordIIITPet", "PCAM", "STL10", "Caltech101", "Country211",
         "FGVCAircraft", "KMNIST", "EMNIST", "RenderedSST2"]


def make_set(root: Path, model: str, n: int, legacy: bool) -> None:
    import open_clip
    import torch

    done = root / ".complete"
    if done.exists() and json.loads(done.read_text()) == {"model": model, "n": n, "legacy": legacy}:
        return
    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    m = open_clip.create_model(model, pretrained=None)
    pre = {k: v.detach().contiguous() for k, v in m.state_dict().items() if not k.startswith("transformer.")}
    del m
    tmp = root / "_sds"
    tmp.mkdir(exist_ok=True)
    files = []
    atomic_save_safetensors(pre, tmp / "pre.safetensors")
    files.append({"sd": str(tmp / "pre.safetensors"), "out": str(root / "zeroshot.pt"), "kind": "encoder",
                  "legacy": legacy})
    for i, name in enumerate(NAMES[:n]):
        g = torch.Generator().manual_seed(i + 1)
        ft = {k: (v + 1e-3 * torch.randn(v.shape, generator=g) if k.startswith("visual.") else v)
              for k, v in pre.items()}
        p = tmp / f"{name}.safetensors"
        atomic_save_safetensors(ft, p)
        files.append({"sd": str(p), "out": str(root / name / "finetuned.pt"), "kind": "encoder", "legacy": legacy})
        del ft
    job = tmp / "job.json"
    atomic_write_text(job, json.dumps({"files": files}))
    subprocess.run([sys.executable, str(REPO / "atlas_kernels_tests" / "_published.py"), str(tmp / "pkgs"),
                    str(job)], check=True, cwd=str(tmp))
    for f in files:
        os.unlink(f["sd"])
    atomic_write_text(done, json.dumps({"model": model, "n": n, "legacy": legacy}))


def _child_peak_rss(proc) -> int:
    """Peak RSS (bytes) of the import process alone: /proc's VmHWM is gone once it exits, so read
    the maximum over children, which holds only this one when the set already existed."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # Linux: KiB


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.import_published", description=__doc__.split("\n\n")[0])
    p.add_argument("root")
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--datasets", type=int, default=8)
    p.add_argument("--storage", default="float32")
    p.add_argument("--legacy", action="store_true", help="write legacy (non-zip) torch files")
    a = p.parse_args(argv)
    root = Path(a.root)
    if not (root / ".complete").exists():  # the writer runs as a child: make the set, then measure afresh
        make_set(root, a.model, a.datasets, a.legacy)
        return subprocess.call([sys.executable, "-m", "bench.import_published"] + list(argv or sys.argv[1:]),
                               cwd=str(REPO))
    out = root / "tvs.safetensors"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "atlas_kernels.task_vectors", "import", str(root), "--model",
                             a.model, "--out", str(out), "--storage", a.storage], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - t0
    if proc.returncode:
        sys.stderr.write(stderr)
        return proc.returncode
    sys.stderr.write(stdout)
    peak = _child_peak_rss(proc)
    ckpt = sum(f.stat().st_size for f in root.rglob("*.pt"))
    print(json.dumps({"model": a.model, "datasets": a.datasets, "legacy": a.legacy, "storage": a.storage,
                      "wall_s": round(wall, 2), "peak_rss_gib": round(peak / 2**30, 2),
                      "checkpoint_gib": round(ckpt / 2**30, 2), "out_gib": round(out.stat().st_size / 2**30, 2)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
