"""What one job does: build the image tower, the task vectors and the data; build one method's
training step; time it; measure its peak memory.

Every method runs the *same* training step on the same data:

- the image tower ``model.visual`` of an open_clip model with random weights (seeded, so every
  method and every subprocess gets the same weights);
- images ``x ~ N(0, 1)`` of shape ``[batch, 3, H, W]`` and labels in ``[0, classes)`` (seeded);
- a fixed random linear head ``[classes, embed_dim]`` on the image features (not trained);
- cross-entropy, backward, and an AdamW step on the coefficients (``floor``: no optimizer step,
  see :func:`floor_step`);
- the precision: ``fp32`` (no autocast), ``bf16`` autocast, or ``fp16`` autocast with a GradScaler.
  Task-vector composition in ``naive`` and ``merge_once`` runs outside autocast (as the paper's
  code does; autocast would otherwise cast whole slabs in ``tensordot``);
- the same task vectors: for every floating parameter ``p`` of the tower, N slabs drawn from
  ``N(0, (1e-3 * rms(p))^2)`` (``rms`` floored at 1e-2 so zero-initialised biases get nonzero task
  vectors) with one seeded generator on the device, in the storage dtype;
- the same coefficient initialisation: block ``b`` gets ``U(-0.1, 0.1)`` values from a generator
  seeded by ``(seed, crc32(b))`` (nonzero, so the composition is not trivially ``theta0``).
"""
from __future__ import annotations

import copy
import gc
import logging
import math
import os
import re
import resource
import time
import zlib
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from atlas_kernels.storage import BYTES_PER_ELEMENT  # noqa: F401  (re-exported: the one storage table)

from .grid import FLOAT_STORAGES, Job

OOM_ERRORS = tuple(
    {getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError), torch.cuda.OutOfMemoryError, MemoryError}
)

STORAGE_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int8": torch.int8,
    "float8_e4m3fn": getattr(torch, "float8_e4m3fn", None),
}
AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


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

    def as_dict(self) -> dict:
        return asdict(self)


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, OOM_ERRORS):
        return True
    msg = str(exc)
    return isinstance(exc, RuntimeError) and (
        "out of memory" in msg.lower() or "can't allocate memory" in msg or "DefaultCPUAllocator" in msg
    )


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def rss_bytes() -> Optional[int]:
    """Current resident set size of this process."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except Exception:
        return None


def max_rss_bytes() -> int:
    """Peak resident set size of this process (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# --------------------------------------------------------------------------------------------
# model, data, task vectors, coefficients


MODEL_SOURCE = {"how": None}
# Bench-only towers built with open_clip's own builder, for smoke runs (e.g. the triton backend in
# Triton's CPU interpreter): 2 layers of width 64 on 64 x 64 images, about 0.1M parameters.
TINY_MODELS = {
    "ViT-tiny": {"embed_dim": 32, "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16,
                                                 "head_width": 32}},
}


