"""The error each task-vector storage adds, on real-sized blocks (produces docs/STORAGE_ERROR.md's tables).

    python -m bench.storage_error              # full run (CPU, about a minute), markdown to stdout
    python -m bench.storage_error --quick      # small shapes, seconds
    python -m bench.storage_error --json out.json

Uses the library's own storage path (``atlas_kernels.task_vectors.quantize`` then
``dequantize_one``), so the numbers describe what the kernels read. For each block shape (ViT-B/32
and ViT-L/14 matrices, ``[out, in]``, one scale per row), each distribution and each storage:

- ``rel_fro``: ``||deq(q(tau)) - tau||_F / ||tau||_F``, mean over the N task vectors;
- ``max_rowmax``: ``max |deq(q(tau)) - tau| / max |tau|`` within a row, worst row of all N;
- ``rel_dW``: the composed update ``dW = sum_i lam_i tau_i`` (N = 21, ``lam ~ U(0, 0.3)``) from the
  stored task vectors against the float32 ones, ``||dW_q - dW|| / ||dW||`` (equal to the error of
  ``W = theta0 + dW``, measured relative to the update);
- ``rel_W``: the same error relative to ``||W||`` with ``theta0 ~ N(0, 0.02^2)``.

Reference row ``W->bf16``: the rounding of the composed weight itself to bfloat16 (what the
compose kernel hands a bf16 matmul), for scale.

Task vectors: ``normal`` (std 1e-3) and ``student-t`` (3 degrees of freedom, std 1e-3: heavy tails,
a few large entries per row set the per-row scale). Composition is done in float64 so only the
storage error is measured. Deterministic: one seeded ``torch.Generator``.
"""
from __future__ import annotations

import argparse
import math
import sys
import time

import torch

from atlas_kernels._io import atomic_write_json
from atlas_kernels.task_vectors import TaskVectors, dequantize_one, quantize

SHAPES = [  # (out, in): ViT-B/32 attention out_proj, c_fc, c_proj; ViT-L/14 c_fc
    (768, 768), (3072, 768), (768, 3072), (4096, 1024),
]
QUICK_SHAPES = [(96, 96), (384, 96)]
STORAGES = ["bfloat16", "float16", "int8", "float8_e4m3fn"]
DISTS = ["normal", "student-t"]
TAU_STD = 1e-3
THETA_STD = 0.02
DF = 3
N = 21
LAM_HI = 0.3


def draw(shape, dist: str, gen: torch.Generator) -> torch.Tensor:
    """A float32 task vector with std TAU_STD."""
    z = torch.randn(shape, generator=gen, dtype=torch.float32)
    if dist == "normal":
        return z * TAU_STD
    # Student-t with DF degrees of freedom: z / sqrt(chi2_DF / DF), variance DF / (DF - 2).
    chi2 = torch.zeros(shape, dtype=torch.float32)
    for _ in range(DF):
        chi2 += torch.randn(shape, generator=gen, dtype=torch.float32) ** 2
    t = z / torch.sqrt(chi2 / DF)
    return t * (TAU_STD / math.sqrt(DF / (DF - 2)))


def measure(shape, dist: str, n: int, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    theta0 = torch.randn(shape, generator=gen, dtype=torch.float64) * THETA_STD
    lam = torch.rand(n, generator=gen, dtype=torch.float64) * LAM_HI
    ref = torch.zeros(shape, dtype=torch.float64)
    acc = {s: torch.zeros(shape, dtype=torch.float64) for s in STORAGES}
    fro = {s: 0.0 for s in STORAGES}
    worst = {s: 0.0 for s in STORAGES}
    for i in range(n):
        tau = draw(shape, dist, gen)
        ref += lam[i] * tau.double()
        rowmax = tau.abs().amax(dim=1).double()
        for s in STORAGES:
            data, scale = quantize(tau, s)
            deq = dequantize_one(data, scale)
            err = (deq.double() - tau.double())
            fro[s] += (err.norm() / tau.double().norm()).item() / n
            worst[s] = max(worst[s], (err.abs().amax(dim=1) / rowmax).max().item())
            acc[s] += lam[i] * deq.double()
    w = theta0 + ref
    out = {"shape": list(shape), "dist": dist, "n": n, "rows": {}}
    for s in STORAGES:
        e = (acc[s] - ref).norm()
        out["rows"][s] = {"rel_fro": fro[s], "max_rowmax": worst[s],
                          "rel_dW": (e / ref.norm()).item(), "rel_W": (e / w.norm()).item()}
    e = (w.to(torch.bfloat16).double() - w).norm()
    out["rows"]["W->bf16"] = {"rel_fro": None, "max_rowmax": None,
                              "rel_dW": (e / ref.norm()).item(), "rel_W": (e / w.norm()).item()}
    return out


def nbytes_rows(shapes) -> list:
    """Bytes of one task vector of each shape in each storage (TaskVectors.nbytes: slab + scales)."""
    rows = []
    for shape in shapes:
        row = {"shape": list(shape)}
        for s in ["float32"] + STORAGES:
            tau = torch.zeros((1, *shape), dtype=torch.float32)
            data, scale = quantize(tau[0], s)
            tv = TaskVectors({"w": data[None]}, scales=None if scale is None else {"w": scale[None]})
            row[s] = tv.nbytes
        rows.append(row)
    return rows


def tower_rows(n: int) -> list:
    """Whole image towers (every floating parameter adapted), N task vectors, via the planner's count."""
    try:
        import open_clip
        from open_clip.model import CLIPVisionCfg, _build_vision_tower
    except Exception:  # pragma: no cover - open_clip missing
        return []
    from atlas_kernels.planner import estimate_memory

    rows = []
    for name in ("ViT-B-32", "ViT-L-14"):
        cfg = open_clip.get_model_config(name)
        with torch.device("meta"):
            tower = _build_vision_tower(cfg["embed_dim"], CLIPVisionCfg(**cfg["vision_cfg"]))
        row = {"model": name, "n": n, "params": sum(p.numel() for p in tower.parameters())}
        for s in ["float32"] + STORAGES:
            row[s] = estimate_memory(tower, (n, s), 1).task_vectors
        rows.append(row)
    return rows


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.2e}"


