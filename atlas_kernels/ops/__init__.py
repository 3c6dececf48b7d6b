"""Differentiable ops, and the backends that run them: chosen once, when a module is patched.

A backend is one object (:class:`~atlas_kernels.ops.backend.Backend`) with the same methods in
every implementation:

- ``compose(block, out_dtype)``: a block's composed value, differentiable in ``block.coef``;
- ``linear(x, wblock)``: ``y = x W^T`` with composed ``W`` (no bias: a bias is a block of its own,
  composed and added by the caller), differentiable in ``x`` and the coefficients;
- ``compose_group(group, dtypes)`` / ``coef_grad_group(group, grads)``: every block of a
  :class:`~atlas_kernels.grouping.BlockGroup` in one pass (no autograd; :class:`.group.GroupCompose`
  is their one autograd wiring);
- ``own_linear(wblock, device, config)``: whether a linear layer runs ``linear`` itself rather
  than reading its weight from the group.

Backends: ``"torch"`` (:mod:`.torch_backend`, plain PyTorch), ``"triton"`` (:mod:`.triton_backend`,
the kernels of :mod:`atlas_kernels.kernels`), ``"ext"`` (:mod:`.ext_backend`, the optional compiled
extension from ``csrc/``, with CPU kernels and, when built with CUDA, CUDA kernels). ``"cuda"`` is the
old name of ``"ext"`` (deprecated). ``"auto"`` is resolved by :func:`choose` when a module is patched;
the rule and the measurements behind it are in ``docs/PERFORMANCE.md``.

Nothing here runs per call: :func:`get` imports a backend when a plan is made, and the per-call path
holds the object. LoRA blocks take :mod:`.lora` (cuBLAS matmuls on the factors) on every backend.
"""
from __future__ import annotations

import importlib
import warnings
from typing import Optional

import torch

from .._launches import region
from ..blocks import Block
from .backend import Backend, compute_dtype  # noqa: F401  (the backend protocol; the one dtype rule)
from .lora import lora_compose, lora_linear  # noqa: F401  (backend-agnostic: cuBLAS matmuls)

BACKENDS = ("auto", "torch", "triton", "ext")
# Old names still accepted (with a DeprecationWarning): "cuda" meant the compiled extension, whose
# kernels run on the CPU too.
ALIASES = {"cuda": "ext"}
_MODULES = {"torch": ".torch_backend", "triton": ".triton_backend", "ext": ".ext_backend"}
_loaded = {}


def check_backend(backend: str) -> str:
    """``backend`` as a name in :data:`BACKENDS` (an old alias mapped, with a DeprecationWarning);
    ValueError for anything else."""
    if backend in ALIASES:
        new = ALIASES[backend]
        warnings.warn(f"backend={backend!r} is deprecated: it is the compiled extension, whose kernels run on the CPU "
                      f"too; use backend={new!r}", DeprecationWarning, stacklevel=3)
        return new
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def get(name: str) -> Backend:
    """The backend object ``name`` (imported on first use). ``"ext"`` without the built extension
    raises a RuntimeError that says how to build it."""
    b = _loaded.get(name)
    if b is not None:
        return b
    if name not in _MODULES:
        raise ValueError(f"no backend {name!r}: one of {tuple(_MODULES)}")
    try:
        mod = importlib.import_module(_MODULES[name], __name__)
    except ImportError as exc:
        if name != "ext":
            raise
        raise RuntimeError(
            "backend='ext' needs the optional compiled extension from csrc/, which is not built in this "
            "installation. Build it with `ATLAS_KERNELS_BUILD_EXT=1 pip install -e . --no-build-isolation` (CPU "
            "kernels; CUDA kernels too when CUDA_HOME is set), or in a source tree `ATLAS_KERNELS_BUILD_EXT=1 "
            "python setup.py build_ext --inplace`; see csrc/README.md. Or use backend='triton' or 'torch'"
        ) from exc
    _loaded[name] = mod.BACKEND
    return mod.BACKEND


def unavailable(name: str, device: torch.device) -> Optional[str]:
    """Why backend ``name`` cannot run tensors on ``device`` here, or None when it can."""
    if name == "torch":
        return None
    if name == "triton":
        if device.type == "cuda":
            try:
                get("triton")
            except Exception as exc:  # triton missing or broken on this machine
                return f"triton cannot be imported ({type(exc).__name__}: {exc})"
            return None
        from .._env import is_interpreter

        if device.type == "cpu" and is_interpreter():
            return None  # Triton's CPU interpreter (tests, tiny sizes)
        return (f"backend='triton' runs CUDA tensors; these are on {device.type} (set TRITON_INTERPRET=1 before "
                f"importing atlas_kernels to run the kernels in Triton's interpreter, tiny sizes only, or use "
                f"backend='torch')")
    if name == "ext":
        try:
            ext = get("ext")
        except RuntimeError as exc:
            return str(exc)
        if not ext.has_device_kernels(device.type):
            return (f"the compiled extension has no kernels for {device.type} tensors; "
                    + (ext.BUILD_HINT if device.type == "cuda" else "use backend='torch'"))
        return None
    return f"no backend {name!r}"


# "auto", per device type: the backends measured fastest there, in order of preference, among those
# that can run (docs/PERFORMANCE.md, "Which backend auto picks", cites the measurements).
AUTO_CHOICE = {
    "cuda": ("triton", "ext", "torch"),
    "cpu": ("ext", "torch"),
}


def choose(backend: str, device: torch.device) -> str:
    """The backend that runs blocks on ``device``: ``backend`` itself, or for ``"auto"`` the first
    of :data:`AUTO_CHOICE` that can run there (``"torch"`` always can)."""
    backend = check_backend(backend)
    if backend != "auto":
        return backend
    for name in AUTO_CHOICE.get(device.type, ("torch",)):
        if unavailable(name, device) is None:
            return name
    return "torch"


def for_dtype(backend: Backend, dtype: torch.dtype) -> Backend:
    """The one float64 rule: the kernels accumulate in fp32 and store fp16/bf16/fp32, so float64
    blocks (reference work, a ``model.double()``) take the torch backend, which accumulates in
    float64."""
    return get("torch") if dtype == torch.float64 else backend


def _resolve(backend) -> Backend:
    return backend if isinstance(backend, Backend) else get(check_backend(backend) if backend != "auto" else "torch")


def compose(block: Block, out_dtype, backend="torch"):
    """``block``'s composed value in ``out_dtype``, differentiable in its coefficients (a frozen
    block: ``theta0`` cast; an absent one: None). ``backend``: a :class:`Backend` or its name."""
    if block.theta0 is None:
        return None
    if not block.adapted:
        return block.theta0.to(out_dtype)
    with region():
        if block.lora is not None:
            return lora_compose(block, out_dtype)
        return for_dtype(_resolve(backend), block.theta0.dtype).compose(block, out_dtype)


def linear(x, wblock: Block, bblock: Optional[Block] = None, backend="torch"):
    """``y = x W^T + c`` with ``W``, ``c`` composed from ``wblock``/``bblock`` (None: no bias), in
    :func:`compute_dtype` of ``x``."""
    dtype = compute_dtype(x)
    bias = None if bblock is None else compose(bblock, dtype, backend)
    with region():
        if wblock.lora is not None:
            return lora_linear(x, wblock, bias)
        if not wblock.adapted:
            y = torch.nn.functional.linear(x.to(dtype), wblock.theta0.to(dtype))
        else:
            wide = torch.float64 if torch.float64 in (dtype, wblock.theta0.dtype) else dtype
            y = for_dtype(_resolve(backend), wide).linear(x, wblock)
        return y if bias is None else y + bias
