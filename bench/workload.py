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

The pieces, one job each: :mod:`bench.towers` (the model source), :mod:`bench.synthetic` (data,
task vectors, coefficients), :mod:`bench.methods` (the methods' steps), :mod:`bench.measure`
(timing, op counting, the ceiling, memory) and :mod:`bench.session` (running jobs). This module
is their one face: the runner, the worker and the variant benches import from here.
"""
from __future__ import annotations

from .grid import Settings
from .measure import (
    OOM_ERRORS,
    count_ops,
    free_memory,
    is_oom,
    max_rss_bytes,
    measure_ceiling,
    rss_bytes,
    time_step,
)
from .methods import AUTOCAST_DTYPES, StepBuilder
from .session import Session
from .synthetic import (
    STORAGE_DTYPES,
    adapted_blocks,
    coef_init,
    contiguous_counts,
    lora_rank,
    make_data,
    make_lora_factors,
    make_slabs,
)
from .towers import MODEL_SOURCE, TINY_MODELS, build_visual, image_size

__all__ = [
    "AUTOCAST_DTYPES", "MODEL_SOURCE", "OOM_ERRORS", "STORAGE_DTYPES", "TINY_MODELS", "Session", "Settings",
    "StepBuilder", "adapted_blocks", "build_visual", "coef_init", "contiguous_counts", "count_ops", "free_memory",
    "image_size", "is_oom", "lora_rank", "make_data", "make_lora_factors", "make_slabs", "max_rss_bytes",
    "measure_ceiling", "rss_bytes", "time_step",
]
