"""Differentiable ops (autograd wiring) and the dispatch between backends.

A block travels as one :class:`~atlas_kernels.blocks.Block` (theta0, slab or LoRA factors,
coefficients, partition, scale), flattened to tensors only at the ``torch.library`` boundary. Every
op has the same signature in every backend module:

- ``compose(block, out_dtype)``: a composed block, differentiable in ``block.coef``;
- ``linear(x, wblock, bblock=None)``: ``y = x W^T + c`` with composed ``W`` and ``c``,
  differentiable in ``x`` and the coefficients;
- ``compose_packed(theta0_flat, tau_flat, coef_flat, layout, out_dtype, scale_flat=None)`` (the
  backends in :data:`PACKED_BACKENDS`): many small blocks in one call, laid out by
  :func:`packed_layout`.

Here, :func:`compose` and :func:`linear` route LoRA blocks to :mod:`.lora` (cuBLAS matmuls on the
factors, any backend) and dense ones to the backend.

``backend`` is ``"torch"`` (:mod:`.torch_backend`), ``"triton"`` (:mod:`.triton_backend`), ``"cuda"``
(:mod:`.cuda_backend`: the optional compiled extension from ``csrc/``, CPU or CUDA kernels as the
tensors are) or ``"auto"``: per device type the backend measured fastest there (:data:`AUTO_CHOICE`),
among those available in this installation.
"""
from __future__ import annotations

import importlib
from typing import Optional

import torch

from ..blocks import Block
from . import torch_backend
from .lora import lora_compose, lora_linear  # noqa: F401  (backend-agnostic: cuBLAS matmuls)

BACKENDS = ("auto", "torch", "triton", "cuda")
# Backends with a packed (one call for many small blocks) compose.
PACKED_BACKENDS = ("triton", "cuda")
_loaded = {"torch": torch_backend}


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def _module(name: str):
    mod = _loaded.get(name)
    if mod is None:
        if name == "triton":
            mod = importlib.import_module(".triton_backend", __name__)
        elif name == "cuda":
            try:
                mod = importlib.import_module(".cuda_backend", __name__)
            except ImportError as exc:
                raise RuntimeError(
                    "backend='cuda' needs the optional compiled extension from csrc/, which is not built "
                    "in this installation. Build it with `ATLAS_KERNELS_BUILD_EXT=1 pip install -e . "
                    "--no-build-isolation` (CPU kernels; CUDA kernels too when CUDA_HOME is set), or in a "
                    "source tree `ATLAS_KERNELS_BUILD_EXT=1 python setup.py build_ext --inplace`; see "
                    "csrc/README.md. Or use backend='triton' or 'torch'"
                ) from exc
        else:  # pragma: no cover - guarded by check_backend
            raise ValueError(name)
        _loaded[name] = mod
    return mod


# "auto", per device type: the backend measured fastest there, and where the measurement is.
# Backends missing from an installation (the extension not built, no Triton) fall through in order.
AUTO_CHOICE = {
    # bench/results/2026-12-01-cpu-ext-scratch.txt (ViT-B/32, N = 8, batch 8, fp32, float16/int8
    # task vectors, 4 rounds on the project's CPU: step 1217 vs 1912 ms with float16 slabs, 1024
    # vs 5933 ms with int8) and bench/results/2026-12-01-cpu-ext-micro.txt (compose and coefficient
    # gradient of a 3072 x 768 block): the extension's CPU kernels beat the torch backend
    "cpu": ("cuda", "torch"),
    # no GPU measurement of the extension yet: Triton stays the choice on CUDA devices
    "cuda": ("triton", "torch"),
}


def _available(name: str) -> bool:
    try:
        _module(name)
        return True
    except Exception:  # not built / not importable here
        return False


def resolve(backend: str, device: torch.device) -> str:
    """The concrete backend for tensors on ``device``."""
    if backend != "auto":
        return backend
    if device.type == "cpu":
        for name in AUTO_CHOICE["cpu"]:
            if name == "torch" or _available(name):
                return name
    if device.type == "cuda":
        try:
            _module("triton")
            return "triton"
        except Exception:  # pragma: no cover - triton missing or broken on this GPU machine
            return "torch"
    return "torch"


def _pick(backend: str, t: torch.Tensor, dtype: torch.dtype):
    name = resolve(backend, t.device)
    if name in ("triton", "cuda") and torch.float64 in (dtype, t.dtype):
        # The kernels accumulate in fp32 and store fp16/bf16/fp32; float64 (reference work, a
        # model.double()) takes the torch backend, which accumulates in float64.
        name = "torch"
    return _module(name)


def compose(block: Block, out_dtype, backend="torch"):
    """``block``'s composed value in ``out_dtype``, differentiable in its coefficients (a frozen
    block: ``theta0`` cast; an absent one: None)."""
    if block.theta0 is None:
        return None
    if not block.adapted:
        return block.theta0.to(out_dtype)
    if block.lora is not None:
        return lora_compose(block, out_dtype)
    return _pick(backend, block.theta0, out_dtype).compose(block, out_dtype)


def linear(x, wblock: Block, bblock: Optional[Block] = None, backend="torch"):
    """``y = x W^T + c`` with ``W``, ``c`` composed from ``wblock``/``bblock`` (None: no bias)."""
    if wblock.lora is not None:
        bias = None if bblock is None else compose(bblock, compute_dtype(x), backend)
        return lora_linear(x, wblock, bias)
    return _pick(backend, x, compute_dtype(x)).linear(x, wblock, bblock)


def compose_packed(theta0_flat, tau_flat, coef_flat, layout, out_dtype, scale_flat=None, backend="auto"):
    """All blocks of ``layout`` (see :func:`packed_layout`) composed in one call of a backend in
    :data:`PACKED_BACKENDS`: a flat ``[P]`` tensor (split it with ``layout.views``), differentiable
    in ``coef_flat [N, layout.total_cols]``."""
    name = resolve(backend, tau_flat.device)
    if name not in PACKED_BACKENDS:
        raise ValueError(f"compose_packed needs a backend in {PACKED_BACKENDS}, got {backend!r} (resolved to "
                         f"{name!r} for {tau_flat.device.type} tensors)")
    return _module(name).compose_packed(theta0_flat, tau_flat, coef_flat, layout, out_dtype, scale_flat)


def packed_layout(shapes, partitions=None, device=None):
    """The :class:`~atlas_kernels.kernels.PackedLayout` of blocks of ``shapes`` packed back to back
    (the table every packed backend reads)."""
    from ..kernels import make_packed_layout

    return make_packed_layout(shapes, partitions, device=device)


compute_dtype = torch_backend.compute_dtype
