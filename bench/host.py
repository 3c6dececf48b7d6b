"""Host cost of a patched training step, on the CPU: ``python -m bench.host``.

On a GPU the eager step of a patched tower was host-bound (54 ms eager, 25.5 ms graph-replayed, on
the H200): the time went to Python between the kernels. This measures that Python directly, where
kernels cost almost nothing: a ViT-B/32-shaped open_clip image tower (12 layers, patch 32: the same
152 blocks) at a tiny width (16), one thread, batch 2. For each backend that runs on this machine,
a patched step (forward, backward) against the plain tower's step (forward, backward with weight
gradients: the floor), and the patched step with its optimizer step too (fused AdamW over the
coefficients; the floor has no optimizer step), in interleaved rounds (each round times every case
in turn, so a slow spell of a shared machine falls on all of them), medians.

- ``torch`` and ``ext`` (the compiled extension, where it is built) run as they are.
- ``triton`` runs with its kernel launches replaced by no-ops (``atlas_kernels._launches.set_launcher``,
  the one seam every launch goes through): the plan, the autograd wiring and the launchers' own
  Python all run; Triton's launcher and the kernels do not. (On the H200, ``cudaLaunchKernel`` cost
  9 us a call; Triton's Python launcher adds more per launch, times 3 or 4 launches a step.)

Prints, per case: us per step (median of the rounds' medians, and their range), the ratio to the
plain step, the extra us per adapted-block call ((patched - plain) / blocks), and the kernel
launches the library issues per step (``atlas_kernels._launches.count``). ``--out`` appends JSON rows.

    python -m bench.host                      # default: 7 rounds of 30 steps
    python -m bench.host --rounds 3 --steps 10 --backends torch
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time


def _tower():
    """The ViT-B/32 image tower's layout (12 layers, patch 32, 152 parameter blocks) at width 16."""
    import torch
    from open_clip.model import _build_vision_tower

    torch.manual_seed(0)
    vis = _build_vision_tower(16, {"image_size": 64, "layers": 12, "width": 16, "patch_size": 32, "head_width": 8})
    vis.train()
    for p in vis.parameters():
        p.requires_grad_(False)
    return vis


def _stub_launch(kernel, grid, args, kwargs):
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.host", description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=21, help="task vectors (default 21)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=30, help="timed steps per case per round")
    ap.add_argument("--backends", default=None, help="comma list (default: every backend that runs here)")
    ap.add_argument("--out", default=None, help="append one JSON row per case")
    args = ap.parse_args(argv)

    if "TRITON_INTERPRET" not in os.environ:
        os.environ["TRITON_INTERPRET"] = "1"  # Triton's host path on the CPU; its launches are stubbed below
    import torch

    import atlas_kernels as ak
    from atlas_kernels import _launches, ops

    from . import env

    torch.set_num_threads(1)
    cpu = torch.device("cpu")
    names = args.backends.split(",") if args.backends else ["torch", "ext", "triton"]
    backends = [b for b in names if ops.unavailable(b, cpu) is None]
    skipped = [f"{b} ({ops.unavailable(b, cpu)[:80]})" for b in names if b not in backends]
    base = _tower()
    blocks = len(list(base.named_parameters()))
    g = torch.Generator().manual_seed(1)
    tvs = ak.TaskVectors({k: torch.randn((args.n, *p.shape), generator=g) * 1e-3 for k, p in base.named_parameters()})
    x = torch.randn(args.batch, 3, 64, 64, generator=g)

    def plain_step():
        model = copy.deepcopy(base)
        params = [p.requires_grad_(True) for p in model.parameters()]

        def step():
            for p in params:
                p.grad = None
            model(x).float().square().mean().backward()
        return step

    def patched_step(backend, optimizer):
        model = ak.patch(copy.deepcopy(base), tvs, backend=backend)
        coefs = list(ak.coefficients(model).values())
        opt = torch.optim.AdamW(coefs, lr=1e-3, fused=True)

        def step():
            if optimizer:
                opt.zero_grad(set_to_none=True)
            else:
                for c in coefs:
                    c.grad = None
            model(x).float().square().mean().backward()
            if optimizer:
                opt.step()
        return step, model

    cases = {"plain": plain_step()}
    plans, launches = {}, {}
    for b in backends:
        step, model = patched_step(b, False)
        cases[f"atlas:{b}"] = step
        plans[f"atlas:{b}"] = model._atlas_plan_root.summary()
        cases[f"atlas:{b}+adamw"] = patched_step(b, True)[0]
    old = _launches.set_launcher(_stub_launch) if "triton" in backends else None
    try:
        for name, step in cases.items():
            for _ in range(3):
                step()
            if name != "plain" and not name.endswith("+adamw"):
                with _launches.count() as c:
                    step()
                launches[name] = {"total": c.total, "triton": c.triton, "aten": c.aten, "by_op": c.by_op}
        per_round = {name: [] for name in cases}
        for _ in range(args.rounds):
            for name, step in cases.items():
                ts = []
                for _ in range(args.steps):
                    t0 = time.perf_counter()
                    step()
                    ts.append(time.perf_counter() - t0)
                per_round[name].append(statistics.median(ts) * 1e6)
    finally:
        if old is not None:
            _launches.set_launcher(old)

    plain = statistics.median(per_round["plain"])
    print(f"host cost of one training step, {env.device_name(cpu)}, 1 thread, torch {torch.__version__}: "
          f"ViT-B/32 layout at width 16 ({blocks} blocks), N = {args.n}, batch {args.batch}, "
          f"{args.rounds} rounds x {args.steps} steps (medians)")
    if skipped:
        print("not run here: " + "; ".join(skipped))
    print(f"{'case':19s} {'us/step':>10s} {'range':>19s} {'x plain':>8s} {'+us/block':>10s} {'launches/step':>14s}")
    rows = []
    for name, vals in per_round.items():
        med = statistics.median(vals)
        ratio = med / plain
        extra = (med - plain) / blocks if name != "plain" else 0.0
        ln = launches.get(name)
        stub = " (launches stubbed)" if name.startswith("atlas:triton") else ""
        print(f"{name:19s} {med:10.0f} {f'[{min(vals):.0f}, {max(vals):.0f}]':>19s} {ratio:8.2f} "
              f"{extra:10.2f} {'' if ln is None else ln['total']:>14}{stub}")
        rows.append({"date": env.today(), "device": env.device_name(cpu), "torch": torch.__version__,
                     "triton": env.triton_version(), "atlas_kernels": env.git_commit(), "case": name,
                     "blocks": blocks, "n_task_vectors": args.n, "batch": args.batch, "threads": 1,
                     "rounds": args.rounds, "steps": args.steps, "us_per_step": med, "us_per_step_rounds": vals,
                     "ratio_to_plain": ratio, "extra_us_per_block": extra, "launches": ln,
                     "plan": plans.get(name), "triton_launches_stubbed": name.startswith("atlas:triton"),
                     "optimizer_step": name.endswith("+adamw"),
                     "loadavg_1m": os.getloadavg()[0]})
    for name, summary in plans.items():
        print(f"  {name}: {summary}")
    if args.out:
        from atlas_kernels._io import atomic_append_line

        for r in rows:
            atomic_append_line(args.out, json.dumps(r))
        print(f"rows: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
