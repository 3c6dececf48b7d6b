"""Micro benchmark of the compiled extension's fused CPU linear (issue 15).

One weight block at a time (ViT-B/32 shapes), N task vectors, M = batch x tokens rows, fp32
compute, forward + backward:

- ``floor``: ``F.linear`` with ``x`` and ``W`` requiring grad (the plain model: weight gradient
  included);
- ``fused``: ``atlas_kernels_ext::fused_linear`` + ``fused_linear_backward`` (W and G in a reused scratch);
- ``compose``: compose + matmul, ``compose`` + ``F.linear`` + ``coef_grad`` (what CUDA tensors take).

``(x - floor) / two_pass`` with ``two_pass = 2 * slab bytes / copy`` (copy: read + write bytes of a
256 MiB ``copy_`` per second, measured in the same run, as the ``ceiling`` row of ``python -m bench``).

    PYTHONPATH=$PWD python -m bench.ext_fused_micro [--shapes 3072x768,768x3072,768x768] [--n 8]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F


def _median_ms(f, reps, clock=time.perf_counter):
    f()
    f()
    ts = []
    for _ in range(reps):
        t0 = clock()
        f()
        ts.append(clock() - t0)
    return statistics.median(ts) * 1e3


def _slab(n, shape, storage):
    from atlas_kernels.task_vectors import quantize

    t = torch.randn(n, *shape) * 0.01
    if storage in ("int8", "float8_e4m3fn"):
        qs = [quantize(t[i], storage) for i in range(n)]
        return torch.stack([q for q, _ in qs]), torch.stack([s for _, s in qs])
    return t.to(getattr(torch, storage)), None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="3072x768,768x3072,768x768")
    p.add_argument("--storage", default="float16,int8")
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--rows", type=int, default=400, help="M = batch x tokens (ViT-B/32 batch 8: 400)")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--cpu-time", action="store_true",
                   help="time by the process's CPU time, not the wall clock: with OMP_NUM_THREADS=1 on a shared "
                        "machine, the work itself without the time other processes held the core")
    a = p.parse_args(argv)
    clock = time.process_time if a.cpu_time else time.perf_counter
    from atlas_kernels import _C  # noqa: F401  (registers torch.ops.atlas_kernels_ext)

    ops = torch.ops.atlas_kernels_ext
    torch.manual_seed(0)
    src = torch.empty(1 << 26).fill_(1.0)
    dst = torch.empty_like(src)
    copy_gbps = 2 * src.numel() * 4 / (_median_ms(lambda: dst.copy_(src), a.reps, clock) / 1e3) / 1e9
    print(f"threads {torch.get_num_threads()}, load {os.getloadavg()[0]:.2f}, copy {copy_gbps:.1f} GB/s "
          f"(read+write), N = {a.n}, M = {a.rows}, median of {a.reps}, {'CPU' if a.cpu_time else 'wall'} time")
    for shape in a.shapes.split(","):
        out_f, in_f = (int(v) for v in shape.split("x"))
        w0 = torch.randn(out_f, in_f) * 0.02
        x, dy = torch.randn(a.rows, in_f), torch.randn(a.rows, out_f)
        wp, xp = w0.clone().requires_grad_(), x.clone().requires_grad_()

        def floor():
            F.linear(xp, wp).backward(dy)
            wp.grad = xp.grad = None

        t_floor = _median_ms(floor, a.reps, clock)
        for storage in a.storage.split(","):
            tau, sc = _slab(a.n, (out_f, in_f), storage)
            coef = torch.randn(a.n, 1)

            def fused():
                ops.fused_linear(x, w0, tau, coef, sc, 0, 0, None)
                ops.fused_linear_backward(dy, x, w0, tau, coef, sc, 0, 0, True)

            def compose():
                w = ops.compose(w0, tau, coef, sc, 0, 0, torch.float32).requires_grad_()
                F.linear(xp, w).backward(dy)
                ops.coef_grad(w.grad, tau, sc, 1, 0, 0)
                xp.grad = None

            t_fused, t_comp = _median_ms(fused, a.reps, clock), _median_ms(compose, a.reps, clock)
            two_pass = 2 * tau.numel() * tau.element_size() / (copy_gbps * 1e9) * 1e3
            print(f"{shape:>9} {storage:8} floor {t_floor:7.2f} ms | fused {t_fused:7.2f} ms "
                  f"({(t_fused - t_floor) / two_pass:5.2f}) | compose {t_comp:7.2f} ms "
                  f"({(t_comp - t_floor) / two_pass:5.2f}) | two-pass {two_pass:.2f} ms", flush=True)


if __name__ == "__main__":
    main()
