"""Evaluation: accuracy and mean cross-entropy on every validation set, sharded over processes."""
from __future__ import annotations

from typing import Dict

import torch
import torch.nn.functional as F

from . import data as D
from .distributed import _all_reduce
from .prepare import Setup, make_forward


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


def format_metrics(m) -> str:
    """One line of per-task accuracies, for the log."""
    return ", ".join(f"{k} acc {v['acc'] * 100:.2f}%" for k, v in m.items())
