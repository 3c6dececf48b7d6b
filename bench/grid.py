"""Jobs and grids: which (configuration, method) pairs a run measures, and in which order; and
the :class:`Settings` every job of a run shares.

A *job* is one configuration (model, N, batch, precision, storage, partitions) and one method
(with a backend for ``atlas``). Its :meth:`Job.key` is the identity used for resuming: a job whose
key already appears in the output JSONL is skipped.

Fields that do not apply to a method are ``None``: ``floor`` has no task vectors (no N, storage,
partitions), ``ceiling`` has no model at all. ``naive``, ``merge_once`` and ``fusionbench`` run only
with floating storages (float32, float16, bfloat16): the paper's code cannot use int8 or float8 task
vectors; ``fusionbench`` (FusionBench's own wrapper, :mod:`bench.peers`) only with K = 1 (it has one
coefficient per task vector and parameter) and only where fusion-bench is installed.
"""
from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass
from typing import Iterable, List, Optional, Sequence

METHODS = ("ceiling", "floor", "naive", "merge_once", "fusionbench", "atlas")
# methods whose code is a peer's own, run only where its package is installed (bench/peers.py)
PEER_METHODS = ("fusionbench",)
PRECISIONS = ("fp32", "bf16", "fp16")
# "lora-r16": LoRA task vectors of rank 16 (fp16 factors) on the attention and MLP matrices.
LORA_STORAGES = ("lora-r16",)
STORAGES = ("float32", "float16", "bfloat16", "int8", "float8_e4m3fn") + LORA_STORAGES
FLOAT_STORAGES = ("float32", "float16", "bfloat16")
BACKENDS = ("torch", "triton", "ext")
MODELS = ("ViT-B-32", "ViT-B-16", "ViT-L-14")

KEY_FIELDS = ("model", "n_task_vectors", "batch", "precision", "storage", "partitions", "method", "backend")


@dataclass(frozen=True)
class Job:
    method: str
    model: Optional[str] = None
    n_task_vectors: Optional[int] = None
    batch: Optional[int] = None
    precision: Optional[str] = None
    storage: Optional[str] = None
    partitions: Optional[int] = None
    backend: Optional[str] = None

    def key(self) -> tuple:
        return tuple(getattr(self, f) for f in KEY_FIELDS)

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def needs_task_vectors(self) -> bool:
        return self.method in ("naive", "merge_once", "fusionbench", "atlas")

    def label(self) -> str:
        if self.method == "ceiling":
            return "ceiling"
        parts = [self.model, f"b{self.batch}", self.precision]
        if self.needs_task_vectors:
            parts[1:1] = [f"N{self.n_task_vectors}"]
            parts += [self.storage, f"K{self.partitions}"]
        m = self.method if self.backend is None else f"{self.method}:{self.backend}"
        return f"{m:<16} " + " ".join(str(p) for p in parts)


@dataclass
class Settings:
    """Knobs that are the same for every job of a run (not part of a job's key)."""

    warmup: int = 2
    steps: Optional[int] = None  # timed steps; None: 5 on CPU, adaptive (target_s) on GPU
    target_s: float = 1.0  # GPU: time about this long per job (5 to 50 steps)
    classes: int = 10
    seed: int = 0
    tau_scale: float = 1e-3
    coef_scale: float = 0.1
    lr: float = 1e-3
    profile: bool = True  # count launches (GPU) / aten ops with torch.profiler after timing
    threads: Optional[int] = None  # CPU: torch.set_num_threads (None: torch's default)
    graph: bool = True  # GPU: also time the step captured in one CUDA graph (graph_step_ms)

    def as_dict(self) -> dict:
        return asdict(self)


def row_key(row: dict) -> tuple:
    return tuple(row.get(f) for f in KEY_FIELDS)


@dataclass
class Sweep:
    """A cartesian product of axis values; :meth:`jobs` expands it (floor once per model, batch,
    precision; atlas once per backend; naive and merge_once only for floating storages)."""

    models: Sequence[str]
    ns: Sequence[int]
    batches: Sequence[int]
    precisions: Sequence[str]
    storages: Sequence[str]
    partitions: Sequence[int]
    methods: Sequence[str]
    backends: Sequence[str] = ("torch",)

    def jobs(self) -> List[Job]:
        out: List[Job] = []
        for model in self.models:
            # floors first: they run without task vectors resident
            if "floor" in self.methods:
                for prec, b in itertools.product(self.precisions, self.batches):
                    out.append(Job("floor", model, None, b, prec))
            for n, st, k, prec, b in itertools.product(
                self.ns, self.storages, self.partitions, self.precisions, self.batches
            ):
                for m in self.methods:
                    if m in ("naive", "merge_once") and st in FLOAT_STORAGES:
                        out.append(Job(m, model, n, b, prec, st, k))
                    elif m == "fusionbench" and st in FLOAT_STORAGES and k == 1:
                        out.append(Job(m, model, n, b, prec, st, k))
                    elif m == "atlas":
                        for be in self.backends:
                            out.append(Job("atlas", model, n, b, prec, st, k, be))
        return out


