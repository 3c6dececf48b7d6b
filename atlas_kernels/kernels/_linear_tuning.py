"""Launch configuration of the linear-layer kernels (:mod:`._linear`): the autotune spaces of the
fused GEMMs and the coefficient gradient, the pruning that keeps register-spilling configs away from
the specializations they spill on, and the fixed choices (row tile, split-K count, gradient tiles).
"""
from __future__ import annotations

from typing import Optional

import triton

from ._common import INTERPRET, device_sms, next_pow2

# Autotune configs: (BLOCK_O or BLOCK_I, BLOCK_K, num_warps) of the fused GEMMs. Chosen from a
# ptxas sweep for sm_90 (every tile of 32..128 x 32..128 on 4 and 8 warps, BLOCK_M 16 and 64,
# bf16/int8 storage, bf16/fp32 compute, K 1 and 4): the *_SAFE configs never spilled; the *_LIGHT
# ones spill only where elements carry a part index or a scale (K > 1, int8/fp8), so they are
# pruned there. `python -m atlas_kernels_tests._compile_kernels --spills` re-checks the survivors.
FUSED_SAFE = [(32, 32, 4), (32, 64, 4), (32, 64, 8), (32, 128, 8), (64, 64, 8)]
FUSED_LIGHT = [(64, 128, 8), (128, 64, 8), (128, 32, 4)]
FUSED_DX_SAFE = [(32, 32, 8), (32, 128, 8), (64, 32, 8)]
FUSED_DX_LIGHT = [(64, 64, 4), (32, 64, 4), (128, 32, 4), (128, 64, 8), (64, 128, 8)]
# (num_warps, num_stages) of the coefficient gradient, whose tile is fixed by `_lcg_tiles`.
LCG_CONFIGS = [(4, 3), (8, 3), (4, 4), (8, 2)]


def _arg(named_args, kwargs, name, default=None):
    return kwargs.get(name, named_args.get(name, default))


def _heavy(named_args, kwargs) -> bool:
    """Elements carry a part index (K > 1) or a dequantization scale: more live registers."""
    return _arg(named_args, kwargs, "K", 1) > 1 or bool(_arg(named_args, kwargs, "HAS_SCALE", False))


def _light(cfg) -> bool:
    """Whether ``cfg`` is one of the *_LIGHT configs, recognised by its values alone: Triton's
    autotune disk cache (``TRITON_CACHE_AUTOTUNING=1``) rebuilds configs with ``Config(**json)`` from
    their ``__dict__``, so a Config must carry no attribute of ours (one did: ``TypeError: unexpected
    keyword argument``, issue 22)."""
    kw = cfg.kwargs
    tile = kw.get("BLOCK_O", kw.get("BLOCK_I"))
    light = FUSED_LIGHT if "BLOCK_O" in kw else FUSED_DX_LIGHT
    return (tile, kw.get("BLOCK_K"), cfg.num_warps) in light


def _prune_fused(configs, named_args, **kwargs):
    if not _heavy(named_args, kwargs):
        return configs
    kept = [c for c in configs if not _light(c)]
    return kept or configs


def _prune_lcg(configs, named_args, **kwargs):
    """The fp32 G tile lives through the N-slab epilogue: large tiles, and 64 x 64 tiles whose
    elements carry a part or scale, get 8 warps (ptxas, sm_90: 4 warps spilled 140-196 bytes)."""
    tile = _arg(named_args, kwargs, "BLOCK_O", 64) * _arg(named_args, kwargs, "BLOCK_I", 64)
    limit = 4096 if _heavy(named_args, kwargs) else 8192
    kept = [c for c in configs if not (tile >= limit and c.num_warps < 8)]
    return kept or configs


def _fused_configs(safe, light, tile_name):
    return [triton.Config({tile_name: t, "BLOCK_K": bk}, num_warps=w, num_stages=3) for t, bk, w in safe + light]


def _block_m(m: int) -> int:
    return min(64, max(16, next_pow2(m)))


def _split_k(device, tiles: int, red: int, split_k: Optional[int]) -> int:
    """Programs along the reduction so that about 2 programs per SM run (GPU); 1 in the interpreter."""
    if split_k is not None:
        return max(1, int(split_k))
    if INTERPRET or device.type != "cuda":
        return 1
    want = triton.cdiv(2 * device_sms(device), max(tiles, 1))
    return int(max(1, min(want, triton.cdiv(red, 256), 16)))


def _lcg_tiles(m: int):
    """(BLOCK_M, BLOCK_O, BLOCK_I) for the coefficient gradient: 64 x 64 (O, I) tiles at small M
    (more programs for the memory-bound task-vector pass), 64 x 128 at large M. The fp32 G tile,
    its int32 offsets and parts stay live through the N-slab epilogue, so 128 x 128 would spill;
    tune these on a GPU (only warps/stages are autotuned: the tile sets the partial-buffer rows)."""
    if INTERPRET:
        return 64, 64, 128
    if m <= 64:
        return 16 if m <= 16 else 32, 64, 64
    return 32, 64, 128
