"""Evaluation: accuracy and mean cross-entropy on every validation set, sharded over processes
(the objective says what a batch contributes: :meth:`~atlas_kernels.train.objectives.Objective.eval_terms`).

Under ``--fsdp`` every forward all-gathers the composed blocks, a collective: every process must
run the same number of forwards. A process whose shard of the validation set is one sample short
then runs its last batch once more with weight 0 (``_padded_batches``)."""
from __future__ import annotations

from typing import Dict

import torch

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
        loader = D.eval_loader(ds, bs, s.dist.rank, s.dist.world, s.cfg.workers, pin)
        for (x, y), weight in _padded_batches(loader, len(ds), bs, s):
            x, y = x.to(s.device, non_blocking=True), y.to(s.device, non_blocking=True)
            acc += weight * s.objective.eval_terms(forward, x, y, t)
        _all_reduce(acc, s.dist)
        n = max(1.0, float(acc[2]))
        out[task.name] = {"acc": float(acc[0]) / n, "loss": float(acc[1]) / n, "n": int(acc[2])}
        if s.objective.name == "lm":
            out[task.name]["ppl"] = float(torch.tensor(out[task.name]["loss"]).exp())
    return out


def _padded_batches(loader, n: int, bs: int, s: Setup):
    """``(batch, weight)``: the loader's batches with weight 1, then, where the module is sharded
    (its forwards are collectives), as many repeats of the last batch with weight 0 as the process
    with the largest shard has batches more than this one."""
    sharded = getattr(s, "sharded", False) and s.dist.world > 1
    if sharded and n < s.dist.world:  # said on every process alike (no process waits for another)
        raise RuntimeError(f"a validation set of {n} sample(s) leaves some of the {s.dist.world} processes "
                           f"without any, while sharded forwards need every process: use fewer processes or a "
                           f"larger validation set")
    last = None
    count = 0
    for b in loader:
        last = b
        count += 1
        yield b, 1.0
    if not sharded:
        return
    most = -(-(-(-n // s.dist.world)) // bs)  # batches of the largest shard: ceil(ceil(n / W) / bs)
    for _ in range(most - count):
        yield last, 0.0


def format_metrics(m) -> str:
    """One line of per-task accuracies (and, for a language model, loss and perplexity), for the log."""
    return ", ".join(f"{k} acc {v['acc'] * 100:.2f}%"
                     + (f" loss {v['loss']:.4f} ppl {v['ppl']:.3g}" if "ppl" in v else "") for k, v in m.items())
