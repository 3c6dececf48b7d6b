"""``python -m bench``: run the grid, append rows to the JSONL, print the table, draw the plot."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, List

from atlas_kernels._io import atomic_append_line

from .grid import (
    BACKENDS,
    METHODS,
    MODELS,
    PEER_METHODS,
    PRECISIONS,
    STORAGES,
    Axes,
    Job,
    build_jobs,
    cpu_default,
    gpu_full,
    gpu_headline,
    row_key,
)
from .summary import format_table, history_rows, load_rows

if TYPE_CHECKING:  # torch is imported lazily (inside the functions), so that --help answers fast
    import torch

ROW_FIELDS = (
    "date", "device", "torch", "triton", "atlas_kernels", "model", "n_task_vectors", "batch", "precision",
    "storage", "partitions", "method", "backend", "adapted_params", "step_ms", "step_ms_p20", "step_ms_p80",
    "peak_bytes", "oom", "run", "round",
)
CEILING_FIELDS = ("copy_gbps", "matmul_tflops")
# A CPU run's default: a shared CPU's slow spells last minutes, so one pass over the jobs can put one
# on any method; rounds in turn spread it over all of them, and give every ratio an interval
# (bench/quiet.py). 3 rounds of 3 timed steps (9 pooled) instead of one of 5; `--rounds 1` for one.
CPU_ROUNDS, CPU_ROUND_STEPS = 3, 3


def _csv(cast=str):
    def f(s: str):
        return [cast(v.strip()) for v in s.split(",") if v.strip()]
    return f


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Training-step speed and peak memory of atlas_kernels against the naive way, "
        "a merge-once baseline and the plain model (see bench/README.md).",
    )
    p.add_argument("--full", action="store_true",
                   help="the whole GPU grid (default on GPU: headline configs; on CPU: the small CPU grid)")
    p.add_argument("--models", type=_csv(),
                   help=f"comma list of open_clip model names, e.g. {','.join(MODELS)} or RN50,RN101")
    p.add_argument("--only", type=_csv(), help=f"methods: {','.join(METHODS)}; atlas:BACKEND picks one backend")
    p.add_argument("--n", type=_csv(int), help="numbers of task vectors, e.g. 1,4,8,21,30")
    p.add_argument("--batch", type=_csv(int), help="batch sizes, e.g. 16,32,128")
    p.add_argument("--precision", type=_csv(), help=f"{','.join(PRECISIONS)} (fp16 uses a GradScaler)")
    p.add_argument("--storage", type=_csv(),
                   help=f"task-vector storage: {','.join(STORAGES)} (int8/float8 only for atlas)")
    p.add_argument("--partitions", type=_csv(int), help="aTLAS x K partitions, e.g. 1,4")
    p.add_argument("--backends", type=_csv(),
                   help=f"atlas backends ({','.join(BACKENDS)}); default: torch on CPU, torch,triton on CUDA; "
                   "plus ext where the compiled extension is built for the device ('cuda' is its old name)")
    p.add_argument("--triton-on-cpu", action="store_true",
                   help="allow the triton backend on CPU (TRITON_INTERPRET=1; tiny sizes only, very slow)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 2 on CPU, 3 on GPU)")
    p.add_argument("--steps", type=int, default=None,
                   help="timed steps per round (default on CPU: 5 with one round, 3 with several; on GPU as many "
                   "as fit in --target-s, 5 to 50)")
    p.add_argument("--target-s", type=float, default=1.0, help="GPU: seconds of timed steps per job")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="CPU: torch threads per job (default: torch's)")
    p.add_argument("--no-profile", action="store_true", help="skip the extra profiled step (launch / aten op counts)")
    p.add_argument("--no-graph", action="store_true",
                   help="GPU: skip timing each step captured in one CUDA graph (graph_step_ms)")
    p.add_argument("--out", type=Path, default=None,
                   help="JSONL to append to (default bench/results/<date>-<device>.jsonl)")
    p.add_argument("--resume", action="store_true",
                   help="skip jobs whose rows are already in --out (on by default with --max-minutes)")
    p.add_argument("--no-resume", action="store_true", help="run jobs even when their rows are already in --out")
    p.add_argument("--retry-errors", action="store_true", help="rerun jobs whose rows hold an error (not OOM)")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="start no job that would end past this budget (run again to resume)")
    p.add_argument("--timeout", type=float, default=900, help="CPU: seconds per job subprocess")
    p.add_argument("--rounds", type=int, default=None,
                   help="run the whole job list this many times in turn (the ceiling too), so that a slow "
                   "spell of a shared machine falls on every method: the table pools each job's steps over "
                   f"the rounds and takes (atlas-floor)/2pass per round, then its median (default {CPU_ROUNDS} "
                   "on CPU, 1 on GPU and with --in-process)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--subprocess", dest="subprocess", action="store_true", default=None,
                      help="one process per job (default on CPU: honest peak RSS)")
    mode.add_argument("--in-process", dest="subprocess", action="store_false",
                      help="all jobs in this process (default on GPU)")
    p.add_argument("--linearised", action="store_true",
                   help="the linearised rows instead (naive jvp, floor, atlas per backend; see bench/linearised.py)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--dry-run", action="store_true", help="list the jobs and exit")
    return p.parse_args(argv)


def plan(args, dev: torch.device) -> List[Job]:
    cpu = dev.type != "cuda"
    backends = [{"cuda": "ext"}.get(b, b) for b in args.backends or []] or (
        ["torch"] + (["triton"] if args.triton_on_cpu else []) if cpu else ["torch", "triton"])
    if not args.backends and _extension_runs_on(dev.type):
        backends = backends + ["ext"]  # the compiled extension (csrc/), where it is built for this device
    if cpu and "triton" in backends and not args.triton_on_cpu:
        sys.exit("the triton backend on CPU runs in Triton's interpreter (far too slow for a model): "
                 "pass --triton-on-cpu together with tiny sizes to run it anyway")
    methods, only_backends = None, None
    if args.only:
        methods, only_backends = [], []
        for m in args.only:
            name, _, be = m.partition(":")
            if name not in METHODS:
                sys.exit(f"unknown method {name!r}; choose from {METHODS}")
            if name not in methods:
                methods.append(name)
            if be:
                only_backends.append({"cuda": "ext"}.get(be, be))  # 'cuda': the extension's old name
        if only_backends:
            backends = [b for b in backends if b in only_backends] or only_backends
    for s in args.storage or []:
        if s not in STORAGES:
            sys.exit(f"unknown storage {s!r}; choose from {STORAGES}")
    for s in args.precision or []:
        if s not in PRECISIONS:
            sys.exit(f"unknown precision {s!r}; choose from {PRECISIONS}")
    if args.full:
        main, variants = gpu_full(backends)
        if cpu:
            print("warning: --full on a CPU will take many hours", file=sys.stderr)
    elif cpu:
        main, variants = cpu_default(backends)
    else:
        main, variants = gpu_headline(backends)
    axes = Axes(models=args.models, ns=args.n, batches=args.batch, precisions=args.precision,
                storages=args.storage, partitions=args.partitions,
                methods=[m for m in methods if m != "ceiling"] if methods is not None else None,
                backends=backends)
    with_ceiling = methods is None or "ceiling" in methods
    jobs = build_jobs(main, variants, axes, with_ceiling, variants_first=not cpu or args.full)
    return _drop_missing_peers(jobs, asked=set(methods or ()))


def _drop_missing_peers(jobs: List[Job], asked: set) -> List[Job]:
    """A peer's method (``fusionbench``) runs only where its package is installed; otherwise its jobs
    are dropped with one line that says so (on stderr when it was not asked for by name)."""
    from .peers import NOT_INSTALLED, fusionbench_version

    if not any(j.method in PEER_METHODS for j in jobs) or fusionbench_version() is not None:
        return jobs
    print(NOT_INSTALLED, file=sys.stdout if "fusionbench" in asked else sys.stderr, flush=True)
    return [j for j in jobs if j.method not in PEER_METHODS]


def _extension_runs_on(device_type: str) -> bool:
    import torch

    from atlas_kernels import ops

    return ops.unavailable("ext", torch.device(device_type)) is None


def make_row(info: dict, job: Job, res: dict) -> dict:
    row = dict(info)
    row.update(job.as_dict())
    row.setdefault("adapted_params", None)
    for k in ("adapted_params", "step_ms", "step_ms_p20", "step_ms_p80", "peak_bytes", "oom"):
        row[k] = res.get(k, row.get(k))
    row["oom"] = bool(row["oom"])
    if job.method == "ceiling":
        for k in CEILING_FIELDS:
            row[k] = res.get(k)
    ordered = {k: row.get(k) for k in ROW_FIELDS}
    if job.method == "ceiling":
        ordered.update({k: row.get(k) for k in CEILING_FIELDS})
    for k, v in res.items():
        ordered.setdefault(k, v)
    return ordered


def run_subprocess(job: Job, settings: dict, timeout: float) -> dict:
    from . import env
    from .worker import MARKER

    spec = {"job": job.as_dict(), "settings": settings, "device": "cpu"}
    child_env = os.environ.copy()
    child_env["PYTHONPATH"] = str(env.REPO_ROOT) + os.pathsep + child_env.get("PYTHONPATH", "")
    if job.backend == "triton":
        child_env["TRITON_INTERPRET"] = "1"
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "bench.worker", json.dumps(spec)], capture_output=True,
                              text=True, timeout=timeout, cwd=str(env.REPO_ROOT), env=child_env)
    except subprocess.TimeoutExpired:
        return {"oom": False, "error": f"timeout after {timeout:.0f} s", "wall_s": round(time.perf_counter() - t0, 2)}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(MARKER):
            return json.loads(line[len(MARKER):])
    tail = " | ".join(proc.stderr.strip().splitlines()[-3:])[-400:]
    wall = round(time.perf_counter() - t0, 2)
    if proc.returncode in (-9, 137):
        return {"oom": True, "error": "worker killed by SIGKILL (likely the out-of-memory killer)", "wall_s": wall}
    return {"oom": False, "error": f"worker exited {proc.returncode}: {tail}", "wall_s": wall}


def _line(job: Job, res: dict) -> str:
    if job.method == "ceiling" and res.get("copy_gbps"):
        return f"copy {res['copy_gbps']:.1f} GB/s, matmul {res['matmul_tflops']:.2f} TFLOP/s"
    if res.get("oom"):
        return "OOM"
    if res.get("error"):
        return "error: " + res["error"][:200]
    s = (f"{res['step_ms']:.1f} ms [{res['step_ms_p20']:.1f}, {res['step_ms_p80']:.1f}], "
         f"peak {res['peak_bytes'] / 1e9:.2f} GB")
    if res.get("launches") is not None:
        s += f", {res['launches']} launches"
    return s


def main(argv=None) -> int:
    args = parse_args(argv)
    from . import env  # torch (and CUDA) only after the arguments: --help answers at once
    if args.linearised:
        from .linearised import main as linearised_main

        return linearised_main(args)
    dev = env.device()
    cpu = dev.type != "cuda"
    if cpu and args.triton_on_cpu:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    jobs = plan(args, dev)
    out = args.out or env.default_output(dev)
    out.parent.mkdir(parents=True, exist_ok=True)
    existing = load_rows(out)
    done = set()
    # A plain run measures afresh (a newcomer's first command must run the benchmark, not replay the
    # committed rows); chunked runs (--max-minutes, or --resume) skip what is already measured.
    resume = (args.resume or args.max_minutes is not None) and not args.no_resume
    if resume:
        done = {row_key(r) for r in existing if not (args.retry_errors and r.get("error") and not r.get("oom"))}
    todo = [j for j in jobs if j.key() not in done]
    print(f"device: {env.device_name(dev)} | output: {out} | {len(jobs)} jobs, {len(jobs) - len(todo)} already done",
          flush=True)
    if args.dry_run:
        for j in jobs:
            print(("  done  " if j.key() in done else "  todo  ") + j.label())
        return 0

    from .workload import Session, Settings

    use_sub = args.subprocess if args.subprocess is not None else cpu
    if use_sub and not cpu:
        sys.exit("--subprocess is for CPU runs (GPU peaks come from max_memory_allocated)")
    rounds = args.rounds if args.rounds is not None else (CPU_ROUNDS if cpu and use_sub else 1)
    if rounds < 1:
        sys.exit(f"--rounds must be >= 1, got {rounds}")
    steps = args.steps
    if steps is None and cpu and rounds > 1:
        steps = CPU_ROUND_STEPS
    settings = Settings(
        warmup=args.warmup if args.warmup is not None else (2 if cpu else 3),
        steps=steps, target_s=args.target_s, classes=args.classes, seed=args.seed,
        profile=not args.no_profile, threads=args.threads, graph=not args.no_graph,
    )
    # the session's own copy: its profile switch is set per round below
    session = None if use_sub else Session(dev, Settings(**settings.as_dict()), cache_models=not cpu)
    if rounds > 1:
        print(f"{rounds} rounds in turn" + (" (the CPU default; --rounds 1 for one)" if args.rounds is None else "")
              + (f", {steps} timed steps each" if steps else ""), flush=True)
    info = env.run_info(dev)
    info["run"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())  # the rows of one invocation
    t_run = time.perf_counter()
    longest = 0.0
    stopped = False
    todo = [(rnd, job) for rnd in range(1, rounds + 1) for job in todo]
    for i, (rnd, job) in enumerate(todo):
        elapsed = time.perf_counter() - t_run
        if args.max_minutes is not None and elapsed + longest > args.max_minutes * 60:
            print(f"budget of {args.max_minutes} min reached after {i} jobs; run the same command again to resume",
                  flush=True)
            stopped = True
            break
        print(f"[{i + 1}/{len(todo)}]" + (f" round {rnd}" if rounds > 1 else "") + f" {job.label()} ... ",
              end="", flush=True)
        t0 = time.perf_counter()
        # launch / aten-op counts do not change between rounds: the profiled step runs in round 1 only
        profile = settings.profile and rnd == 1
        if use_sub:
            res = run_subprocess(job, dict(settings.as_dict(), profile=profile), args.timeout)
        else:
            session.s.profile = profile
            res = session.run(job)
        longest = max(longest, time.perf_counter() - t0)
        row = make_row(dict(info, round=rnd), job, res)
        atomic_append_line(out, json.dumps(row))
        print(_line(job, res) + f" ({time.perf_counter() - t0:.0f} s)", flush=True)

    keys = {j.key() for j in jobs}
    rows = [r for r in load_rows(out) if row_key(r) in keys or r.get("method") == "ceiling"]
    print()
    print(format_table(rows, history=history_rows(out)))
    if not args.no_plot:
        try:
            from .plot import plot

            png = plot(out)
            print(f"\nplot: {png}")
        except Exception as e:  # the rows are written; a plot failure must not lose them
            print(f"\nplot failed: {type(e).__name__}: {e}", file=sys.stderr)
    print(f"results: {out}")
    if stopped:
        print(f"{len(todo) - i} jobs remain")
    return 0
