"""The training run: the loop and the driver that strings the pieces together (setup in
:mod:`.prepare`, evaluation in :mod:`.evaluation`, checkpoints written and restored in
:mod:`.checkpointing`, outputs in :mod:`.outputs`; the configuration lives in :mod:`.config`,
what a checkpoint holds and how a resume is checked in :mod:`.state`, processes in
:mod:`.distributed`).

Every piece is an importable function; :func:`run` strings them together and is what
``python -m atlas_kernels.train`` calls. The pieces stay importable from here too.

Distributed: under ``torchrun`` (``WORLD_SIZE`` > 1) every process builds the same model and
heads, takes a contiguous slice of each *global* batch (``--batch-size`` is global), and the
coefficient gradients (the only trainable parameters) are summed with one ``all_reduce`` per
optimizer step before unscaling, clipping and stepping. With ``--fsdp`` the module is sharded
(:mod:`atlas_kernels.sharding`): its backward sums the coefficient gradients over the processes
itself, so only the loss is all-reduced here. Every loss is a sum over the local samples
divided by the global batch size, so the sum of the ranks' gradients is exactly the gradient of the
global batch, and every rank takes the same optimizer step. (This is what DDP would do, without
wrapping a module whose frozen blocks take no gradient; evaluation is sharded the same way.)

Resume: checkpoints hold the coefficients, optimizer, scheduler, grad scaler, RNG states, best
coefficients and history, as tensors and plain Python values, read back by the library's
restricted reader (:func:`atlas_kernels.train.state.load_checkpoint`). The data order and augmentation are functions of
``(seed, epoch, position)`` (see :mod:`atlas_kernels.train.data`), so a resumed run takes the same
steps as an uninterrupted one. A checkpoint records a fingerprint of the run (hyper-parameters,
task vectors, data); resuming with another run's checkpoint is refused before training starts.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Dict

import torch

from .._io import clean_leftovers
from . import data as D
from .checkpointing import coef_snapshot, new_state, restore, save_checkpoint
from .config import TrainConfig
from .distributed import sum_gradients
from .evaluation import evaluate, format_metrics
from .faults import DivergedError, diverged_message, step_values
from .outputs import export_merged, write_outputs
from .prepare import Logger, Setup, load_tasks, make_forward, setup

__all__ = ["Logger", "Setup", "cosine_lambda", "evaluate", "export_merged", "load_tasks", "make_forward",
           "run", "save_checkpoint", "setup", "train", "write_outputs"]


def graph_choice(cfg: TrainConfig, s: Setup, fp16: bool) -> tuple:
    """``(use, why)``: whether the optimizer steps run as one captured CUDA graph (``--cuda-graph``:
    ``auto`` uses one wherever it can; ``on`` insists; ``off`` never), and the reason when not."""
    if cfg.cuda_graph == "off":
        return False, "--cuda-graph off"
    why = None
    if s.device.type != "cuda":
        why = f"it needs a CUDA device (this run is on {s.device.type})"
    elif fp16:
        why = "fp16 training uses a GradScaler, whose inf check synchronises with the CPU (use bf16)"
    elif s.dist.world > 1:
        why = "runs of several processes sum the gradients outside the step"
    elif cfg.accum_steps > 1:
        why = "--accum-steps > 1"
    if why is not None and cfg.cuda_graph == "on":
        from .config import ConfigError

        raise ConfigError(f"--cuda-graph on: {why}")
    return why is None, why


class _Snapshot:
    """The coefficients, optimizer state and CUDA RNG before the graph's warm-up steps, put back in
    place after the capture: warm-up steps run the optimizer, and the run must not feel them."""

    def __init__(self, params, opt, device):
        self.params = [p.detach().clone() for p in params]
        self.state = [{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in opt.state[p].items()}
                      for p in params]
        self.rng = torch.cuda.get_rng_state(device)

    @torch.no_grad()
    def restore(self, params, opt, device):
        for p, v, st in zip(params, self.params, self.state):
            p.copy_(v)
            for k, val in opt.state[p].items():
                if isinstance(val, torch.Tensor) and k in st:
                    val.copy_(st[k])
                elif k not in st and isinstance(val, torch.Tensor):
                    val.zero_()
            if p.grad is not None:
                p.grad.zero_()
        torch.cuda.set_rng_state(self.rng, device)


def cosine_lambda(total_steps: int, warmup_steps: int):
    """Linear warm-up to 1, then cosine decay to 0 at ``total_steps`` (a LambdaLR factor)."""
    def f(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        span = max(1, total_steps - warmup_steps)
        t = min(1.0, (step - warmup_steps) / span)
        return 0.5 * (1.0 + math.cos(math.pi * t))
    return f


# ----------------------------------------------------------------------------------------------
# the run


def train(s: Setup) -> Dict[str, Any]:
    """The loop. Returns the final state (``stopped`` is True after ``--stop-after-steps``)."""
    cfg, d, log = s.cfg, s.dist, s.log
    out = Path(cfg.out)
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
    params = list(s.coefs.values())
    fp16 = s.precision == "fp16"
    use_graph, no_graph_why = graph_choice(cfg, s, fp16)
    if use_graph:  # capturable, with the learning rate as a tensor that the scheduler fills in place
        opt = torch.optim.AdamW(params, lr=torch.tensor(cfg.lr, device=s.device), weight_decay=cfg.weight_decay,
                                capturable=True)
    else:
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    B, A = cfg.batch_size, cfg.accum_steps
    M = D.steps_per_epoch([len(t) for t in s.train_sets], B)
    groups = math.ceil(M / A)
    total = cfg.epochs * groups
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_lambda(total, cfg.warmup_steps))
    scaler = torch.amp.GradScaler(s.device.type, enabled=fp16)
    forward = make_forward(s)
    select = s.objective.default_select if cfg.select == "auto" else cfg.select

    if d.main:
        clean_leftovers(out)  # temporary files of an interrupted write
    state = new_state()
    if s.ckpt is not None:
        restore(s, state, opt, sched, scaler)
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
        log(f"zero-shot: {format_metrics(zs)}")
        ok, key = s.objective.score(zs, zs)
        if select == "best" and ok:
            state["best"] = {"epoch": 0, "score": key, "metrics": zs,
                             "coefficients": coef_snapshot(s.coefs)}

    ckpt_path = out / "checkpoint.pt"
    resumed_at = state["global_step"] if s.ckpt is not None else None
    if use_graph:
        log("CUDA graph: each optimizer step is captured once and replayed (every batch is full: the epoch "
            "stream wraps, so none is dropped); --cuda-graph off for eager steps")
    elif cfg.cuda_graph != "off":
        log(f"CUDA graph: not used, {no_graph_why}")

    def one_step(*flat):
        """forward, backward, clip, optimizer step: what a CUDA graph captures (no CPU sync)."""
        batches = [tuple(flat[i:i + 2]) for i in range(0, len(flat), 2)]
        opt.zero_grad(set_to_none=False)
        terms = s.objective.losses(forward, batches)
        loss = sum(w * l.float().sum() for w, l in terms) / B
        loss.backward()
        if cfg.clip_grad > 0:
            gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad)
        else:
            gnorm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
        opt.step()
        return loss.detach().double(), gnorm

    graphed = None

    def save(epoch, step_in_epoch):
        state["epoch"], state["step_in_epoch"] = epoch, step_in_epoch
        if d.main:
            save_checkpoint(ckpt_path, s, state, opt, sched, scaler)

    images_per_step_task = B
    rate = "seq/s" if s.objective.name == "lm" else "img/s"
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
            if use_graph:
                batches = next(batches_iter)
                flat = [x.to(s.device, non_blocking=True) for b in batches for x in b]
                if graphed is None:
                    graphed = _capture(one_step, flat, params, opt, s.device, log)
                    if graphed is None:
                        use_graph = False
                if graphed is not None:
                    loss_t, gnorm_t = (t.clone() for t in graphed(*flat))
                else:
                    loss_t, gnorm_t = one_step(*flat)
                step += 1
                sched.step()
                state["global_step"] += 1
                loss_val, gnorm, n_bad = step_values(loss_t, gnorm_t, params)
                checks = (("loss", loss_val, not math.isfinite(loss_val)),
                          ("gradient norm", gnorm, not math.isfinite(gnorm)),
                          ("number of NaN/inf coefficients", n_bad, n_bad > 0))
                bad = next(((q, v) for q, v, failed in checks if failed), None)
                if bad is not None:
                    raise DivergedError(diverged_message(
                        step=state["global_step"], epoch=epoch + 1, quantity=bad[0], value=bad[1], lr=cfg.lr,
                        precision=s.precision, resumed_at=resumed_at,
                        checkpoint=str(ckpt_path) if ckpt_path.is_file() else None) + _overflow_note(s))
                state["epoch_loss"] += loss_val
                state["epoch_groups"] += 1
                n_log += images_per_step_task * len(s.train_sets)
                g = state["global_step"]
                if g % cfg.log_every == 0 or step == M:
                    dt = max(1e-9, time.perf_counter() - t_log)
                    log(f"epoch {epoch + 1}/{cfg.epochs} step {step}/{M} | opt step {g}/{total} | "
                        f"loss {loss_val:.4f} | grad norm {gnorm:.3g} | lr {float(sched.get_last_lr()[0]):.3g}"
                        f" | {n_log / dt:.1f} {rate}")
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
                continue
            loss_sum = torch.zeros((), dtype=torch.float64, device=s.device)
            for _ in range(a):
                batches = next(batches_iter)
                batches = [tuple(x.to(s.device, non_blocking=True) for x in b) for b in batches]
                terms = s.objective.losses(forward, batches)
                loss = sum(w * l.float().sum() for w, l in terms) / (B * a)
                scaler.scale(loss).backward()
                loss_sum += loss.detach().double()
            step += a
            loss_t = sum_gradients(params, loss_sum, d, summed=s.sharded) if d.world > 1 else loss_sum
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
                        checkpoint=str(ckpt_path) if ckpt_path.is_file() else None) + _overflow_note(s))
            state["epoch_loss"] += loss_val
            state["epoch_groups"] += 1
            n_log += a * images_per_step_task * len(s.train_sets)
            g = state["global_step"]
            if g % cfg.log_every == 0 or step == M:
                dt = max(1e-9, time.perf_counter() - t_log)
                log(f"epoch {epoch + 1}/{cfg.epochs} step {step}/{M} | opt step {g}/{total} | "
                    f"loss {loss_val:.4f} | grad norm {gnorm:.3g} | lr {sched.get_last_lr()[0]:.3g}"
                    f" | {n_log / dt:.1f} {rate}")
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
                             "coefficients": coef_snapshot(s.coefs)}
        log(f"epoch {epoch + 1}/{cfg.epochs}: train loss {rec['train_loss']:.4f}; "
            f"{format_metrics(metrics)}" + ("" if ok else " (not admissible)")
            + (" *best*" if better else ""))
        save(epoch + 1, 0)
        if cfg.stop_after_steps is not None and state["global_step"] >= cfg.stop_after_steps \
                and epoch + 1 < cfg.epochs:
            log(f"stopped after optimizer step {state['global_step']} (--stop-after-steps); "
                f"resume with --resume {ckpt_path}")
            state["stopped"] = True
            return state
    return state


def _overflow_note(s) -> str:
    """Where a diverged run's composed weights no longer fit their dtype (an fp16 model, or fp16
    autocast), name the block: cheap here, once, after the divergence."""
    import torch

    from .._adapted import overflowing_blocks

    try:
        dtype = torch.float16 if s.precision == "fp16" else None
        bad = overflowing_blocks(s.tower, dtype)
    except Exception:  # the note is a help; the error stands without it
        return ""
    if not bad:
        return ""
    name, big = next(iter(bad.items()))
    return (f" The composed weight of block {name!r} overflows its dtype (largest magnitude {big:.4g}"
            + (f"; {len(bad) - 1} more block(s))" if len(bad) > 1 else ")")
            + ": lower --lr, or train in bf16 or fp32.")


def _capture(one_step, flat, params, opt, device, log):
    """The step captured in a CUDA graph (warm-up steps undone), or None when capture fails (then
    every step runs eagerly, said in the log)."""
    from ..graphs import GraphedStep

    snap = _Snapshot(params, opt, device)
    try:
        graphed = GraphedStep(one_step, *flat)
    except Exception as exc:  # an objective that synchronises or changes shapes: eager steps
        torch.cuda.synchronize(device)
        snap.restore(params, opt, device)
        log(f"CUDA graph: capture failed ({type(exc).__name__}: {str(exc)[:160]}); eager steps")
        return None
    torch.cuda.synchronize(device)
    snap.restore(params, opt, device)
    return graphed


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