def _vision_tower_without_open_clip_init(model: str) -> torch.nn.Module:
    """Fallback when ``import open_clip`` fails for want of one of its import-time dependencies
    (regex, ftfy, torchvision, PIL, tqdm, ... which the tokenizer and image transforms need, not the
    image tower). Imports only ``open_clip.model`` from the installed package, without running the
    package's ``__init__``, with a stand-in for ``torchvision.ops.misc.FrozenBatchNorm2d`` (used only
    to freeze ResNet batch norms) when torchvision is missing, and builds the tower from the
    package's own config with ``_build_vision_tower`` exactly as ``CLIP.__init__`` does (first,
    so the same seed gives the same weights as ``create_model``)."""
    import importlib
    import importlib.util
    import json
    import sys
    import types

    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("open_clip_torch is not installed (pip install open_clip_torch)")
    root = list(spec.submodule_search_locations)[0]
    try:
        import torchvision.ops.misc  # noqa: F401
    except Exception:
        tv = types.ModuleType("torchvision")
        ops_m = types.ModuleType("torchvision.ops")
        misc = types.ModuleType("torchvision.ops.misc")

        class FrozenBatchNorm2d(torch.nn.Module):  # never built for a ViT
            def __init__(self, *a, **k):
                raise RuntimeError("torchvision is missing: FrozenBatchNorm2d is unavailable")

        misc.FrozenBatchNorm2d = FrozenBatchNorm2d
        tv.ops, ops_m.misc = ops_m, misc
        tv.__path__, ops_m.__path__ = [], []
        sys.modules.update({"torchvision": tv, "torchvision.ops": ops_m, "torchvision.ops.misc": misc})
    if "open_clip" not in sys.modules:
        pkg = types.ModuleType("open_clip")
        pkg.__path__ = [root]
        sys.modules["open_clip"] = pkg
    oc_model = importlib.import_module("open_clip.model")
    if model in TINY_MODELS:
        cfg = TINY_MODELS[model]
    else:
        with open(os.path.join(root, "model_configs", f"{model}.json")) as f:
            cfg = json.load(f)
    return oc_model._build_vision_tower(cfg["embed_dim"], cfg["vision_cfg"], cfg.get("quick_gelu", False), None)


def build_visual(model: str, seed: int) -> torch.nn.Module:
    """``model.visual`` of an open_clip model with seeded random weights, fp32, on the CPU."""
    logging.getLogger().setLevel(logging.ERROR)  # "No pretrained weights loaded" is expected
    torch.manual_seed(seed)
    try:
        import open_clip

        if model in TINY_MODELS:
            from open_clip.model import _build_vision_tower

            cfg = TINY_MODELS[model]
            visual = _build_vision_tower(cfg["embed_dim"], cfg["vision_cfg"])
        else:
            full = open_clip.create_model(model, pretrained=None)
            visual = full.visual
            del full
        MODEL_SOURCE["how"] = "open_clip.create_model"
    except ImportError as e:
        visual = _vision_tower_without_open_clip_init(model)
        MODEL_SOURCE["how"] = f"open_clip.model._build_vision_tower (import open_clip failed: {e})"
    visual.train()
    for p in visual.parameters():
        p.requires_grad_(False)
    return visual


def image_size(visual) -> tuple:
    s = getattr(visual, "image_size", 224)
    return tuple(s) if isinstance(s, (tuple, list)) else (s, s)


def make_data(visual, batch: int, classes: int, seed: int, dev: torch.device):
    """(images, labels, head), drawn on the CPU so every device sees the same numbers."""
    g = torch.Generator().manual_seed(seed + 1)
    h, w = image_size(visual)
    x = torch.randn(batch, 3, h, w, generator=g)
    y = torch.randint(0, classes, (batch,), generator=g)
    d = visual.output_dim
    head = torch.randn(classes, d, generator=g) / math.sqrt(d)
    return x.to(dev), y.to(dev), head.to(dev)


def adapted_blocks(visual) -> Dict[str, torch.Tensor]:
    return {n: p for n, p in visual.named_parameters() if p.is_floating_point()}


def make_slabs(visual, n: int, storage: str, dev: torch.device, seed: int, tau_scale: float) -> Dict[str, torch.Tensor]:
    """N random task vectors per block, built on the device row by row (one fp32 block at a time)."""
    build_dtype = STORAGE_DTYPES[storage] if storage in FLOAT_STORAGES else torch.bfloat16
    gen = torch.Generator(device=dev).manual_seed(seed + 2)
    slabs = {}
    for name, p in adapted_blocks(visual).items():
        rms = float(p.detach().float().pow(2).mean().sqrt()) if p.numel() else 0.0
        std = tau_scale * max(rms, 1e-2)
        slab = torch.empty((n, *p.shape), dtype=build_dtype, device=dev)
        for i in range(n):
            if build_dtype == torch.float32:
                slab[i].normal_(0.0, std, generator=gen)
            else:
                row = torch.empty(p.shape, dtype=torch.float32, device=dev).normal_(0.0, std, generator=gen)
                slab[i].copy_(row)
                del row
        slabs[name] = slab
    return slabs


