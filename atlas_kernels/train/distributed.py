"""One process or many (``torchrun``): the process group, the gradient all-reduce, the device
and the precision."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .config import ConfigError


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


def sum_gradients(params, loss_sum: torch.Tensor, d: Dist, *, summed: bool = False) -> torch.Tensor:
    """Sum the coefficient gradients (a missing one counts as zeros) and the local loss over the
    processes with one ``all_reduce`` of one flat buffer; sets every ``p.grad`` to the sum and
    returns the summed loss (float32). ``summed``: the gradients are sums over the processes
    already (a sharded module reduces them in backward): only the loss is summed."""
    if summed:
        return _all_reduce(loss_sum.float().reshape(1), d)[0]
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                      for p in params] + [loss_sum.float().reshape(1)])
    _all_reduce(flat, d)
    off = 0
    for p in params:
        n = p.numel()
        p.grad = flat[off:off + n].view_as(p).clone()
        off += n
    return flat[-1]


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
