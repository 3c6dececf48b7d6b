"""``python -m bench --linearised``: the linearised training step (task vectors in the tangent space,
``f(x; theta0) + J f(x; theta0) . D(lam)``), three ways, on the same tower, data and task vectors
as the standard rows (see :mod:`bench.workload`):

- ``naive``: the paper's way. Per block ``D = sum(p * c for p, c in zip(taus, coef))``, then
  ``torch.func.jvp`` over the whole tower through ``functional_call`` (attention on the math path,
  train mode: the fused attention kernels have no forward-mode formula), backward, AdamW;
- ``floor``: the linearised model's own training step (tangent_task_arithmetic's
  ``LinearizedModel``): one jvp pass and backward, with gradients over a single trainable tangent
  (one model-sized ``D`` per block, no task vectors); no optimizer step, as for the standard floor;
- ``atlas``: ``atlas_kernels.patch(visual, tvs, linearised=True, backend=...)``, AdamW on the
  coefficients.

Each job runs in its own process on the CPU (honest peak RSS). Rows go to
``bench/results/<date>-<device>-linearised.jsonl`` with ``linearised: true``; the summary prints
atlas / naive, atlas / floor and ``(atlas - floor) / two_pass_time`` (two passes over the task
vectors at the measured copy bandwidth).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import torch

from atlas_kernels._io import atomic_append_line

from . import env
from .grid import Job
from .workload import Session, Settings, StepBuilder, count_ops, free_memory, measure_ceiling, rss_bytes, time_step

MARKER = "@@BENCH_LINEARISED@@ "


def _jvp_call(visual, names, primals, tangents, x):
    from torch.func import functional_call
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def f(*vals):
        return functional_call(visual, dict(zip(names, vals)), (x,))

    with sdpa_kernel(SDPBackend.MATH):
        out, tan = torch.func.jvp(f, primals, tangents)
    return out + tan


class LinearisedSteps(StepBuilder):
    """The three linearised training steps (``job.method`` picks one)."""

    def naive_step(self):
        visual = self.visual.train()  # MultiheadAttention's fast path has no forward-mode formula
        names = [b for b, _ in visual.named_parameters()]
        theta0 = {b: p.detach() for b, p in visual.named_parameters()}
        for p in visual.parameters():
            p.requires_grad_(False)
        taus = {b: list(s.unbind(0)) for b, s in self.slabs.items()}
        coefs = self._coefficients(1)
        opt = torch.optim.AdamW(list(coefs.values()), lr=self.s.lr)
        primals = tuple(theta0[b] for b in names)
        self._keep = (theta0, taus, coefs, opt)

        def step():
            tangents = tuple(sum(p * c for p, c in zip(taus[b], coefs[b])) if b in taus else torch.zeros_like(theta0[b])
                             for b in names)
            with self.autocast():
                feats = _jvp_call(visual, names, primals, tangents, self.x)
            self._backward_and_step(self._loss(feats), opt)

        return step

    def floor_step(self):
        visual = self.visual.train()
        names = [b for b, _ in visual.named_parameters()]
        for p in visual.parameters():
            p.requires_grad_(False)
        primals = tuple(p.detach() for _, p in visual.named_parameters())
        # one trainable tangent per block (the fine-tuned point minus theta0), small and nonzero
        tangents = tuple(torch.nn.Parameter(torch.full_like(p, 1e-4)) for p in primals)
        self._keep = tangents
        self.extra["optimizer_step"] = False

        def step():
            for t in tangents:
                t.grad = None
            with self.autocast():
                feats = _jvp_call(visual, names, primals, tangents, self.x)
            self._loss(feats).backward()

        return step

    def atlas_step(self):
        import atlas_kernels as ak

        visual = self.visual.train()
        tvs = self.tvs_factory()
        ak.patch(visual, tvs, partitions=self.job.partitions, backend=self.job.backend, linearised=True)
        coefs = ak.coefficients(visual)
        from .workload import coef_init

        with torch.no_grad():
            for name, c in coefs.items():
                c.copy_(coef_init(name, c.shape, self.s.seed, self.s.coef_scale).to(c.device, c.dtype))
        opt = torch.optim.AdamW(list(coefs.values()), lr=self.s.lr)
        self._keep = (tvs, coefs, opt)

        def step():
            with self.autocast():
                feats = visual(self.x)
            self._backward_and_step(self._loss(feats), opt)

        return step


def run_job(job: Job, settings: Settings, dev: torch.device) -> dict:
    """One job in this process (a fresh one on the CPU)."""
    session = Session(dev, settings, cache_models=False)
    res = {"oom": False, "linearised": True, "base_rss_bytes": rss_bytes()}
    t0 = time.perf_counter()
    try:
        visual = session.visual(job.model)
        res["adapted_params"] = sum(p.numel() for p in visual.parameters() if p.is_floating_point())
        slabs = session.slabs(job, visual) if job.method != "floor" else None
        if job.method == "atlas":
            session.task_vectors(job.storage)
            slabs = session._slabs
        builder = LinearisedSteps(job, settings, visual, slabs, lambda: session.task_vectors(job.storage), dev)
        if job.method == "floor":
            session.drop_task_vectors()
        res["setup_rss_bytes"] = rss_bytes()
        step = builder.build()
        res.update(time_step(step, dev, settings))
        if settings.profile:
            try:
                res.update(count_ops(step, dev))
            except Exception as e:  # the numbers above stand without it
                res["profile_error"] = f"{type(e).__name__}: {str(e)[:200]}"
        res.update(builder.extra)
    except BaseException as e:  # noqa: BLE001 - a failed configuration is a result
        if isinstance(e, KeyboardInterrupt):
            raise
        res["error"] = f"{type(e).__name__}: {str(e)[:500]}"
        res["oom"] = "memory" in str(e).lower()
    free_memory()
    res["wall_s"] = round(time.perf_counter() - t0, 2)
    return res


def _subprocess(job: Job, settings: Settings, timeout: float) -> dict:
    spec = {"job": job.as_dict(), "settings": settings.as_dict()}
    child_env = os.environ.copy()
    child_env["PYTHONPATH"] = str(env.REPO_ROOT) + os.pathsep + child_env.get("PYTHONPATH", "")
    if job.backend == "triton":
        child_env["TRITON_INTERPRET"] = "1"
    try:
        proc = subprocess.run([sys.executable, "-m", "bench.linearised", json.dumps(spec)], capture_output=True,
                              text=True, timeout=timeout, cwd=str(env.REPO_ROOT), env=child_env)
    except subprocess.TimeoutExpired:
        return {"oom": False, "error": f"timeout after {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(MARKER):
            return json.loads(line[len(MARKER):])
    tail = " | ".join(proc.stderr.strip().splitlines()[-3:])[-400:]
    return {"oom": proc.returncode in (-9, 137), "error": f"worker exited {proc.returncode}: {tail}"}


def jobs(args, dev: torch.device):
    cpu = dev.type != "cuda"
    model = (args.models or ["ViT-B-32"])[0]
    n = (args.n or [8 if cpu else 21])[0]
    precision = (args.precision or ["fp32" if cpu else "bf16"])[0]
    backends = args.backends or (["torch"] if cpu else ["triton"])
    out = []
    for batch in args.batch or ([8] if cpu else [16, 128]):
        common = dict(model=model, batch=batch, precision=precision)
        out.append(Job("naive", n_task_vectors=n, storage="float32" if cpu else "bfloat16", partitions=1, **common))
        out.append(Job("floor", **common))
        for be in backends:
            out.append(Job("atlas", n_task_vectors=n, storage="float32" if cpu else "bfloat16", partitions=1,
                           backend=be, **common))
    if args.only:
        keep = {m.partition(":")[0] for m in args.only}
        out = [j for j in out if j.method in keep]
    return out


def _summary(rows, ceiling):
    by = {}
    for r in rows:
        by.setdefault(r["batch"], {})[r["method"] if r["method"] != "atlas" else f"atlas:{r['backend']}"] = r
    lines = []
    for batch, d in sorted(by.items()):
        naive, floor = d.get("naive"), d.get("floor")
        for name, a in d.items():
            if not name.startswith("atlas") or a.get("error"):
                continue
            s = f"batch {batch} {name}: {a['step_ms']:.0f} ms, peak {a['peak_bytes'] / 1e9:.2f} GB"
            if naive and not naive.get("error"):
                s += (f" | naive {naive['step_ms']:.0f} ms, {naive['peak_bytes'] / 1e9:.2f} GB "
                      f"(atlas/naive time {a['step_ms'] / naive['step_ms']:.2f}x, peak "
                      f"{a['peak_bytes'] / naive['peak_bytes']:.2f}x)")
            if floor and not floor.get("error"):
                s += f" | floor {floor['step_ms']:.0f} ms, {floor['peak_bytes'] / 1e9:.2f} GB"
                if ceiling:
                    tp = 2 * a["n_task_vectors"] * a["adapted_params"] * 4 / (ceiling["copy_gbps"] * 1e9) * 1e3
                    s += f" | two-pass {tp:.0f} ms, (atlas-floor)/two_pass {(a['step_ms'] - floor['step_ms']) / tp:.2f}"
            lines.append(s)
    return "\n".join(lines)


def main(args) -> int:
    dev = env.device()
    cpu = dev.type != "cuda"
    settings = Settings(warmup=args.warmup if args.warmup is not None else (2 if cpu else 3), steps=args.steps,
                        target_s=args.target_s, classes=args.classes, seed=args.seed, profile=not args.no_profile,
                        threads=args.threads)
    out = args.out or env.default_output(dev).with_name(env.default_output(dev).stem + "-linearised.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    todo = jobs(args, dev)
    print(f"device: {env.device_name(dev)} | output: {out} | {len(todo)} linearised jobs", flush=True)
    if args.dry_run:
        for j in todo:
            print("  " + j.label())
        return 0
    info = env.run_info(dev)
    ceiling = measure_ceiling(dev)
    print(f"copy {ceiling['copy_gbps']:.1f} GB/s (read+write)", flush=True)
    rows = []
    for i, job in enumerate(todo):
        print(f"[{i + 1}/{len(todo)}] linearised {job.label()} ... ", end="", flush=True)
        res = _subprocess(job, settings, args.timeout) if cpu else run_job(job, settings, dev)
        row = dict(info, **job.as_dict(), **res, copy_gbps=ceiling["copy_gbps"])
        rows.append(row)
        atomic_append_line(out, json.dumps(row))
        if res.get("error"):
            print("error: " + res["error"][:300], flush=True)
        else:
            print(f"{res['step_ms']:.1f} ms [{res['step_ms_p20']:.1f}, {res['step_ms_p80']:.1f}], "
                  f"peak {res['peak_bytes'] / 1e9:.2f} GB", flush=True)
    print(_summary(rows, ceiling))
    print(f"results: {out}")
    return 0


def _worker(argv) -> int:
    spec = json.loads(argv[0])
    res = run_job(Job(**spec["job"]), Settings(**spec["settings"]), torch.device("cpu"))
    sys.stdout.write(MARKER + json.dumps(res) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":  # a worker: python -m bench.linearised '{"job": ..., "settings": ...}'
    sys.exit(_worker(sys.argv[1:]))
