"""One adapted block's static description, shared by task vectors, modules and patching.

:class:`BlockSpec` is what a :class:`~atlas_kernels.task_vectors.TaskVectors` hands out per block
(:meth:`~atlas_kernels.task_vectors.TaskVectors.block_spec`) and what a module registers: the
slab (or LoRA factors), its per-row scale, the partition, the ragged index and N. It sits below
task vectors, ops and modules, so every layer can name a block without importing upward.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .partitions import Partition, coef_shape

__all__ = ["BlockSpec"]


class BlockSpec:
    """What patching hands a module for one adapted block: a dense slab ``tau`` (with optional
    ``scale``) or LoRA factors ``lora = (A, B)``; its ``partition``; ``n`` (N, the coefficient
    count); and, for a ragged block (a per-block budget), ``index``: which of the N task vectors its
    slab holds."""

    __slots__ = ("tau", "scale", "partition", "lora", "index", "n")

    def __init__(self, tau, scale, partition: Partition, *, lora=None, index=None, n=None):
        self.tau, self.scale, self.partition, self.lora, self.index = tau, scale, partition, lora, index
        held = (tau if lora is None else lora[0]).shape[0]
        self.n = held if n is None else n

    @property
    def device(self):
        return (self.tau if self.lora is None else self.lora[0]).device

    def new_coef(self) -> nn.Parameter:
        # Coefficients start at 0: the patched model starts as the pre-trained one (as in the paper).
        return nn.Parameter(torch.zeros(coef_shape(self.n, self.partition.k), dtype=torch.float32,
                                        device=self.device))

    def register(self, owner: nn.Module, prefix: str) -> None:
        """Register the block's tensors on ``owner`` as ``<prefix>tau`` etc. (non-persistent: task
        vectors never enter model checkpoints)."""
        owner.register_buffer(prefix + "tau", self.tau, persistent=False)
        owner.register_buffer(prefix + "scale", self.scale, persistent=False)
        owner.register_buffer(prefix + "lora_a", None if self.lora is None else self.lora[0], persistent=False)
        owner.register_buffer(prefix + "lora_b", None if self.lora is None else self.lora[1], persistent=False)
        index = None if self.index is None else self.index.to(self.device)
        owner.register_buffer(prefix + "index", index, persistent=False)
        owner.register_parameter(prefix + "coef", self.new_coef())