@dataclass
class Axes:
    """What the user asked for on the command line (``None``: not given)."""

    models: Optional[List[str]] = None
    ns: Optional[List[int]] = None
    batches: Optional[List[int]] = None
    precisions: Optional[List[str]] = None
    storages: Optional[List[str]] = None
    partitions: Optional[List[int]] = None
    methods: Optional[List[str]] = None  # from --only
    backends: Optional[List[str]] = None

    _NAMES = ("models", "ns", "batches", "precisions", "storages", "partitions", "methods", "backends")

    def set_main(self, sweep: Sweep) -> Sweep:
        """The main sweep: every given axis *replaces* the sweep's values."""
        kw = {a: (getattr(self, a) if getattr(self, a) is not None else getattr(sweep, a)) for a in self._NAMES}
        return Sweep(**kw)

    def filter_variant(self, sweep: Sweep) -> Sweep:
        """A variant sweep: every given axis *filters* the sweep's values (keeps the intersection)."""
        kw = {}
        for a in self._NAMES:
            given = getattr(self, a)
            vals = getattr(sweep, a)
            kw[a] = [v for v in vals if given is None or v in given]
        return Sweep(**kw)


def cpu_default(backends: Sequence[str]) -> tuple:
    """(main sweep, variant sweeps) of the CPU default grid: ViT-B/32, N = 8, batch 8, fp32."""
    main = Sweep(["ViT-B-32"], [8], [8], ["fp32"], ["float32"], [1],
                 ["floor", "naive", "merge_once", "fusionbench", "atlas"], list(backends))
    variants = [
        # the paper stores task vectors in fp16: the naive way with them, and ours with the same bytes
        Sweep(["ViT-B-32"], [8], [8], ["fp32"], ["float16"], [1], ["naive", "atlas"], list(backends)),
        # open_clip's ModifiedResNet (the paper's RN50/RN101 towers: BatchNorm, an attention pool
        # reading its projections' weights directly), at one small configuration
        Sweep(["RN50"], [2], [2], ["fp32"], ["float32"], [1], ["floor", "naive", "atlas"], list(backends)),
    ]
    return main, variants


HEADLINE = dict(model="ViT-B-32", n=21, batches=(16, 128))


def gpu_full(backends: Sequence[str]) -> tuple:
    """(main sweep, variant sweeps) of the whole GPU grid.

    Main: 3 models x N in {1, 4, 8, 21, 30} x batch {16, 32, 128}, bf16 autocast, fp16 storage (the
    paper's), K = 1, all methods. Variants at the headline point (ViT-B/32, N = 21, batch 16 and 128):
    fp16 autocast with a GradScaler; bf16 storage; aTLAS x 4 partitions.
    """
    bk = list(backends)
    main = Sweep(list(MODELS), [1, 4, 8, 21, 30], [16, 32, 128], ["bf16"], ["float16"], [1],
                 ["floor", "naive", "merge_once", "atlas"], bk)
    hm, hn, hb = HEADLINE["model"], HEADLINE["n"], list(HEADLINE["batches"])
    variants = [
        Sweep([hm], [hn], hb, ["fp16"], ["float16"], [1], ["floor", "naive", "merge_once", "atlas"], bk),
        Sweep([hm], [hn], hb, ["bf16"], ["bfloat16"], [1], ["naive", "merge_once", "atlas"], bk),
        Sweep([hm], [hn], hb, ["bf16"], ["float16"], [4], ["naive", "merge_once", "atlas"], bk),
        # many task vectors on limited VRAM: ViT-L/14, N = 30, batch 32, int8 (and the paper's fp16)
        Sweep(["ViT-L-14"], [30], [32], ["bf16"], ["int8", "float16"], [1], ["floor", "naive", "atlas"], bk),
        # LoRA task vectors (rank 16, N = 21): against the floor
        Sweep([hm], [hn], [16, 32, 128], ["bf16"], ["lora-r16"], [1], ["floor", "atlas"], bk),
        # a peer's own code at the headline point (where fusion-bench is installed)
        Sweep([hm], [hn], hb, ["bf16"], ["float16"], [1], ["fusionbench"], bk),
    ]
    return main, variants


def gpu_headline(backends: Sequence[str]) -> tuple:
    """The GPU default without --full: the headline configurations only."""
    main = Sweep([HEADLINE["model"]], [HEADLINE["n"]], list(HEADLINE["batches"]), ["bf16"], ["float16"], [1],
                 ["floor", "naive", "merge_once", "fusionbench", "atlas"], list(backends))
    return main, []


def _is_headline(job: Job) -> bool:
    return (
        job.model == HEADLINE["model"]
        and job.batch in HEADLINE["batches"]
        and job.precision == "bf16"
        and job.partitions in (None, 1)
        and job.storage in (None, "float16")
        and (job.n_task_vectors in (None, HEADLINE["n"]))
    )


def build_jobs(main: Sweep, variants: Iterable[Sweep], axes: Axes, with_ceiling: bool,
               variants_first: bool = True) -> List[Job]:
    """Ordered, de-duplicated jobs: the ceiling, the headline configurations, the variants, then the
    rest of the main sweep (grouped by model, N and storage so that task vectors are built once);
    with ``variants_first=False`` the variants come last (the CPU default)."""
    main_jobs = axes.set_main(main).jobs()
    var_jobs = [j for v in variants for j in axes.filter_variant(v).jobs()]
    head = [j for j in main_jobs if _is_headline(j)]
    rest = var_jobs + main_jobs if variants_first else main_jobs + var_jobs
    ordered = ([Job("ceiling")] if with_ceiling else []) + head + rest
    seen, out = set(), []
    for j in ordered:
        if j.key() not in seen:
            seen.add(j.key())
            out.append(j)
    return out
