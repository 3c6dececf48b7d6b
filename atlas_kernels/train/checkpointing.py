"""Checkpoints of a run in progress: the loop state a run starts from, the state a resume
restores (coefficients, optimizer, scheduler, grad scaler, RNG, progress), and the atomic write of
a checkpoint (tensors and plain values only; a non-finite coefficient is never written). What a
checkpoint file holds and how a resume is checked against the run live in :mod:`.state`."""
from __future__ import annotations

from typing import Any, Dict

import torch

from .._io import atomic_torch_save
from .config import ConfigError
from .faults import DivergedError, nonfinite_blocks
from .prepare import Setup
from .state import CHECKPOINT_FORMAT, get_rng_state, set_rng_state


def coef_snapshot(coefs) -> Dict[str, torch.Tensor]:
    """A float32 CPU copy of the coefficients (for checkpoints and the best-so-far record)."""
    return {k: v.detach().float().cpu().clone() for k, v in coefs.items()}


def new_state() -> Dict[str, Any]:
    """The loop state of a run that starts from the beginning."""
    return {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "best": None,
            "history": [], "zero_shot": None, "train_time_s": 0.0,
            "epoch_loss": 0.0, "epoch_groups": 0, "stopped": False, "skipped_steps": 0}


def restore(s: Setup, state: Dict[str, Any], opt, sched, scaler) -> None:
    """Load ``s.ckpt`` (checked against the run by :func:`.state.check_resume` in setup) into the
    coefficients, optimizer, scheduler, grad scaler, RNG states and ``state``."""
    ck = s.ckpt
    with torch.no_grad():
        for k, v in s.coefs.items():
            v.copy_(ck["coefficients"][k].to(v.device, v.dtype))
    # state.check_layout vetted the types; what torch and random still refuse (a parameter group of
    # another size, a state of another optimizer) is said in one line, naming the file and the part
    for what, load in (("optimizer state", lambda: opt.load_state_dict(ck["optimizer"])),
                       ("scheduler state", lambda: sched.load_state_dict(ck["scheduler"])),
                       ("grad scaler state", lambda: ck.get("scaler") and scaler.load_state_dict(ck["scaler"])),
                       ("RNG state", lambda: set_rng_state(ck["rng"]))):
        try:
            load()
        except (KeyError, TypeError, ValueError, IndexError, RuntimeError, AttributeError) as e:
            raise ConfigError(f"resume file '{s.cfg.resume}': its {what} cannot be restored "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); the file is "
                              f"damaged or comes from another setup: resume from another checkpoint, or start "
                              f"afresh without --resume") from None
    for k in ("epoch", "step_in_epoch", "global_step", "best", "history", "zero_shot",
              "train_time_s", "epoch_loss", "epoch_groups"):
        state[k] = ck[k]
    state["skipped_steps"] = int(ck.get("skipped_steps", 0))


def save_checkpoint(path, s: Setup, state: Dict[str, Any], opt, sched, scaler) -> None:
    """Atomically write a checkpoint (tensors and plain values only)."""
    ckpt = {
        "format": CHECKPOINT_FORMAT,
        "fingerprint": s.fingerprint,
        "epoch": state["epoch"], "step_in_epoch": state["step_in_epoch"],
        "global_step": state["global_step"],
        "coefficients": coef_snapshot(s.coefs),
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
