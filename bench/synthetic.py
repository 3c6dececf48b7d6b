"""The synthetic inputs every method shares: images, labels and a fixed head; the task vectors
(dense slabs in a storage dtype, or LoRA factors); the coefficient initialisation; the sizes of a
contiguous partition's parts. All seeded, so every method and every process sees the same numbers
(see :mod:`bench.workload` for the distributions)."""
from __future__ import annotations

import math
import re
import zlib
from typing import Dict, List, Optional

import torch

from .grid import FLOAT_STORAGES
from .towers import image_size

STORAGE_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int8": torch.int8,
    "float8_e4m3fn": getattr(torch, "float8_e4m3fn", None),
}


def make_data(visual, batch: int, classes: int, seed: int, dev: torch.device):
    """(images, labels, head), drawn on the CPU so every device sees the same numbers."""
    g = torch.Generator().manual_seed(seed + 1)
    h, w = image_size(visual)
    x = torch.randn(batch, 3, h, w, generator=g)
    y = torch.randint(0, classes, (batch,), generator=g)
    d = visual.output_dim
    head = torch.randn(classes, d, generator=g) / math.sqrt(d)
    return x.to(dev), y.to(dev), head.to(dev)


def adapted_blocks(visual) -> Dict[str, torch.Tensor]:
    return {n: p for n, p in visual.named_parameters() if p.is_floating_point()}


def make_slabs(visual, n: int, storage: str, dev: torch.device, seed: int, tau_scale: float) -> Dict[str, torch.Tensor]:
    """N random task vectors per block, built on the device row by row (one fp32 block at a time)."""
    build_dtype = STORAGE_DTYPES[storage] if storage in FLOAT_STORAGES else torch.bfloat16
    gen = torch.Generator(device=dev).manual_seed(seed + 2)
    slabs = {}
    for name, p in adapted_blocks(visual).items():
        rms = float(p.detach().float().pow(2).mean().sqrt()) if p.numel() else 0.0
        std = tau_scale * max(rms, 1e-2)
        slab = torch.empty((n, *p.shape), dtype=build_dtype, device=dev)
        for i in range(n):
            if build_dtype == torch.float32:
                slab[i].normal_(0.0, std, generator=gen)
            else:
                row = torch.empty(p.shape, dtype=torch.float32, device=dev).normal_(0.0, std, generator=gen)
                slab[i].copy_(row)
                del row
        slabs[name] = slab
    return slabs


_LORA_BLOCK = re.compile(r"(in_proj_weight|out_proj\.weight|mlp\.c_fc\.weight|mlp\.c_proj\.weight)$")


def lora_rank(storage: str) -> Optional[int]:
    """The rank of a ``lora-r<R>`` storage, else None."""
    return int(storage[len("lora-r"):]) if storage and storage.startswith("lora-r") else None


def make_lora_factors(visual, n: int, rank: int, dev: torch.device, seed: int, tau_scale: float):
    """N random LoRA task vectors (fp16 factors) on the attention and MLP matrices: ``A [N, r, in]``,
    ``B [N, out, r]``, scaled so that ``B A`` has about the dense task vectors' magnitude."""
    gen = torch.Generator(device=dev).manual_seed(seed + 3)
    out = {}
    for name, p in adapted_blocks(visual).items():
        if p.dim() != 2 or not _LORA_BLOCK.search(name):
            continue
        rms = float(p.detach().float().pow(2).mean().sqrt())
        std = (tau_scale * max(rms, 1e-2) / math.sqrt(rank)) ** 0.5
        a = torch.empty((n, rank, p.shape[1]), device=dev).normal_(0.0, std, generator=gen)
        b = torch.empty((n, p.shape[0], rank), device=dev).normal_(0.0, std, generator=gen)
        out[name] = (a.half(), b.half())
    return out


def coef_init(name: str, shape, seed: int, scale: float) -> torch.Tensor:
    """The initial coefficients of block ``name``: ``U(-scale, scale)``, seeded by (seed, name)."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) & 0x7FFFFFFF)
    return (torch.rand(tuple(shape), generator=g, dtype=torch.float32) * 2 - 1) * scale


def contiguous_counts(numel: int, k: int) -> List[int]:
    """Sizes of the K parts of a ``contiguous`` partition, ``part(e) = e * K // numel``
    (atlas_kernels.partitions): part k holds ``e in [ceil(k n / K), ceil((k+1) n / K))``."""
    starts = [-(-(j * numel) // k) for j in range(k + 1)]
    return [starts[j + 1] - starts[j] for j in range(k)]