def markdown(results, nb, towers) -> str:
    out = []
    for dist in DISTS:
        dof = ', 3 degrees of freedom' if dist != 'normal' else ''
        out.append(f"\n**{dist}** task vectors (std {TAU_STD:g}{dof}), "
                   f"N = {results[0]['n']}, lam ~ U(0, {LAM_HI}):\n")
        out.append("| shape (out x in) | storage | rel. Frobenius error of tau | max abs error / row max "
                   "| composed dW rel. error | composed W rel. error |")
        out.append("|---|---|---|---|---|---|")
        for r in results:
            if r["dist"] != dist:
                continue
            shp = f"{r['shape'][0]} x {r['shape'][1]}"
            for s, m in r["rows"].items():
                label = s if s != "W->bf16" else "*W rounded to bf16 (ref.)*"
                out.append(f"| {shp} | {label} | {_fmt(m['rel_fro'])} | {_fmt(m['max_rowmax'])} | "
                           f"{_fmt(m['rel_dW'])} | {_fmt(m['rel_W'])} |")
    out.append("\nBytes per task vector (`TaskVectors.nbytes`: slab + float32 per-row scales), "
               "and the ratio to float32:\n")
    out.append("| shape (out x in) | float32 | bfloat16 | float16 | int8 | float8_e4m3fn | int8 / float32 |")
    out.append("|---|---|---|---|---|---|---|")
    for r in nb:
        shp = f"{r['shape'][0]} x {r['shape'][1]}"
        cells = " | ".join(f"{r[s]:,}" for s in ["float32"] + STORAGES)
        out.append(f"| {shp} | {cells} | {r['int8'] / r['float32']:.2%} |")
    if towers:
        out.append(f"\nWhole image towers, every floating parameter adapted, N = {towers[0]['n']} "
                   f"(GiB; int8/fp8 include the scales of every row and of each 1-D block):\n")
        out.append("| tower | parameters | float32 | bfloat16 / float16 | int8 | float8_e4m3fn | int8 / float32 |")
        out.append("|---|---|---|---|---|---|---|")
        for r in towers:
            g = lambda s: f"{r[s] / 2**30:.3f}"  # noqa: E731
            out.append(f"| {r['model']} | {r['params'] / 1e6:.1f}M | {g('float32')} | {g('bfloat16')} | {g('int8')} | "
                       f"{g('float8_e4m3fn')} | {r['int8'] / r['float32']:.2%} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small shapes (a smoke test)")
    ap.add_argument("--n", type=int, default=N, help="task vectors per composition (default 21)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: a shared machine)")
    ap.add_argument("--json", help="also write the raw numbers here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    shapes = QUICK_SHAPES if args.quick else SHAPES
    t0 = time.time()
    results = []
    for j, dist in enumerate(DISTS):
        for k, shape in enumerate(shapes):
            results.append(measure(shape, dist, args.n, args.seed * 1000 + 10 * j + k))
    nb = nbytes_rows(shapes)
    towers = [] if args.quick else tower_rows(args.n)
    print(markdown(results, nb, towers))
    print(f"\n(torch {torch.__version__}, seed {args.seed}, {time.time() - t0:.0f} s on the CPU)")
    if args.json:
        atomic_write_json(args.json, {"errors": results, "nbytes": nb, "towers": towers, "torch": torch.__version__,
                                       "seed": args.seed}, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
