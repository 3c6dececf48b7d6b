"""Per-process memory of a sharded training step, measured on the CPU with gloo, against the planner.

    python -m bench.sharded_memory --model ViT-B-32 --n 4 --storage bfloat16 --batch 8 --world 2

Writes a task-vector file of N random task vectors over the open_clip image tower, then starts W
processes (spawned: each a fresh interpreter). Each reads its rows of the file
(``TaskVectors.load_shard``), patches a randomly initialised tower with them, and runs ``--steps``
training steps (forward, backward, AdamW on the coefficients) on its ``batch / W`` images. It
measures:

- what it holds between steps, from the tensors: theta0 and the task vectors' rows
  (:func:`atlas_kernels.sharding.local_bytes`), against the planner's ``theta0`` and
  ``task_vectors`` terms (``estimate_memory(..., world=W)``);
- the step's own peak: the process's peak resident memory (``VmHWM``, reset through
  ``/proc/self/clear_refs`` right before the last step) less its resident memory then, against
  the planner's step terms (gathered blocks + activations + transient + coefficients + inputs).

The processes run with ``MALLOC_MMAP_THRESHOLD_=65536``: every allocation above 64 KiB is its own
mapping, returned to the system when freed, so that resident memory follows the tensors alive
(glibc's dynamic threshold otherwise keeps freed blocks in the heap, and a step's allocations reuse
them unseen). Linux only (``/proc``).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time


def _rss(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> None:
    from bench.measure import reset_peak_rss  # VmHWM := the current RSS

    if not reset_peak_rss():
        raise RuntimeError("cannot reset the peak RSS (/proc/self/clear_refs): Linux only")


def _tower(name: str, device: str = "cpu"):
    import warnings

    import open_clip
    import torch
    from open_clip.model import CLIPVisionCfg, _build_vision_tower

    cfg = open_clip.get_model_config(name)
    with torch.device(device), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _build_vision_tower(cfg["embed_dim"], CLIPVisionCfg(**cfg["vision_cfg"]))


def _worker(rank: int, world: int, port: int, args: dict, path: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch
    import torch.distributed as dist

    import atlas_kernels as ak
    from atlas_kernels.sharding import local_bytes

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        tower = _tower(args["model"]).eval()
        ak.patch(tower, ak.TaskVectors.load_shard(path))
        coefs = ak.coefficients(tower)
        opt = torch.optim.AdamW(list(coefs.values()), lr=1e-3)
        per = args["batch"] // world
        size = tower.image_size if isinstance(tower.image_size, tuple) else (tower.image_size,) * 2
        g = torch.Generator().manual_seed(rank)
        x = torch.randn(per, 3, *size, generator=g)
        held = local_bytes(tower)
        from atlas_kernels.modules import _BlockHolder

        atlas = {id(c) for c in coefs.values()}
        for m in tower.modules():
            if isinstance(m, _BlockHolder):
                atlas |= {id(t) for n in m._atlas_parts for suffix in ("", "_tau", "_scale", "_lora_a", "_lora_b")
                          for t in [m._buffers.get(n + suffix)] if t is not None}
        other = sum(t.numel() * t.element_size() for t in list(tower.parameters()) + list(tower.buffers())
                    if id(t) not in atlas)
        times, peaks = [], []
        for step in range(args["steps"]):
            import gc

            gc.collect()
            dist.barrier()
            before = _rss("VmRSS")
            _reset_peak()
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args["precision"] == "bf16"):
                loss = tower(x).float().pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t0)
            peaks.append(_rss("VmHWM") - before)
        res = {"rank": rank, "held": held, "other_params": other, "step_peak": peaks, "step_s": times}
        everyone = [None] * world
        dist.all_gather_object(everyone, res)
        if rank == 0:
            from atlas_kernels._io import atomic_write_json

            atomic_write_json(out, everyone)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.sharded_memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="ViT-B-32", help="open_clip model name (its image tower)")
    p.add_argument("--n", type=int, default=4, help="task vectors")
    p.add_argument("--storage", default="bfloat16", choices=("float32", "bfloat16", "float16", "int8"))
    p.add_argument("--batch", type=int, default=8, help="global batch (split over the processes)")
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--steps", type=int, default=3, help="steps; the last one's peak is reported")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--out", default=None, help="write the result as JSON here")
    a = p.parse_args(argv)
    if a.batch % a.world:
        p.error(f"--batch {a.batch} is not divisible by --world {a.world}")
    import torch
    import torch.multiprocessing as mp

    import atlas_kernels as ak
    from atlas_kernels.planner import estimate_memory

    tmp = tempfile.mkdtemp(prefix="atlas_sharded_mem_")
    path = os.path.join(tmp, "tvs.safetensors")
    g = torch.Generator().manual_seed(1)
    plain = _tower(a.model)
    dtype = torch.float32 if a.storage == "int8" else getattr(torch, a.storage)
    tvs = ak.TaskVectors({k: (torch.randn((a.n, *q.shape), generator=g) * 1e-3).to(dtype)
                          for k, q in plain.named_parameters()})
    if a.storage == "int8":
        tvs = tvs.to_storage("int8")
    tvs.save(path)
    whole = tvs.nbytes
    del tvs
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    os.environ["MALLOC_TRIM_THRESHOLD_"] = "0"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = os.path.join(tmp, "result.json")
    t0 = time.perf_counter()
    mp.start_processes(_worker, args=(a.world, port, vars(a), path, out), nprocs=a.world, start_method="spawn")
    took = time.perf_counter() - t0
    ranks = json.loads(open(out).read())
    est = estimate_memory(_tower(a.model, "meta"), (a.n, a.storage), a.batch // a.world, precision=a.precision,
                          device="cpu", world=a.world)
    predicted_step = est.composed + est.activations + est.transient + est.coefficients + est.inputs
    mib = float(1 << 20)
    print(est)
    print(f"\nmeasured per process ({a.world} processes, gloo, {took:.0f} s; whole task-vector set "
          f"{whole / mib:.1f} MiB):")
    rows = []
    for r in ranks:
        held = r["held"]
        tv = held["slabs"] + held["scales"] + held["lora_a"] + held["lora_b"]
        theta0 = held["theta0"] + r["other_params"]
        step = r["step_peak"][-1]
        rows.append({"rank": r["rank"], "theta0": theta0, "task_vectors": tv, "step_peak": step,
                     "step_s": r["step_s"][-1]})
        print(f"  rank {r['rank']}: theta0 {theta0 / mib:8.1f} MiB (planner {est.theta0 / mib:8.1f}), task vectors "
              f"{tv / mib:8.1f} MiB (planner {est.task_vectors / mib:8.1f}), step peak {step / mib:8.1f} MiB "
              f"(planner {predicted_step / mib:8.1f}: gathered {est.composed / mib:.1f} + activations "
              f"{est.activations / mib:.1f} + transient {est.transient / mib:.1f}), step {r['step_s'][-1]:.2f} s")
    result = {"args": vars(a), "whole_task_vectors": whole, "estimate": est.as_dict(),
              "predicted_step": predicted_step, "measured": rows, "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d")}
    if a.out:
        from atlas_kernels._io import atomic_write_json

        atomic_write_json(a.out, result, indent=1)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
