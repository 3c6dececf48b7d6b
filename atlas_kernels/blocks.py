"""One adapted block, named as one value, shared by task vectors, ops, modules and patching.

- :class:`BlockSpec` is the static description a :class:`~atlas_kernels.task_vectors.TaskVectors`
  hands out per block (:meth:`~atlas_kernels.task_vectors.TaskVectors.block_spec`) and a module
  registers: the slab (or LoRA factors), its per-row scale, the partition, the ragged index and N.
- :class:`Block` is what one call of an op takes (:func:`atlas_kernels.ops.compose`,
  :func:`atlas_kernels.ops.linear`): the frozen ``theta0`` with that slab and the current
  coefficients, read back from a module by :meth:`Block.read`.
- :func:`coef_matrix`: coefficients ``[N]`` or ``[N, K]`` as ``[N, K]`` (the one reshape every op does).

This module sits below task vectors, kernels, ops and modules, so every layer can name a block
without importing upward.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn as nn

from .partitions import Partition, coef_shape

__all__ = ["Block", "BlockSpec", "coef_matrix"]


def coef_matrix(coef: torch.Tensor, n: int) -> torch.Tensor:
    """Coefficients ``[N]`` or ``[N, K]`` as an ``[N, K]`` view (differentiable: the gradient comes
    back in ``coef``'s own shape); a clear error for any other shape."""
    c = coef[:, None] if coef.dim() == 1 else coef
    if c.dim() != 2 or c.shape[0] != n:
        raise ValueError(f"coefficients must be [N] or [N, K] with N = {n}, got {tuple(coef.shape)}")
    return c


class Block(NamedTuple):
    """One block as an op sees it: ``theta0 + sum_i coef[i, part(e)] * tau_i``. Immutable, and read
    by field name (a named tuple: built once per block per call, it costs a third of a frozen
    dataclass, and torch.compile traces it as plain values).

    - ``theta0``: the frozen pre-trained value (None: the block is absent, e.g. no bias);
    - ``tau``: the dense ``[N, *shape]`` slab, or ``lora = (A [N, r, in], B [N, out, r])``; both
      None: the block is frozen at ``theta0``;
    - ``coef``: ``[N]`` or ``[N, K]`` coefficients of the task vectors the slab holds (for a
      ragged block already selected by its ``index``: :meth:`read` does that);
    - ``partition``: the ``K`` parts (None: ``Partition(K)``); ``scale``: per-row scales of int8/fp8
      storage; ``index``: which of the N task vectors a ragged slab holds (kept for the record).
    """

    theta0: Optional[torch.Tensor]
    tau: Optional[torch.Tensor] = None
    coef: Optional[torch.Tensor] = None
    partition: Optional[Partition] = None
    scale: Optional[torch.Tensor] = None
    lora: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
    index: Optional[torch.Tensor] = None

    def encoding(self) -> Tuple[int, int, int]:
        """``(k, code, key)`` of the block's partition (:meth:`Partition.encoding`); no partition
        means ``Partition(K)`` with K the coefficients' column count."""
        if self.partition is not None:
            return self.partition.encoding()
        return (self.coef.shape[1] if self.coef.dim() == 2 else 1), 0, 0

    @property
    def adapted(self) -> bool:
        """Whether the block has task vectors (dense or LoRA) and coefficients."""
        return self.tau is not None or self.lora is not None

    @classmethod
    def read(cls, owner: nn.Module, prefix: str, theta0: Optional[torch.Tensor],
             partition: Optional[Partition]) -> "Block":
        """The block registered on ``owner`` by :meth:`BlockSpec.register` under ``prefix``, with
        ``theta0`` and its current coefficients (``partition`` None: not adapted, frozen).
        ``theta0`` may be None where only the displacement is wanted (the slab gives the shape)."""
        if partition is None:
            return cls(theta0)
        coef = getattr(owner, prefix + "coef")
        index = getattr(owner, prefix + "index")
        if index is not None:
            coef = coef.index_select(0, index)  # the coefficients of the task vectors the slab holds
        a = getattr(owner, prefix + "lora_a")
        lora = None if a is None else (a, getattr(owner, prefix + "lora_b"))
        return cls(theta0, getattr(owner, prefix + "tau"), coef, partition, getattr(owner, prefix + "scale"),
                   lora, index)


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
