"""Differentiable ops (autograd wiring) and the dispatch between backends.

Every op has the same signature in every backend module:

- ``compose(theta0, tau, coef, partition, out_dtype, scale=None)``: a composed block,
  differentiable in ``coef``;
- ``linear(x, w0, w_tau, w_coef, w_partition, b0, b_tau, b_coef, b_partition, w_scale=None,
  b_scale=None)``: ``y = x W^T + c`` with composed ``W`` and ``c``, differentiable in ``x`` and the
  coefficients.

``backend`` is ``"torch"`` (:mod:`.torch_backend`), ``"triton"`` (:mod:`.triton_backend`), ``"cuda"``
(:mod:`.cuda_backend`: the optional compiled extension from ``csrc/``, CPU or CUDA kernels as the
tensors are) or ``"auto"``: per device type the backend measured fastest there (:data:`AUTO_CHOICE`),
among those available in this installation.
"""
from __future__ import annotations

import importlib

import torch

from . import torch_backend
from .lora import lora_compose, lora_linear  # noqa: F401  (backend-agnostic: cuBLAS matmuls)

BACKENDS = ("auto", "torch", "triton", "cuda")
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
    # bench/results/2026-12-01-cpu-ext.jsonl (ViT-B/32, N = 8, batch 8, fp32, float16/int8 task
    # vectors, one CPU run) and bench/results/2026-12-01-cpu-ext-micro.txt (compose and coefficient
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


def compose(theta0, tau, coef, partition, out_dtype, scale=None, backend="torch"):
    return _pick(backend, theta0, out_dtype).compose(theta0, tau, coef, partition, out_dtype, scale)


def linear(x, w0, w_tau, w_coef, w_partition, b0, b_tau, b_coef, b_partition, w_scale=None, b_scale=None,
           backend="torch"):
    return _pick(backend, x, compute_dtype(x)).linear(
        x, w0, w_tau, w_coef, w_partition, b0, b_tau, b_coef, b_partition, w_scale, b_scale
    )


compute_dtype = torch_backend.compute_dtype
