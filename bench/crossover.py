"""Where the fused small-M linear stops paying: the measurement behind ``fused_max_m``'s default.

For each linear-block shape and row count M, times one forward + backward of the Triton backend's
composed linear layer both ways, in the same run:

- ``fused``: W built tile by tile inside the GEMMs (``fused_linear`` / ``fused_linear_dx``);
- ``compose``: W composed once (``compose``), then cuBLAS for ``y`` and ``dx``;

(the coefficient gradient, ``linear_coef_grad``, is the same kernel in both). Prints, per shape,
the largest M at which ``fused`` is still faster, and the value to give ``patch(...,
fused_linear=True, fused_max_m=...)`` (the smallest of those over the shapes; the default is
``atlas_kernels.ops.triton_backend.FUSED_MAX_M``). The run stops after ``--seconds`` (default 40:
one stage of .ci/gpu.sh; a cold Triton cache spends most of it compiling and autotuning).

    python -m bench.crossover                       # GPU: ViT-B/32 MLP block shapes, N = 21, bf16
    python -m bench.crossover --n 8 --m 1,16,64,256 --shapes 3072x768
    python -m bench.crossover --smoke               # CPU interpreter, tiny shapes: checks it runs

Rows go to ``bench/results/<date>-<device>-crossover.jsonl`` (``--out``).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

from atlas_kernels._io import atomic_append_line


def _parse_shapes(text):
    out = []
    for item in text.split(","):
        o, i = item.lower().split("x")
        out.append((int(o), int(i)))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.crossover", description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=21, help="task vectors (default 21)")
    ap.add_argument("--shapes", default="3072x768,768x3072",
                    help="OUTxIN linear blocks (default: the ViT-B/32 MLP; e.g. add 2304x768,4096x1024)")
    ap.add_argument("--m", default="1,16,64,256", help="row counts")
    ap.add_argument("--seconds", type=float, default=40.0, help="stop starting new rows after this long")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--storage", default="float16", help="task-vector storage dtype (default float16)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes in Triton's interpreter (CPU)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        args.shapes, args.m, args.n, args.reps, args.dtype = "48x40", "2,80", 2, 1, "float32"

    import torch

    from atlas_kernels.blocks import Block
    from atlas_kernels.ops import triton_backend as tb
    from atlas_kernels.partitions import Partition

    from . import env

    dev = torch.device("cuda") if torch.cuda.is_available() and not args.smoke else torch.device("cpu")
    if dev.type == "cpu" and not args.smoke:
        print("no GPU: the crossover is a GPU measurement (use --smoke to check the script runs)")
        return 2
    dtype = getattr(torch, args.dtype)
    sdtype = getattr(torch, args.storage)
    shapes = _parse_shapes(args.shapes)
    ms = [int(v) for v in args.m.split(",")]
    name = env.device_name(dev)
    out = args.out or str(env.RESULTS_DIR / f"{env.today()}-{env.slug(name)}-crossover.jsonl")
    os.makedirs(os.path.dirname(out), exist_ok=True)

    def timed(fn):
        fn()
        if dev.type == "cuda":
            from triton.testing import do_bench

            return float(do_bench(fn, warmup=5, rep=args.reps, return_mode="median"))
        times = []
        for _ in range(max(1, args.reps)):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
        return statistics.median(times)

    g = torch.Generator(device="cpu").manual_seed(0)
    best = {}
    t_end = time.time() + args.seconds
    # rows are appended one by one, atomically (a killed run never leaves half a line)
    for o, i in shapes:
        w0 = (torch.randn(o, i, generator=g) * 0.02).to(dev, dtype)
        tau = (torch.randn(args.n, o, i, generator=g) * 1e-3).to(dev, sdtype)
        coef = torch.full((args.n,), 0.1, device=dev, requires_grad=True)
        block = Block(w0, tau, coef, Partition(1))
        last_fused_win = 0
        for m in ms:
            if time.time() > t_end:
                print(f"out of time (--seconds {args.seconds:g}): {o}x{i} from M={m} on not measured", flush=True)
                break
            x = torch.randn(m, i, generator=g).to(dev, dtype).requires_grad_(True)
            dy = torch.randn(m, o, generator=g).to(dev, dtype)
            row = {}
            for path, thr in (("fused", 1 << 30), ("compose", 0)):
                def step(thr=thr):
                    y = tb.BACKEND.linear(x, block, fused_max_m=thr)
                    y.backward(dy)
                row[path] = timed(step)
            win = row["fused"] < row["compose"]
            if win:
                last_fused_win = m
            rec = {"date": env.today(), "device": name, "torch": torch.__version__,
                   "triton": env.triton_version(), "atlas_kernels": env.git_commit(),
                   "shape": [o, i], "n_task_vectors": args.n, "m": m, "dtype": args.dtype,
                   "storage": args.storage, "fused_ms": row["fused"], "compose_ms": row["compose"],
                   "fused_wins": win}
            atomic_append_line(out, json.dumps(rec))
            print(f"{o:5d}x{i:<5d} N={args.n} M={m:5d}: fused {row['fused']:8.3f} ms, "
                  f"compose {row['compose']:8.3f} ms -> {'fused' if win else 'compose'}", flush=True)
        best[(o, i)] = last_fused_win
    print("largest M where fused wins, per shape:", {f"{o}x{i}": m for (o, i), m in best.items()})
    if best:
        print(f"suggested fused_max_m = {min(best.values())} (default {tb.FUSED_MAX_M}); rows: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
