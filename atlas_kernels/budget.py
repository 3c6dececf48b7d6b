"""Per-block budgets: keep, for each block, only the task vectors that matter.

``select_task_vectors`` scores every (block, task vector) pair by the magnitude of its coefficient
gradient over a few probe batches, on a module patched with the full set, and returns a selection
for :meth:`TaskVectors.keep <atlas_kernels.TaskVectors.keep>`:

    ak.patch(model.visual, tvs)
    sel = ak.select_task_vectors(model.visual, probe_batches, loss_fn, per_block=4)
    ak.unpatch(model.visual)
    small = tvs.keep(sel)                        # ragged: each block holds only its chosen ones
    print(ak.budget_report(tvs, small))
    ak.patch(model.visual, small)
"""
from __future__ import annotations

from typing import Callable, Dict, Iterable, List, Optional

import torch
import torch.nn as nn

from .patching import coefficients
from .task_vectors import TaskVectors

__all__ = ["select_task_vectors", "budget_report"]


def select_task_vectors(module: nn.Module, probe_batches: Iterable, loss_fn: Callable, *,
                        per_block: Optional[int] = None, fraction: Optional[float] = None,
                        task_vectors: Optional[TaskVectors] = None) -> Dict[str, List[int]]:
    """Choose task vectors per block by ``mean |dL/dlam|`` over ``probe_batches``.

    Args:
        module: a module patched with the full task-vector set (its coefficients are left as they
            were, with their gradients cleared).
        loss_fn: ``loss_fn(module, batch) -> scalar loss``.
        per_block: keep the ``per_block`` highest-scoring task vectors of every block; or
        fraction: keep the highest-scoring (block, task vector) pairs, over all blocks, until this
            fraction of the set's bytes is reached (needs ``task_vectors`` for the sizes).
    """
    if (per_block is None) == (fraction is None):
        raise ValueError("give exactly one of per_block= or fraction=")
    if fraction is not None and not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if fraction is not None and task_vectors is None:
        raise ValueError("fraction= needs task_vectors= (to weigh blocks by their bytes)")
    coefs = coefficients(module)
    scores = {k: torch.zeros(c.shape[0], dtype=torch.float64) for k, c in coefs.items()}
    batches = 0
    for batch in probe_batches:
        for c in coefs.values():
            c.grad = None
        loss = loss_fn(module, batch)
        loss.backward()
        for k, c in coefs.items():
            if c.grad is not None:
                g = c.grad.detach().abs().double().cpu()
                scores[k] += g if g.dim() == 1 else g.sum(1)
        batches += 1
    for c in coefs.values():
        c.grad = None
    if batches == 0:
        raise ValueError("probe_batches gave no batch")
    if per_block is not None:
        if per_block < 0:
            raise ValueError(f"per_block must be >= 0, got {per_block}")
        return {k: sorted(torch.argsort(s, descending=True)[:per_block].tolist()) for k, s in scores.items()}
    # Global: greedy by score until the byte budget is used.
    sizes = {b: _bytes_per_task_vector(task_vectors, b) for b in scores}
    total = sum(sizes[b] * len(task_vectors) for b in scores)
    pairs = sorted(((float(s[i]), b, i) for b, s in scores.items() for i in range(len(s))), reverse=True)
    chosen: Dict[str, List[int]] = {b: [] for b in scores}
    used = 0
    for _, b, i in pairs:
        if used + sizes[b] > fraction * total:
            continue
        chosen[b].append(i)
        used += sizes[b]
    return {b: sorted(v) for b, v in chosen.items()}


def _bytes_per_task_vector(tvs: TaskVectors, block: str) -> int:
    if tvs.is_lora(block):
        a, b = tvs.lora(block)
        return (a[0].numel() + b[0].numel()) * a.element_size()
    slab = tvs[block]
    scale = tvs.scale(block)
    return slab[0].numel() * slab.element_size() + (0 if scale is None else scale[0].numel() * 4)


def budget_report(before: TaskVectors, after: TaskVectors) -> str:
    """How much memory a budget saved, in words."""
    saved = before.nbytes - after.nbytes
    kept = sum((after.index(b).numel() if after.index(b) is not None else len(after)) for b in after.blocks)
    pairs = len(before) * len(before.blocks)
    return (f"task vectors: {before.nbytes / 2**20:,.1f} MiB -> {after.nbytes / 2**20:,.1f} MiB "
            f"(saved {saved / 2**20:,.1f} MiB, {100 * saved / max(1, before.nbytes):.1f}%); "
            f"kept {kept} of {pairs} (block, task vector) pairs")