_LORA_BLOCK = re.compile(r"(in_proj_weight|out_proj\.weight|mlp\.c_fc\.weight|mlp\.c_proj\.weight)$")


def lora_rank(storage: str) -> Optional[int]:
    """The rank of a ``lora-r<R>`` storage, else None."""
    return int(storage[len("lora-r"):]) if storage and storage.startswith("lora-r") else None


def make_lora_factors(visual, n: int, rank: int, dev: torch.device, seed: int, tau_scale: float):
    """N random LoRA task vectors (fp16 factors) on the attention and MLP matrices: ``A [N, r, in]``,
    ``B [N, out, r]``, scaled so that ``B A`` has about the dense task vectors' magnitude."""
    gen = torch.Generator(device=dev).manual_seed(seed + 3)
    out = {}
    for name, p in adapted_blocks(visual).items():
        if p.dim() != 2 or not _LORA_BLOCK.search(name):
            continue
        rms = float(p.detach().float().pow(2).mean().sqrt())
        std = (tau_scale * max(rms, 1e-2) / math.sqrt(rank)) ** 0.5
        a = torch.empty((n, rank, p.shape[1]), device=dev).normal_(0.0, std, generator=gen)
        b = torch.empty((n, p.shape[0], rank), device=dev).normal_(0.0, std, generator=gen)
        out[name] = (a.half(), b.half())
    return out


