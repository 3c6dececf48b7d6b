"""The grouped kernels at bandwidth? ``python -m bench.group_kernels`` (GPU).

Patches an open_clip image tower (default ViT-B/32, every block, N = 21 task vectors in fp16) on
the Triton backend and times its plan's two passes alone, with CUDA events (medians):

- ``compose``: ``kernels.compose_group`` (one launch, every block; outputs in bf16 for the linear
  layers' blocks and fp32 for the rest, as under bf16 autocast);
- ``coef_grad``: ``kernels.coef_grad_group`` (two launches) on gradients laid out as those outputs.

Bytes per pass: the slabs (and scales), plus theta0 and the outputs (compose) or the gradients
(coef_grad). Each is reported as GB/s and as time / (bytes / copy bandwidth), the copy bandwidth
measured in the same run (a 1 GiB device-to-device copy, bytes read + written). The issue's goal:
at most 1.3. ``--sweep`` times every (elements per program, warps) pair and prints the best.
Rows go to ``--out`` (JSONL).

    python -m bench.group_kernels
    python -m bench.group_kernels --sweep --out bench/results/group-kernels.jsonl
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.group_kernels", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--n", type=int, default=21)
    ap.add_argument("--storage", default="float16")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--sweep", action="store_true", help="time BLOCK in 2048/4096/8192 x warps 4/8")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("no GPU: the grouped kernels' bandwidth is a GPU measurement")
        return 2
    import atlas_kernels as ak
    from atlas_kernels import kernels
    from atlas_kernels.kernels import _group
    from atlas_kernels.plan import plan_of

    from . import env
    from .towers import build_visual

    dev = torch.device("cuda")

    def cuda_ms(fn):
        fn()
        torch.cuda.synchronize()
        ts = []
        for _ in range(args.reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            ts.append(a.elapsed_time(b))
        return statistics.median(ts)

    def copy_bandwidth():
        src = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
        dst = torch.empty_like(src)
        return 2 * src.numel() / cuda_ms(lambda: dst.copy_(src)) / 1e6

    copy_gbps = copy_bandwidth()

    visual = build_visual(args.model, 0).to(dev)
    g = torch.Generator(device="cpu").manual_seed(0)
    sdt = getattr(torch, args.storage)
    tvs = ak.TaskVectors({k: (torch.randn((args.n, *p.shape), generator=g) * 1e-3).to(dev, sdt)
                          for k, p in visual.named_parameters()})
    ak.patch(visual, tvs, backend="triton")
    group = plan_of(visual).groups[0]
    sizes = group.sizes
    tau_bytes = sum(e.tau.numel() * e.tau.element_size() + (0 if e.scale is None else e.scale.numel() * 4)
                    for e in group.entries)
    theta_bytes = sum(e.theta0.numel() * e.theta0.element_size() for e in group.entries)
    out_bytes = sizes[0] * 2 + sizes[1] * 4
    outs = [torch.empty(sizes[0], dtype=torch.bfloat16, device=dev), torch.empty(sizes[1], device=dev)]
    grads = [torch.randn(sizes[0], device=dev).bfloat16(), torch.randn(sizes[1], device=dev)]
    rows = []
    blocks = (2048, 4096, 8192) if args.sweep else (_group.GROUP_BLOCK,)
    warps = (4, 8) if args.sweep else (_group.GROUP_WARPS,)
    print(f"{args.model}: {len(group)} blocks, {sizes[0] + sizes[1]:,} elements, N = {args.n} {args.storage}; "
          f"slabs {tau_bytes / 1e9:.2f} GB; copy {copy_gbps:.0f} GB/s")
    for block in blocks:
        segs = [dict(theta0=e.theta0, tau=e.tau, scale=e.scale, coef=e.coef, index=e.rows,
                     k=e.partition.encoding()[0], mode=e.partition.encoding()[1], key=e.partition.encoding()[2],
                     sel=e.sel, out_off=e.out_off, coef_off=e.coef_off) for e in group.entries]
        table = kernels.group_table(segs, dev, block=block)
        for w in warps:
            t_c = cuda_ms(lambda: kernels.compose_group(table, outs, group.scaled, num_warps=w))
            t_g = cuda_ms(lambda: kernels.coef_grad_group(table, grads, group.scaled, num_warps=w))
            c_bytes = tau_bytes + theta_bytes + out_bytes
            g_bytes = tau_bytes + out_bytes
            row = {"date": env.today(), "device": env.device_name(dev), "torch": torch.__version__,
                   "triton": env.triton_version(), "atlas_kernels": env.git_commit(), "model": args.model,
                   "n_task_vectors": args.n, "storage": args.storage, "block": block, "num_warps": w,
                   "copy_gbps": copy_gbps, "compose_ms": t_c, "coef_grad_ms": t_g,
                   "compose_gbps": c_bytes / t_c / 1e6, "coef_grad_gbps": g_bytes / t_g / 1e6,
                   "compose_vs_copy": t_c / (c_bytes / copy_gbps / 1e6),
                   "coef_grad_vs_copy": t_g / (g_bytes / copy_gbps / 1e6)}
            rows.append(row)
            print(f"BLOCK {block:5d} warps {w}: compose {t_c:.3f} ms ({row['compose_gbps']:.0f} GB/s, "
                  f"{row['compose_vs_copy']:.2f}x copy)  coef_grad {t_g:.3f} ms ({row['coef_grad_gbps']:.0f} GB/s, "
                  f"{row['coef_grad_vs_copy']:.2f}x copy)", flush=True)
    best = min(rows, key=lambda r: r["compose_ms"] + r["coef_grad_ms"])
    print(f"best: BLOCK {best['block']}, {best['num_warps']} warps: {best['compose_ms'] + best['coef_grad_ms']:.3f} ms "
          f"for both passes ({best['compose_vs_copy']:.2f}x and {best['coef_grad_vs_copy']:.2f}x copy)")
    if args.out:
        from atlas_kernels._io import atomic_append_line

        for r in rows:
            atomic_append_line(args.out, json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
