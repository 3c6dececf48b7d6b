"""The training run: configuration, checks, setup, the loop, checkpoints and outputs.

Every piece is an importable function; :func:`run` strings them together and is what
``python -m atlas_kernels.train`` calls.

Distributed: under ``torchrun`` (``WORLD_SIZE`` > 1) every process builds the same model and
heads, takes a contiguous slice of each *global* batch (``--batch-size`` is global), and the
coefficient gradients (the only trainable parameters) are summed with one ``all_reduce`` per
optimizer step before unscaling, clipping and stepping. Every loss is a sum over the local samples
divided by the global batch size, so the sum of the ranks' gradients is exactly the gradient of the
global batch, and every rank takes the same optimizer step. (This is what DDP would do, without
wrapping a module whose frozen blocks take no gradient; evaluation is sharded the same way.)

Resume: checkpoints hold the coefficients, optimizer, scheduler, grad scaler, RNG states, best
coefficients and history, as tensors and plain Python values, read back with
``torch.load(weights_only=True)``. The data order and augmentation are functions of
``(seed, epoch, position)`` (see :mod:`atlas_kernels.train.data`), so a resumed run takes the same
steps as an uninterrupted one. A checkpoint records a fingerprint of the run (hyper-parameters,
task vectors, data); resuming with another run's checkpoint is refused before training starts.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from . import data as D
from .heatmap import save_heatmap
from .model import (build_model, get_templates, get_tokenizer, logit_scale, read_classnames,
                    register_model_config, zero_shot_head)
from .objectives import OBJECTIVES, TTA_LOSSES, Objective, make_objective

CHECKPOINT_FORMAT = "atlas_kernels.train/1"
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
PARTITION_MODES = ("contiguous", "hash")
SELECTS = ("auto", "best", "last")


class ConfigError(ValueError):
    """A command line or configuration that cannot run; raised before any training."""


@dataclass
class TrainConfig:
    """Everything a run needs. Field names match the command-line options (``--batch-size`` ->
    ``batch_size``)."""

    task_vectors: str
    out: str
    objective: str = "fewshot"
    train: List[str] = field(default_factory=list)
    val: List[str] = field(default_factory=list)
    control_train: Optional[str] = None
    control_val: Optional[str] = None
    names: Optional[List[str]] = None
    classnames: Optional[List[str]] = None
    model: Optional[str] = None
    model_config: Optional[str] = None
    weights: Optional[str] = None
    templates: str = "openai"
    shots: Optional[int] = None
    augment: bool = False
    tta_loss: str = "pseudo"
    confidence: float = 0.95
    control_threshold: float = 0.95
    control_weight: float = 1.0
    epochs: int = 10
    batch_size: int = 32
    eval_batch_size: Optional[int] = None
    accum_steps: int = 1
    lr: float = 1e-2
    weight_decay: float = 0.0
    warmup_steps: int = 0
    clip_grad: float = 1.0
    precision: str = "auto"
    partitions: int = 1
    partition_mode: str = "contiguous"
    backend: str = "auto"
    blocks: Optional[List[str]] = None
    select: str = "auto"
    seed: int = 0
    device: str = "auto"
    workers: int = 2
    resume: Optional[str] = None
    save_every: int = 0
    stop_after_steps: Optional[int] = None
    log_every: int = 10
    export_merged: Optional[str] = None
    quiet: bool = False


# fields that may differ between a run and its resumption (they do not change the result)
_NOT_FINGERPRINTED = {"out", "resume", "save_every", "stop_after_steps", "log_every",
                      "export_merged", "workers", "device", "eval_batch_size", "quiet", "backend",
                      "train", "val", "control_train", "control_val", "weights", "task_vectors",
                      "model_config"}


# ----------------------------------------------------------------------------------------------
# checks


def validate_config(cfg: TrainConfig) -> None:
    """Raise :class:`ConfigError` for an unusable configuration (no file is read here)."""
    def bad(msg):
        raise ConfigError(msg)

    if cfg.objective not in OBJECTIVES:
        bad(f"unknown objective {cfg.objective!r}; choose one of {', '.join(OBJECTIVES)}")
    if not cfg.task_vectors:
        bad("--task-vectors is required")
    if not cfg.model and not cfg.model_config:
        bad("give an open_clip model name with --model (or a config file with --model-config)")
    nt, nv = len(cfg.train), len(cfg.val)
    if cfg.objective in ("fewshot", "tta", "negation") and (nt != 1 or nv != 1):
        bad(f"objective {cfg.objective!r} takes one --train and one --val folder "
            f"(got {nt} and {nv})")
    if cfg.objective == "addition" and (nt < 1 or nv != nt):
        bad(f"objective 'addition' takes one --val folder per --train folder (got {nt} --train, "
            f"{nv} --val)")
    if cfg.objective == "negation":
        if not cfg.control_train or not cfg.control_val:
            bad("objective 'negation' needs --control-train and --control-val (the control set "
                "whose accuracy is held)")
    elif cfg.control_train or cfg.control_val:
        bad("--control-train/--control-val are for objective 'negation' only")
    n_tasks = nt + (1 if cfg.objective == "negation" else 0)
    if cfg.names is not None and len(cfg.names) != n_tasks:
        bad(f"--names has {len(cfg.names)} names for {n_tasks} dataset(s)")
    if cfg.names is not None and len(set(cfg.names)) != len(cfg.names):
        bad(f"--names must be distinct (got {cfg.names})")
    if cfg.classnames is not None and len(cfg.classnames) != n_tasks:
        bad(f"--classnames has {len(cfg.classnames)} files for {n_tasks} dataset(s)")
    for k in ("epochs", "batch_size", "accum_steps", "partitions", "log_every"):
        if int(getattr(cfg, k)) < 1:
            bad(f"--{k.replace('_', '-')} must be at least 1 (got {getattr(cfg, k)})")
    if cfg.eval_batch_size is not None and cfg.eval_batch_size < 1:
        bad("--eval-batch-size must be at least 1")
    for k in ("warmup_steps", "save_every", "workers"):
        if int(getattr(cfg, k)) < 0:
            bad(f"--{k.replace('_', '-')} must not be negative")
    if cfg.shots is not None and cfg.shots < 0:
        bad("--shots must not be negative")
    if cfg.shots and cfg.objective == "tta":
        bad("--shots is for labelled objectives; tta uses all of its unlabelled images")
    if cfg.stop_after_steps is not None and cfg.stop_after_steps < 1:
        bad("--stop-after-steps must be at least 1")
    if not cfg.lr > 0:
        bad("--lr must be positive")
    if cfg.weight_decay < 0 or cfg.clip_grad < 0:
        bad("--weight-decay and --clip-grad must not be negative")
    if cfg.precision not in PRECISIONS:
        bad(f"unknown precision {cfg.precision!r}; choose one of {PRECISIONS}")
    if cfg.partition_mode not in PARTITION_MODES:
        bad(f"unknown partition mode {cfg.partition_mode!r}; choose one of {PARTITION_MODES}")
    if cfg.select not in SELECTS:
        bad(f"unknown --select {cfg.select!r}; choose one of {SELECTS}")
    if cfg.tta_loss not in TTA_LOSSES:
        bad(f"unknown --tta-loss {cfg.tta_loss!r}; choose one of {TTA_LOSSES}")
    if not 0.0 < cfg.confidence <= 1.0:
        bad("--confidence must be in (0, 1]")
    if not 0.0 <= cfg.control_threshold <= 1.0:
        bad("--control-threshold must be in [0, 1] (a fraction of the zero-shot accuracy)")


@dataclass
class TaskData:
    name: str
    classes: List[str]           # class folder names (sorted)
    classnames: List[str]        # names used in prompts
    train: List[D.Sample]
    val: List[D.Sample]
    train_path: str
    val_path: str


def _default_name(path: str) -> str:
    p = Path(path).resolve()
    if p.name.lower() in {"train", "val", "valid", "validation", "test", "images", "unlabelled",
                          "unlabeled"} and p.parent.name:
        return p.parent.name
    return p.name or "data"


def load_tasks(cfg: TrainConfig) -> List[TaskData]:
    """Scan and check every data folder (missing, empty, mismatched classes), apply k-shot
    sampling, and name the datasets. Raises :class:`~atlas_kernels.train.data.DataError`."""
    pairs = list(zip(cfg.train, cfg.val))
    if cfg.objective == "negation":
        pairs.append((cfg.control_train, cfg.control_val))
    roles = (["target", "control"] if cfg.objective == "negation" else
             ["unlabelled" if cfg.objective == "tta" else "train"] * len(pairs))
    tasks = []
    used = set()
    for i, ((tr, va), role) in enumerate(zip(pairs, roles)):
        vrole = "control validation" if role == "control" else "validation"
        if cfg.objective == "tta":
            tr_classes, tr_samples = D.scan_unlabelled_folder(tr, f"{role} (--train)")
            va_classes, va_samples = D.scan_image_folder(va, f"{vrole} (--val)")
            if tr_classes is not None:
                D.check_same_classes(tr_classes, va_classes, tr, va)
            tr_samples = [(p, -1) for p, _ in tr_samples]  # never look at labels
        else:
            flag = "--control-train" if role == "control" else "--train"
            tr_classes, tr_samples = D.scan_image_folder(tr, f"{role} ({flag})")
            va_classes, va_samples = D.scan_image_folder(
                va, f"{vrole} ({'--control-val' if role == 'control' else '--val'})")
            D.check_same_classes(tr_classes, va_classes, tr, va)
            tr_samples = D.k_shot(tr_samples, cfg.shots, cfg.seed + i)
        classes = va_classes
        names = (read_classnames(cfg.classnames[i], classes) if cfg.classnames
                 else D.classnames_from_folders(classes))
        name = cfg.names[i] if cfg.names else _default_name(tr)
        base, k = name, 1
        while name in used:
            k += 1
            name = f"{base}_{k}"
        used.add(name)
        tasks.append(TaskData(name, classes, names, tr_samples, va_samples, str(tr), str(va)))
    return tasks


def _hash_strings(xs: Sequence[str]) -> str:
    h = hashlib.sha256()
    for x in xs:
        h.update(x.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def fingerprint(cfg: TrainConfig, tasks: Sequence[TaskData], tvs) -> Dict[str, Any]:
    """What makes two runs the same run: hyper-parameters, task vectors and data (by content
    summary, not by path, so a moved data folder still resumes)."""
    fp = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _NOT_FINGERPRINTED}
    fp["task_vectors"] = {"names": [str(n) for n in tvs.names], "blocks": _hash_strings(
        [str(b) for b in tvs.blocks]), "nbytes": int(tvs.nbytes)}
    w = Path(cfg.weights) if cfg.weights else None
    fp["weights"] = (None if w is None else
                     {"name": w.name, "size": w.stat().st_size if w.is_file() else None})
    fp["data"] = [{"name": t.name, "classes": _hash_strings(t.classes), "n_train": len(t.train),
                   "train": _hash_strings([Path(p).name for p, _ in t.train]),
                   "n_val": len(t.val)} for t in tasks]
    return json.loads(json.dumps(fp))


def fingerprint_diff(a: Dict[str, Any], b: Dict[str, Any]) -> List[str]:
    return [f"{k}: checkpoint {a.get(k)!r} != now {b.get(k)!r}"
            for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def load_checkpoint(path) -> Dict[str, Any]:
    """A training checkpoint, read with ``weights_only=True`` (never runs code from the file)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"resume file '{p}' does not exist")
    try:
        ckpt = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConfigError(f"resume file '{p}' is not a training checkpoint "
                          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(f"resume file '{p}' is not an atlas_kernels.train checkpoint "
                          f"(format {CHECKPOINT_FORMAT})")
    return ckpt


def check_resume(ckpt: Dict[str, Any], fp: Dict[str, Any], path) -> None:
    diff = fingerprint_diff(ckpt["fingerprint"], fp)
    if diff:
        raise ConfigError(f"resume file '{path}' comes from another run; it differs in:\n  "
                          + "\n  ".join(diff))


# ----------------------------------------------------------------------------------------------
# distributed


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    initialized_here: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_kind: str) -> Dist:
    """Join the process group that ``torchrun`` describes in the environment (nccl on GPUs,
    gloo on CPUs); a single process without ``WORLD_SIZE`` > 1 gets a trivial :class:`Dist`."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_initialized():
        return Dist(dist.get_rank(), dist.get_world_size(), local, False)
    dist.init_process_group(backend="nccl" if device_kind == "cuda" else "gloo")
    return Dist(rank, world, local, True)


def _all_reduce(t: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.world > 1:
        import torch.distributed as dist

        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def resolve_device(spec: str, d: Dist) -> torch.device:
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(spec)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda was asked for, but no CUDA device is available")
        if dev.index is None:
            dev = torch.device("cuda", d.local_rank if d.world > 1 else torch.cuda.current_device())
        torch.cuda.set_device(dev)
    return dev


def resolve_precision(spec: str, device: torch.device) -> str:
    if spec != "auto":
        return spec
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


# ----------------------------------------------------------------------------------------------
# schedule, RNG, logging


def cosine_lambda(total_steps: int, warmup_steps: int):
    """Linear warm-up to 1, then cosine decay to 0 at ``total_steps`` (a LambdaLR factor)."""
    def f(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        span = max(1, total_steps - warmup_steps)
        t = min(1.0, (step - warmup_steps) / span)
        return 0.5 * (1.0 + math.cos(math.pi * t))
    return f


def get_rng_state() -> Dict[str, Any]:
    st = {"torch": torch.get_rng_state(), "python": _py_state_to_plain(random.getstate()),
          "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
    try:
        import numpy as np

        name, keys, pos, has_gauss, cached = np.random.get_state()
        st["numpy"] = {"name": name, "keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached": float(cached)}
    except ImportError:  # pragma: no cover
        st["numpy"] = None
    return st


def set_rng_state(st: Dict[str, Any]) -> None:
    torch.set_rng_state(st["torch"])
    random.setstate(_py_state_from_plain(st["python"]))
    if st.get("cuda") is not None and torch.cuda.is_available() \
            and len(st["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(st["cuda"])
    if st.get("numpy") is not None:
        import numpy as np

        n = st["numpy"]
        np.random.set_state((n["name"], n["keys"].numpy().astype("uint32"), n["pos"],
                             n["has_gauss"], n["cached"]))


def _py_state_to_plain(s):
    return [s[0], list(s[1]), s[2]]


def _py_state_from_plain(s):
    return (s[0], tuple(s[1]), s[2])


class Logger:
    def __init__(self, enabled: bool):
        self.enabled = enabled

    def __call__(self, msg: str) -> None:
        if self.enabled:
            print(f"[atlas_kernels.train] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# the run


@dataclass
class Setup:
    """Everything built before the first step (see :func:`setup`)."""
    cfg: TrainConfig
    dist: Dist
    device: torch.device
    precision: str
    model: Any
    coefs: Dict[str, torch.nn.Parameter]
    tvs: Any
    tasks: List[TaskData]
    heads: List[torch.Tensor]
    scale: float
    objective: Objective
    train_sets: List[D.ImageDataset]
    eval_sets: List[D.ImageDataset]
    fingerprint: Dict[str, Any]
    ckpt: Optional[Dict[str, Any]]
    log: Logger


def setup(cfg: TrainConfig) -> Setup:
    """Check inputs, build the model and heads, patch the image tower. Every input error is
    raised here, before the first training step."""
    import atlas_kernels as ak

    validate_config(cfg)
    d = init_distributed("cuda" if (cfg.device == "auto" and torch.cuda.is_available())
                         or cfg.device.startswith("cuda") else "cpu")
    log = Logger(d.main and not cfg.quiet)
    device = resolve_device(cfg.device, d)
    precision = resolve_precision(cfg.precision, device)
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("--precision bf16 is not supported by this GPU; use fp16")
    if cfg.batch_size % d.world:
        raise ConfigError(f"--batch-size {cfg.batch_size} (the global batch) is not divisible by "
                          f"the {d.world} processes")

    tasks = load_tasks(cfg)
    ckpt = load_checkpoint(cfg.resume) if cfg.resume else None
    model_name = cfg.model
    if cfg.model_config:
        registered = register_model_config(cfg.model_config)
        model_name = model_name or registered
    get_templates(cfg.templates)  # fail early on a bad templates spec

    p = Path(cfg.task_vectors)
    if not p.is_file():
        raise ConfigError(f"task-vector file '{p}' does not exist")
    tvs = ak.TaskVectors.load(str(p))
    fp = fingerprint(cfg, tasks, tvs)
    fp["model"] = model_name
    if ckpt is not None:
        check_resume(ckpt, fp, cfg.resume)

    objective = make_objective(cfg.objective, n_tasks=len(tasks), augment=cfg.augment,
                               tta_loss=cfg.tta_loss, confidence=cfg.confidence,
                               control_threshold=cfg.control_threshold,
                               control_weight=cfg.control_weight)

    model = build_model(model_name, cfg.weights, seed=cfg.seed)
    model.requires_grad_(False)
    model.to(device)
    visual_params = dict(model.visual.named_parameters())
    if not any(b in visual_params for b in tvs.blocks) and \
            any(str(b).startswith("visual.") for b in tvs.blocks):
        raise ConfigError(
            f"task-vector file '{p}' names whole-model blocks (e.g. {tvs.blocks[0]!r}); the image "
            "tower is patched, so rebuild it with: python -m atlas_kernels.task_vectors build ... "
            "--prefix visual.")
    tvs = tvs.to(device)
    blocks = cfg.blocks
    if blocks is not None and len(blocks) == 1 and blocks[0] in ("all", "weights"):
        blocks = blocks[0]
    model.visual = ak.patch(model.visual, tvs, partitions=cfg.partitions,
                            partition_mode=cfg.partition_mode, seed=cfg.seed,
                            backend=cfg.backend, blocks=blocks)
    coefs = ak.coefficients(model.visual)
    if not coefs:
        raise ConfigError("patching adapted no block: nothing to train (check --blocks)")
    for prm in model.parameters():
        prm.requires_grad_(False)
    for prm in coefs.values():
        prm.requires_grad_(True)
    model.eval()

    tokenizer = get_tokenizer(model_name)
    templates = get_templates(cfg.templates)
    heads = [zero_shot_head(model, tokenizer, t.classnames, templates, device) for t in tasks]
    scale = logit_scale(model)

    pre = D.model_preprocess(model)
    train_sets = [D.ImageDataset(t.train, [D.train_transform(pre, v) for v in objective.views(i)])
                  for i, t in enumerate(tasks)]
    eval_sets = [D.ImageDataset(t.val, [pre.eval]) for t in tasks]
    if ckpt is not None:
        names = list(coefs)
        if list(ckpt["coefficients"]) != names or any(
                ckpt["coefficients"][k].shape != coefs[k].shape for k in names):
            raise ConfigError(f"resume file '{cfg.resume}' holds coefficients of other shapes")
    return Setup(cfg, d, device, precision, model, coefs, tvs, tasks, heads, scale, objective,
                 train_sets, eval_sets, fp, ckpt, log)


def make_forward(s: Setup):
    """``forward(images, task) -> logits`` (float32): the patched image tower under autocast,
    normalised features against the task's zero-shot head."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(s.precision)

    def forward(images: torch.Tensor, task: int) -> torch.Tensor:
        with torch.autocast(s.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            feats = s.model.visual(images)
        feats = F.normalize(feats.float(), dim=-1)
        return s.scale * feats @ s.heads[task]
    return forward


@torch.no_grad()
def evaluate(s: Setup, forward=None) -> Dict[str, Dict[str, float]]:
    """Accuracy and mean cross-entropy on every validation set (sharded over processes)."""
    forward = forward or make_forward(s)
    bs = s.cfg.eval_batch_size or max(1, 2 * s.cfg.batch_size // s.dist.world)
    pin = s.device.type == "cuda"
    out = {}
    for t, (task, ds) in enumerate(zip(s.tasks, s.eval_sets)):
        acc = torch.zeros(3, dtype=torch.float64, device=s.device)
        for x, y in D.eval_loader(ds, bs, s.dist.rank, s.dist.world, s.cfg.workers, pin):
            x, y = x.to(s.device, non_blocking=True), y.to(s.device, non_blocking=True)
            logits = forward(x, t)
            acc[0] += (logits.argmax(-1) == y).sum()
            acc[1] += F.cross_entropy(logits, y, reduction="sum").double()
            acc[2] += y.numel()
        _all_reduce(acc, s.dist)
        n = max(1.0, float(acc[2]))
        out[task.name] = {"acc": float(acc[0]) / n, "loss": float(acc[1]) / n, "n": int(acc[2])}
    return out


def _coef_snapshot(coefs) -> Dict[str, torch.Tensor]:
    return {k: v.detach().float().cpu().clone() for k, v in coefs.items()}


def save_checkpoint(path, s: Setup, state: Dict[str, Any], opt, sched, scaler) -> None:
    """Atomically write a checkpoint (tensors and plain values only)."""
    ckpt = {
        "format": CHECKPOINT_FORMAT,
        "fingerprint": s.fingerprint,
        "epoch": state["epoch"], "step_in_epoch": state["step_in_epoch"],
        "global_step": state["global_step"],
        "coefficients": _coef_snapshot(s.coefs),
        "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": get_rng_state(),
        "best": state["best"], "history": state["history"], "zero_shot": state["zero_shot"],
        "train_time_s": state["train_time_s"],
        "epoch_loss": state["epoch_loss"], "epoch_groups": state["epoch_groups"],
    }
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(ckpt, str(tmp))
    os.replace(tmp, path)


def _fmt_metrics(m) -> str:
    return ", ".join(f"{k} acc {v['acc'] * 100:.2f}%" for k, v in m.items())


def train(s: Setup) -> Dict[str, Any]:
    """The loop. Returns the final state (``stopped`` is True after ``--stop-after-steps``)."""
    cfg, d, log = s.cfg, s.dist, s.log
    out = Path(cfg.out)
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
    params = list(s.coefs.values())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    B, A = cfg.batch_size, cfg.accum_steps
    M = D.steps_per_epoch([len(t) for t in s.train_sets], B)
    groups = math.ceil(M / A)
    total = cfg.epochs * groups
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_lambda(total, cfg.warmup_steps))
    fp16 = s.precision == "fp16"
    scaler = torch.amp.GradScaler(s.device.type, enabled=fp16)
    forward = make_forward(s)
    select = s.objective.default_select if cfg.select == "auto" else cfg.select

    state: Dict[str, Any] = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "best": None,
                             "history": [], "zero_shot": None, "train_time_s": 0.0,
                             "epoch_loss": 0.0, "epoch_groups": 0, "stopped": False}
    if s.ckpt is not None:
        ck = s.ckpt
        with torch.no_grad():
            for k, v in s.coefs.items():
                v.copy_(ck["coefficients"][k].to(v.device, v.dtype))
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        if ck.get("scaler"):
            scaler.load_state_dict(ck["scaler"])
        set_rng_state(ck["rng"])
        for k in ("epoch", "step_in_epoch", "global_step", "best", "history", "zero_shot",
                  "train_time_s", "epoch_loss", "epoch_groups"):
            state[k] = ck[k]
        log(f"resumed from {cfg.resume} at epoch {state['epoch'] + 1}, step "
            f"{state['step_in_epoch']}/{M} (optimizer step {state['global_step']}/{total})")

    log(f"objective {cfg.objective}: {len(s.tvs)} task vectors, {len(s.coefs)} blocks, "
        f"{sum(p.numel() for p in params)} coefficients, {d.world} process(es) on {s.device}, "
        f"{s.precision}; {cfg.epochs} epochs x {groups} steps (global batch {B} x accumulation "
        f"{A}, datasets: " + ", ".join(f"{t.name} {len(ds)}" for t, ds in
                                       zip(s.tasks, s.train_sets)) + ")")
    if state["zero_shot"] is None:
        zs = evaluate(s, forward)
        state["zero_shot"] = zs
        log(f"zero-shot: {_fmt_metrics(zs)}")
        ok, key = s.objective.score(zs, zs)
        if select == "best" and ok:
            state["best"] = {"epoch": 0, "score": key, "metrics": zs,
                             "coefficients": _coef_snapshot(s.coefs)}

    ckpt_path = out / "checkpoint.pt"

    def save(epoch, step_in_epoch):
        state["epoch"], state["step_in_epoch"] = epoch, step_in_epoch
        if d.main:
            save_checkpoint(ckpt_path, s, state, opt, sched, scaler)

    images_per_step_task = B
    t_log, n_log = time.perf_counter(), 0
    start_epoch = state["epoch"]
    for epoch in range(start_epoch, cfg.epochs):
        t_epoch = time.perf_counter()
        start = state["step_in_epoch"] if epoch == start_epoch else 0
        loaders = [D.plan_loader(ds, D.PlanBatchSampler(len(ds), B, M, seed=cfg.seed, epoch=epoch,
                                                        dataset=i, rank=d.rank, world=d.world,
                                                        start=start),
                                 cfg.workers, s.device.type == "cuda")
                   for i, ds in enumerate(s.train_sets)]
        batches_iter = zip(*loaders)
        step = start
        if start == 0:  # a mid-epoch resume continues the epoch's running loss
            state["epoch_loss"], state["epoch_groups"] = 0.0, 0
        while step < M:
            a = min(A, M - step)
            loss_sum = torch.zeros((), dtype=torch.float64, device=s.device)
            for _ in range(a):
                batches = next(batches_iter)
                batches = [tuple(x.to(s.device, non_blocking=True) for x in b) for b in batches]
                terms = s.objective.losses(forward, batches)
                loss = sum(w * l.float().sum() for w, l in terms) / (B * a)
                scaler.scale(loss).backward()
                loss_sum += loss.detach().double()
            step += a
            if d.world > 1:
                flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                                  for p in params] + [loss_sum.float().reshape(1)])
                _all_reduce(flat, d)
                off = 0
                for p in params:
                    n = p.numel()
                    p.grad = flat[off:off + n].view_as(p).clone()
                    off += n
                loss_val = float(flat[-1])
            else:
                loss_val = float(loss_sum)
            scaler.unscale_(opt)
            if cfg.clip_grad > 0:
                gnorm = float(torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad))
            else:
                gnorm = float(torch.linalg.vector_norm(torch.stack(
                    [p.grad.norm() for p in params if p.grad is not None])))
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            sched.step()
            state["global_step"] += 1
            state["epoch_loss"] += loss_val
            state["epoch_groups"] += 1
            n_log += a * images_per_step_task * len(s.train_sets)
            g = state["global_step"]
            if g % cfg.log_every == 0 or step == M:
                dt = max(1e-9, time.perf_counter() - t_log)
                log(f"epoch {epoch + 1}/{cfg.epochs} step {step}/{M} | opt step {g}/{total} | "
                    f"loss {loss_val:.4f} | grad norm {gnorm:.3g} | lr {sched.get_last_lr()[0]:.3g}"
                    f" | {n_log / dt:.1f} img/s")
                t_log, n_log = time.perf_counter(), 0
            stop = cfg.stop_after_steps is not None and g >= cfg.stop_after_steps
            if step < M and (stop or (cfg.save_every and g % cfg.save_every == 0)):
                state["train_time_s"] += time.perf_counter() - t_epoch
                t_epoch = time.perf_counter()
                save(epoch, step)
                if stop:
                    log(f"stopped after optimizer step {g} (--stop-after-steps); resume with "
                        f"--resume {ckpt_path}")
                    state["stopped"] = True
                    return state
        state["train_time_s"] += time.perf_counter() - t_epoch
        metrics = evaluate(s, forward)
        ok, key = s.objective.score(metrics, state["zero_shot"])
        rec = {"epoch": epoch + 1, "step": state["global_step"],
               "train_loss": state["epoch_loss"] / max(1, state["epoch_groups"]), "val": metrics,
               "admissible": bool(ok), "score": key}
        state["history"].append(rec)
        better = (select == "best" and ok and
                  (state["best"] is None or key > state["best"]["score"]))
        if better or select == "last":
            state["best"] = {"epoch": epoch + 1, "score": key, "metrics": metrics,
                             "coefficients": _coef_snapshot(s.coefs)}
        log(f"epoch {epoch + 1}/{cfg.epochs}: train loss {rec['train_loss']:.4f}; "
            f"{_fmt_metrics(metrics)}" + ("" if ok else " (not admissible)")
            + (" *best*" if better else ""))
        save(epoch + 1, 0)
        if cfg.stop_after_steps is not None and state["global_step"] >= cfg.stop_after_steps \
                and epoch + 1 < cfg.epochs:
            log(f"stopped after optimizer step {state['global_step']} (--stop-after-steps); "
                f"resume with --resume {ckpt_path}")
            state["stopped"] = True
            return state
    return state