def coef_init(name: str, shape, seed: int, scale: float) -> torch.Tensor:
    """The initial coefficients of block ``name``: ``U(-scale, scale)``, seeded by (seed, name)."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) & 0x7FFFFFFF)
    return (torch.rand(tuple(shape), generator=g, dtype=torch.float32) * 2 - 1) * scale


def contiguous_counts(numel: int, k: int) -> List[int]:
    """Sizes of the K parts of a ``contiguous`` partition, ``part(e) = e * K // numel``
    (atlas_kernels.partitions): part k holds ``e in [ceil(k n / K), ceil((k+1) n / K))``."""
    starts = [-(-(j * numel) // k) for j in range(k + 1)]
    return [starts[j + 1] - starts[j] for j in range(k)]


# --------------------------------------------------------------------------------------------
# the methods' training steps


class StepBuilder:
    """Builds ``step()`` for one job; keeps references alive for as long as it lives."""

    def __init__(self, job: Job, settings: Settings, visual, slabs, tvs_factory, dev: torch.device):
        self.job, self.s, self.visual, self.dev = job, settings, visual, dev
        self.slabs = slabs
        self.tvs_factory = tvs_factory
        self.x, self.y, self.head = make_data(visual, job.batch, settings.classes, settings.seed, dev)
        ad = AUTOCAST_DTYPES[job.precision]
        self.autocast = (lambda: torch.autocast(device_type=dev.type, dtype=ad)) if ad is not None else nullcontext
        self.scaler = torch.amp.GradScaler(dev.type) if job.precision == "fp16" else None
        self.extra: dict = {}

    def _loss(self, feats):
        return F.cross_entropy(feats.float() @ self.head.t(), self.y)

    def _backward_and_step(self, loss, opt):
        opt.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(opt)
            self.scaler.update()
        else:
            loss.backward()
            opt.step()

    def _coefficients(self, k: int) -> Dict[str, torch.nn.Parameter]:
        n = self.job.n_task_vectors
        shape = (n,) if k == 1 else (n, k)
        return {
            b: torch.nn.Parameter(coef_init(b, shape, self.s.seed, self.s.coef_scale).to(self.dev))
            for b in self.slabs
        }

    # -- floor ---------------------------------------------------------------------------
    def floor_step(self) -> Callable[[], None]:
        """The plain model's training step: forward, backward with weight gradients (set to None
        before each backward, as ``zero_grad`` does). No optimizer step over the weights: the floor
        (docs/PERFORMANCE.md) is forward + backward with weight gradients, which is what
        the fused step has to beat (it needs G); an AdamW step over 88M fp32 weights would add
        several model-sized passes that aTLAS never makes."""
        visual = self.visual
        params = [p for p in visual.parameters() if p.is_floating_point()]
        for p in params:
            p.requires_grad_(True)
        self.extra["optimizer_step"] = False

        def step():
            for p in params:
                p.grad = None
            with self.autocast():
                feats = visual(self.x)
            loss = self._loss(feats)
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
            else:
                loss.backward()

        return step

    # -- naive -----------------------------------------------------------------------------
    def naive_step(self) -> Callable[[], None]:
        """The paper's way: every block rebuilt every step as a Python sum of N coefficient-times-
        task-vector products plus theta0 (``reference.naive_compose``), task vectors kept as N
        separate tensors per block, the tower run through ``torch.func.functional_call``.
        With K partitions each product is ``cat([chunk_k * c[i, k]])`` over the K contiguous chunks
        (the paper multiplies by K one-hot masks instead, which costs more)."""
        from torch.func import functional_call

        from atlas_kernels.reference import naive_compose

        k = self.job.partitions
        visual = self.visual
        theta0 = {b: p.detach() for b, p in visual.named_parameters() if b in self.slabs}
        taus = {b: list(s.unbind(0)) for b, s in self.slabs.items()}
        coefs = self._coefficients(k)
        counts = {b: contiguous_counts(theta0[b].numel(), k) for b in self.slabs}
        opt = torch.optim.AdamW(list(coefs.values()), lr=self.s.lr)
        self._keep = (theta0, taus, coefs, opt)

        def compose(b):
            c = coefs[b]
            if k == 1:
                return naive_compose(theta0[b], taus[b], [c[i] for i in range(len(taus[b]))])
            shape = theta0[b].shape
            terms = [
                torch.cat([ch * c[i, j] for j, ch in enumerate(t.reshape(-1).split(counts[b]))]).view(shape)
                for i, t in enumerate(taus[b])
            ]
            return sum(terms) + theta0[b]

        def step():
            params = {b: compose(b) for b in taus}
            with self.autocast():
                feats = functional_call(visual, params, (self.x,))
            loss = self._loss(feats)
            self._backward_and_step(loss, opt)

        return step

    # -- merge_once ----------------------------------------------------------------------------
    def merge_once_step(self) -> Callable[[], None]:
        """Layer-wise merging libraries' way: every block composed once per step with one tensor op
        over the stacked slab, ``theta0 + tensordot(coef, tau, 1)`` (coefficients cast to the
        storage dtype, the result to theta0's dtype), then one ``functional_call``. With K
        partitions: one ``coef[:, k] @ chunk_k`` per contiguous chunk, concatenated."""
        from torch.func import functional_call

        k = self.job.partitions
        visual = self.visual
        theta0 = {b: p.detach() for b, p in visual.named_parameters() if b in self.slabs}
        flat = {b: s.reshape(s.shape[0], -1) for b, s in self.slabs.items()}
        coefs = self._coefficients(k)
        counts = {b: contiguous_counts(theta0[b].numel(), k) for b in self.slabs}
        opt = torch.optim.AdamW(list(coefs.values()), lr=self.s.lr)
        self._keep = (theta0, flat, coefs, opt)

        def compose(b):
            t0, f, c = theta0[b], flat[b], coefs[b].to(flat[b].dtype)
            if k == 1:
                delta = torch.tensordot(c, f, dims=1)
            else:
                delta = torch.cat([c[:, j] @ ch for j, ch in enumerate(f.split(counts[b], dim=1))])
            return t0 + delta.to(t0.dtype).view(t0.shape)

        def step():
            params = {b: compose(b) for b in flat}
            with self.autocast():
                feats = functional_call(visual, params, (self.x,))
            loss = self._loss(feats)
            self._backward_and_step(loss, opt)

        return step

    # -- atlas -----------------------------------------------------------------------------------
    def atlas_step(self) -> Callable[[], None]:
        """This library: ``atlas_kernels.patch(model.visual, tvs, partitions=K, backend=...)``, then
        AdamW on ``atlas_kernels.coefficients(model.visual).values()``."""
        import atlas_kernels as ak

        visual = self.visual
        tvs = self.tvs_factory()
        ak.patch(visual, tvs, partitions=self.job.partitions, backend=self.job.backend)
        coefs = ak.coefficients(visual)
        with torch.no_grad():
            for name, c in coefs.items():
                c.copy_(coef_init(name, c.shape, self.s.seed, self.s.coef_scale).to(c.device, c.dtype))
        self.extra["coef_init_matched"] = all(name in self.slabs for name in coefs)
        ids = {id(c) for c in coefs.values()}
        for p in visual.parameters():
            if id(p) not in ids:
                p.requires_grad_(False)
        opt = torch.optim.AdamW(list(coefs.values()), lr=self.s.lr)
        self._keep = (tvs, coefs, opt)

        def step():
            with self.autocast():
                feats = visual(self.x)
            loss = self._loss(feats)
            self._backward_and_step(loss, opt)

        return step

    def build(self) -> Callable[[], None]:
        return getattr(self, f"{self.job.method}_step")()


# --------------------------------------------------------------------------------------------
# timing


def _quantiles(times_ms: List[float]) -> dict:
    t = torch.tensor(times_ms, dtype=torch.float64)
    q = torch.quantile(t, torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64)).tolist()
    return {"step_ms": q[0], "step_ms_p20": q[1], "step_ms_p80": q[2]}


def time_step(step: Callable[[], None], dev: torch.device, settings: Settings) -> dict:
    """Warm up, then time. GPU: CUDA events around every step, peak from max_memory_allocated
    (reset after warm-up, so it is the steady-state step's peak including everything resident).
    CPU: time.perf_counter around every step, peak RSS of this process (ru_maxrss)."""
    # The first call apart: Triton compiles and autotunes here (and the caching allocator grows), so
    # first_step_ms is compile + autotune + one step; step_ms below is the steady state only.
    _sync(dev)
    t0 = time.perf_counter()
    step()
    _sync(dev)
    first_ms = (time.perf_counter() - t0) * 1e3
    for _ in range(max(0, settings.warmup - 1)):
        step()
    _sync(dev)
    if dev.type == "cuda":
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        step()
        b.record()
        torch.cuda.synchronize()
        est_ms = max(a.elapsed_time(b), 1e-3)
        n = settings.steps or int(min(50, max(5, round(settings.target_s * 1e3 / est_ms))))
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
        torch.cuda.reset_peak_memory_stats(dev)
        for s, e in events:
            s.record()
            step()
            e.record()
        torch.cuda.synchronize()
        times = [s.elapsed_time(e) for s, e in events]
        out = _quantiles(times)
        out.update(peak_bytes=int(torch.cuda.max_memory_allocated(dev)),
                   peak_reserved_bytes=int(torch.cuda.max_memory_reserved(dev)),
                   peak_kind="cuda.max_memory_allocated")
    else:
        n = settings.steps or 5
        load0 = os.getloadavg()[0]
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
        out = _quantiles(times)
        # the machine may be shared: the 1-minute load average before and after says how much
        out.update(peak_bytes=max_rss_bytes(), peak_kind="ru_maxrss", threads=torch.get_num_threads(),
                   loadavg_1m=[round(load0, 2), round(os.getloadavg()[0], 2)])
    out.update(steps_timed=n, warmup=settings.warmup, first_step_ms=first_ms)
    return out


def count_ops(step: Callable[[], None], dev: torch.device) -> dict:
    """One more step under torch.profiler: ``launches`` (GPU activities: kernels, memcpy, memset)
    and ``aten_ops`` (aten:: operator calls, nested ones included)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=acts) as prof:
        step()
        _sync(dev)
    evs = prof.events()
    out = {"aten_ops": sum(1 for e in evs if e.name.startswith("aten::"))}
    if dev.type == "cuda":
        cuda_t = torch.autograd.DeviceType.CUDA
        out["launches"] = sum(1 for e in evs if getattr(e, "device_type", None) == cuda_t)
    return out


# --------------------------------------------------------------------------------------------
# the ceiling


def measure_ceiling(dev: torch.device) -> dict:
    """Copy bandwidth (bytes read + written per second, in 1e9) and matmul rate (1e12 flop/s):
    GPU: a 1 GiB device-to-device copy and a bf16 8192^3 matmul, CUDA events, medians of 20;
    CPU: a 256 MiB copy and an fp32 2048^3 matmul, perf_counter, medians of 10 and 5."""

    def med(fn, reps, warm=3):
        for _ in range(warm):
            fn()
        _sync(dev)
        ts = []
        for _ in range(reps):
            if dev.type == "cuda":
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                torch.cuda.synchronize()
                ts.append(a.elapsed_time(b) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
        ts.sort()
        return ts[len(ts) // 2]

    gpu = dev.type == "cuda"
    nbytes = (1 << 30) if gpu else (1 << 28)
    n = 8192 if gpu else 2048
    mdt = torch.bfloat16 if gpu else torch.float32

    def copy_time():
        src = torch.empty(nbytes, dtype=torch.uint8, device=dev).fill_(1)
        dst = torch.empty_like(src)
        return med(lambda: dst.copy_(src), 20 if gpu else 10)

    def mm_time():
        a = torch.randn(n, n, device=dev, dtype=mdt)
        b = torch.randn(n, n, device=dev, dtype=mdt)
        c = torch.empty(n, n, device=dev, dtype=mdt)
        return med(lambda: torch.mm(a, b, out=c), 20 if gpu else 5)

    t_copy = copy_time()
    t_mm = mm_time()
    free_memory()
    return {
        "copy_gbps": 2 * nbytes / t_copy / 1e9,
        "matmul_tflops": 2 * n**3 / t_mm / 1e12,
        "copy_bytes": nbytes,
        "matmul_n": n,
        "matmul_dtype": str(mdt).replace("torch.", ""),
    }


# --------------------------------------------------------------------------------------------
# a session: runs jobs, caching models (GPU) and task vectors between them


class Session:
    """Runs jobs in this process. ``cache_models``: keep a CPU master copy of each tower and give
    every job a fresh device copy (GPU runs); otherwise build the tower per job (a CPU worker runs
    one job per process). Task vectors are cached for consecutive jobs with the same
    (model, N, storage) and dropped before a job that needs none (so floor peaks exclude them)."""

    def __init__(self, dev: torch.device, settings: Settings, cache_models: bool):
        self.dev, self.s, self.cache_models = dev, settings, cache_models
        if dev.type == "cpu" and settings.threads:
            torch.set_num_threads(settings.threads)
        self._masters: Dict[str, torch.nn.Module] = {}
        self._tv_key = None
        self._slabs = None
        self._tvs = None

    def _master(self, model: str):
        if model not in self._masters:
            self._masters.clear()
            self._masters[model] = build_visual(model, self.s.seed)
        return self._masters[model]

    def visual(self, model: str):
        if self.cache_models:
            return copy.deepcopy(self._master(model)).to(self.dev)
        return build_visual(model, self.s.seed).to(self.dev)

    def drop_task_vectors(self):
        self._tv_key = self._slabs = self._tvs = None
        free_memory()

    def slabs(self, job: Job, visual) -> Dict[str, torch.Tensor]:
        key = (job.model, job.n_task_vectors, job.storage)
        if self._tv_key != key:
            self.drop_task_vectors()
            rank = lora_rank(job.storage)
            if rank:
                self._slabs = make_lora_factors(visual, job.n_task_vectors, rank, self.dev, self.s.seed,
                                                self.s.tau_scale)
            else:
                self._slabs = make_slabs(visual, job.n_task_vectors, job.storage, self.dev, self.s.seed,
                                         self.s.tau_scale)
            self._tv_key = key
        return self._slabs

    def task_vectors(self, storage: str):
        """The same slabs as an ``atlas_kernels.TaskVectors`` (built once; the float slabs are
        then taken from it, so naive/merge_once and atlas share one copy)."""
        import atlas_kernels as ak

        if self._tvs is None and lora_rank(storage):
            n = next(iter(self._slabs.values()))[0].shape[0]
            self._tvs = ak.TaskVectors({}, lora=dict(self._slabs), n=n)
            return self._tvs
        if self._tvs is None:
            tvs = ak.TaskVectors(dict(self._slabs))
            if storage not in FLOAT_STORAGES:  # built in bf16, quantized here (per-row scales)
                tvs = tvs.to_storage(storage)
            self._slabs = {b: tvs[b] for b in tvs.blocks}  # drop anything TaskVectors copied
            self._tvs = tvs
        return self._tvs

    def run(self, job: Job) -> dict:
        """Measure one job: a dict of the measured fields (no run info), never raises."""
        t_start = time.perf_counter()
        out: dict = {"oom": False}
        if not job.needs_task_vectors and self._tv_key is not None:
            self.drop_task_vectors()
        try:
            if job.method == "ceiling":
                out.update(measure_ceiling(self.dev))
            else:
                out.update(self._run_step(job))
        except BaseException as e:  # noqa: BLE001 - a failed configuration is a result
            if isinstance(e, KeyboardInterrupt):
                raise
            if is_oom(e):
                out["oom"] = True
                out["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
                if self.dev.type == "cuda":
                    out["peak_bytes"] = int(torch.cuda.max_memory_allocated(self.dev))
                    out["peak_kind"] = "cuda.max_memory_allocated (until OOM)"
            else:
                out["error"] = f"{type(e).__name__}: {str(e)[:500]}"
            e = None  # drop the traceback's frames (and their tensors) before freeing memory
        free_memory()
        out["wall_s"] = round(time.perf_counter() - t_start, 2)
        return out

    def _run_step(self, job: Job) -> dict:
        base_rss = rss_bytes() if self.dev.type == "cpu" else None  # interpreter + torch, no model yet
        visual = self.visual(job.model)
        res: dict = {"adapted_params": sum(p.numel() for p in adapted_blocks(visual).values())}
        if base_rss is not None:
            res["base_rss_bytes"] = base_rss
        if MODEL_SOURCE["how"] != "open_clip.create_model":
            res["model_source"] = MODEL_SOURCE["how"]
        slabs = None
        if job.needs_task_vectors:
            if job.method != "atlas" and job.storage not in FLOAT_STORAGES:
                raise ValueError(f"{job.method} needs floating task vectors, not {job.storage}")
            slabs = self.slabs(job, visual)
            if job.method == "atlas":
                tvs = self.task_vectors(job.storage)
                if lora_rank(job.storage):
                    res["adapted_params"] = tvs.numel  # the LoRA-adapted matrices only
            slabs = self._slabs
        if job.method in ("atlas", "floor"):  # the library's planner, read from the unpatched tower
            try:
                import atlas_kernels as ak

                tv_spec = (job.n_task_vectors, job.storage) if job.method == "atlas" else None
                est = ak.estimate_memory(visual, tv_spec, job.batch, precision=job.precision,
                                         partitions=job.partitions or 1, device=self.dev.type)
                res["predicted_peak_bytes"] = int(est.total)
            except Exception as e:  # an older library without a planner, or a case it refuses
                res["predict_error"] = f"{type(e).__name__}: {str(e)[:200]}"
        builder = StepBuilder(job, self.s, visual, slabs, lambda: self.task_vectors(job.storage), self.dev)
        if self.dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.dev)
        res["setup_rss_bytes"] = rss_bytes() if self.dev.type == "cpu" else None
        step = builder.build()
        res.update(time_step(step, self.dev, self.s))
        if self.s.profile:
            try:
                res.update(count_ops(step, self.dev))
            except Exception as e:  # the numbers above stand without it
                res["profile_error"] = f"{type(e).__name__}: {str(e)[:200]}"
        res.update(builder.extra)
        del step, builder, visual
        return res
