"""The training run: setup, the loop, evaluation and outputs (the configuration lives in
:mod:`.config`, checkpoints and resume checks in :mod:`.state`, processes in :mod:`.distributed`).

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
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F

from .._io import atomic_save_safetensors, atomic_torch_save, atomic_write_json, clean_leftovers
from . import data as D
from .config import ConfigError, TrainConfig, validate_config
from .data import TaskData
from .distributed import Dist, _all_reduce, init_distributed, resolve_device, resolve_precision
from .faults import DivergedError, check_finite_tensors, diverged_message, nonfinite_blocks, skip_report, step_values
from .heatmap import save_heatmap
from .model import (
    build_model,
    get_templates,
    get_tokenizer,
    head_logits,
    load_task_heads,
    logit_scale,
    read_classnames,
    register_model_config,
    zero_shot_head,
)
from .objectives import Objective, make_objective
from .state import CHECKPOINT_FORMAT, check_resume, fingerprint, get_rng_state, load_checkpoint, set_rng_state


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


def cosine_lambda(total_steps: int, warmup_steps: int):
    """Linear warm-up to 1, then cosine decay to 0 at ``total_steps`` (a LambdaLR factor)."""
    def f(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        span = max(1, total_steps - warmup_steps)
        t = min(1.0, (step - warmup_steps) / span)
        return 0.5 * (1.0 + math.cos(math.pi * t))
    return f


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
    if Path(cfg.out).exists() and not Path(cfg.out).is_dir():
        raise ConfigError(f"--out '{cfg.out}' exists and is not a folder; give a new or existing output folder")
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
    if cfg.storage is not None and cfg.storage != tvs.storage:
        tvs = tvs.to_storage(cfg.storage)
    fp = fingerprint(cfg, tasks, tvs)
    fp["model"] = model_name
    if ckpt is not None:
        check_resume(ckpt, fp, cfg.resume)

    objective = make_objective(cfg.objective, n_tasks=len(tasks), augment=cfg.augment,
                               tta_loss=cfg.tta_loss, confidence=cfg.confidence,
                               control_threshold=cfg.control_threshold,
                               control_weight=cfg.control_weight)

    model = build_model(model_name, cfg.weights, seed=cfg.seed, text_tower=not cfg.head)
    if cfg.weights:
        try:
            check_finite_tensors(model.state_dict(), f"--weights '{cfg.weights}'")
        except ValueError as e:
            raise ConfigError(str(e)) from None
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
                            backend=cfg.backend, blocks=blocks, linearised=cfg.linearised)
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
    heads = (load_task_heads(cfg.head, tasks, model, device) if cfg.head else
             [zero_shot_head(model, tokenizer, t.classnames, templates, device) for t in tasks])
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
    normalised features against the task's head (zero-shot, or a --head file)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(s.precision)

    def forward(images: torch.Tensor, task: int) -> torch.Tensor:
        with torch.autocast(s.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            feats = s.model.visual(images)
        return head_logits(s.heads[task], feats, s.scale)
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
        "skipped_steps": state.get("skipped_steps", 0),
    }
    # Never write a non-finite coefficient (the loop stops before, this is the last guard).
    for what, coefs in [("coefficients", ckpt["coefficients"])] + (
            [("best coefficients", state["best"]["coefficients"])] if state.get("best") else []):
        bad = nonfinite_blocks(coefs)
        if bad:
            raise DivergedError(f"refusing to write checkpoint {path}: the {what} of block(s) {bad[:3]} hold "
                                f"NaN/inf; the previous checkpoint is kept")
    atomic_torch_save(ckpt, str(path))


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

    if d.main:
        clean_leftovers(out)  # temporary files of an interrupted write
    state: Dict[str, Any] = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "best": None,
                             "history": [], "zero_shot": None, "train_time_s": 0.0,
                             "epoch_loss": 0.0, "epoch_groups": 0, "stopped": False, "skipped_steps": 0}
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
        state["skipped_steps"] = int(ck.get("skipped_steps", 0))
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
    resumed_at = state["global_step"] if s.ckpt is not None else None

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
                loss_t = flat[-1]
            else:
                loss_t = loss_sum
            scaler.unscale_(opt)
            if cfg.clip_grad > 0:
                gnorm_t = torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad)
            else:
                gnorm_t = torch.linalg.vector_norm(torch.stack(
                    [p.grad.norm() for p in params if p.grad is not None]))
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            sched.step()
            state["global_step"] += 1
            # One synchronisation per step (the loss is logged anyway): loss, gradient norm and
            # the number of non-finite coefficients after the step, read back together.
            loss_val, gnorm, n_bad = step_values(loss_t, gnorm_t, params)
            if not math.isfinite(gnorm) and fp16 and math.isfinite(loss_val) and not n_bad:
                state["skipped_steps"] += 1  # GradScaler skipped this step and lowered its scale
            else:
                checks = (("loss", loss_val, not math.isfinite(loss_val)),
                          ("gradient norm", gnorm, not math.isfinite(gnorm)),
                          ("number of NaN/inf coefficients", n_bad, n_bad > 0))
                bad = next(((q, v) for q, v, failed in checks if failed), None)
                if bad is not None:
                    raise DivergedError(diverged_message(
                        step=state["global_step"], epoch=epoch + 1, quantity=bad[0], value=bad[1], lr=cfg.lr,
                        precision=s.precision, resumed_at=resumed_at,
                        checkpoint=str(ckpt_path) if ckpt_path.is_file() else None))
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
    if s.precision == "fp16":
        rep = skip_report(state.get("skipped_steps", 0), state["global_step"])
        result["grad_scaler"] = rep or {"skipped_steps": state.get("skipped_steps", 0),
                                        "steps": state["global_step"]}
        if rep and s.dist.main:
            print(f"[atlas_kernels.train] {rep['warning']}", file=sys.stderr, flush=True)
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
    atomic_write_json(out / "metrics.json", result)
    s.log(f"selected epoch {best['epoch']}: {_fmt_metrics(best['metrics'])}; wrote {out}")
    return result


def export_merged(s: Setup, path) -> None:
    """Merge the coefficients into plain weights and write the whole model's state dict."""
    import atlas_kernels as ak

    if ak.is_patched(s.model.visual) and ak.PatchConfig.of(s.model.visual).linearised:
        # no plain model equals a linearised one: theta0 plus D per block (atlas_kernels.load_linearised)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        ak.export_linearised(s.model.visual, path)
        return
    s.model.visual = ak.unpatch(s.model.visual)
    sd, seen = {}, {}
    for k, v in s.model.state_dict().items():
        v = v.detach().cpu().contiguous()
        key = (v.data_ptr(), v.numel(), v.dtype)
        sd[k] = v.clone() if key in seen and v.numel() else v
        seen[key] = k
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(sd, str(path), metadata={"format": "pt", "model": str(s.fingerprint.get("model")),
                                       "producer": "atlas_kernels.train"})


def run(cfg: TrainConfig) -> Dict[str, Any]:
    """Check, set up, train and write the outputs; returns the metrics (also in metrics.json)."""
    s = setup(cfg)
    finished = False
    try:
        state = train(s)
        if state["stopped"]:
            result = {"stopped": True, "global_step": state["global_step"],
                      "checkpoint": str(Path(cfg.out) / "checkpoint.pt")}
        else:
            result = write_outputs(s, state)
        finished = True
        return result
    finally:
        if s.dist.initialized_here:
            import torch.distributed as dist

            if finished:
                # Leave together: rank 0 still writes the outputs while the others are done, and a
                # gloo peer that tears down its connections first can abort at exit ("terminate
                # called without an active exception", seen in about 1 run in 4 on 2 CPUs).
                dist.barrier()
            dist.destroy_process_group()