def write_outputs(s: Setup, state: Dict[str, Any]) -> Dict[str, Any]:
    """Load the selected coefficients into the model and write ``coefficients.safetensors``,
    ``metrics.json``, ``coefficients.png`` and (with ``--export-merged``) the merged model."""
    import atlas_kernels as ak

    cfg = s.cfg
    out = Path(cfg.out)
    best = state["best"]
    if best is None:  # no admissible evaluation at all: keep the zero-shot point
        best = {"epoch": 0, "score": None, "metrics": state["zero_shot"],
                "coefficients": {k: torch.zeros_like(v) for k, v in _coef_snapshot(s.coefs).items()}}
    with torch.no_grad():
        for k, v in s.coefs.items():
            v.copy_(best["coefficients"][k].to(v.device, v.dtype))
    result = {
        "objective": cfg.objective, "model": s.fingerprint.get("model"),
        "task_vectors": {"path": cfg.task_vectors, "names": [str(n) for n in s.tvs.names]},
        "datasets": [{"name": t.name, "train": t.train_path, "val": t.val_path,
                      "n_train": len(t.train), "n_val": len(t.val), "classes": t.classes}
                     for t in s.tasks],
        "world_size": s.dist.world, "device": str(s.device), "precision": s.precision,
        "steps": state["global_step"], "train_time_s": state["train_time_s"],
        "zero_shot": state["zero_shot"], "history": state["history"],
        "selected": {"epoch": best["epoch"], "rule": cfg.select if cfg.select != "auto"
                     else s.objective.default_select, "metrics": best["metrics"]},
        "config": dataclasses.asdict(cfg),
    }
    if not s.dist.main:
        return result
    out.mkdir(parents=True, exist_ok=True)
    ak.save_coefficients(s.model.visual, str(out / "coefficients.safetensors"))
    result["outputs"] = {"coefficients": str(out / "coefficients.safetensors"),
                         "checkpoint": str(out / "checkpoint.pt")}
    png = save_heatmap(s.coefs, out / "coefficients.png", names=[str(n) for n in s.tvs.names],
                       title=f"aTLAS coefficients ({cfg.objective}, epoch {best['epoch']})")
    if png:
        result["outputs"]["heatmap"] = png
    if cfg.export_merged:
        export_merged(s, cfg.export_merged)
        result["outputs"]["merged"] = cfg.export_merged
    with open(out / "metrics.json", "w") as f:
        json.dump(result, f, indent=2)
    s.log(f"selected epoch {best['epoch']}: {_fmt_metrics(best['metrics'])}; wrote {out}")
    return result


def export_merged(s: Setup, path) -> None:
    """Merge the coefficients into plain weights and write the whole model's state dict."""
    import atlas_kernels as ak
    from safetensors.torch import save_file

    s.model.visual = ak.unpatch(s.model.visual)
    sd, seen = {}, {}
    for k, v in s.model.state_dict().items():
        v = v.detach().cpu().contiguous()
        key = (v.data_ptr(), v.numel(), v.dtype)
        sd[k] = v.clone() if key in seen and v.numel() else v
        seen[key] = k
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path), metadata={"format": "pt", "model": str(s.fingerprint.get("model")),
                                       "producer": "atlas_kernels.train"})


def run(cfg: TrainConfig) -> Dict[str, Any]:
    """Check, set up, train and write the outputs; returns the metrics (also in metrics.json)."""
    s = setup(cfg)
    try:
        state = train(s)
        if state["stopped"]:
            return {"stopped": True, "global_step": state["global_step"],
                    "checkpoint": str(Path(cfg.out) / "checkpoint.pt")}
        return write_outputs(s, state)
    finally:
        if s.dist.initialized_here:
            import torch.distributed as dist

            dist.destroy_process_group()
