"""How many device kernels the library issues, readable on a CPU: :func:`count`.

Two sources, both counted only while :func:`count` is active (otherwise each check is one global
read):

- every Triton kernel launch, at the one seam every launcher goes through (:func:`launch`);
- every ATen or compiled-extension operator that does work (not a view, an allocation or a
  detach) issued inside the library's ops: the grouped compose and its backward, and the per-block ops (marked with
  :func:`region`). The plain model's own operators (``F.linear``, ``F.layer_norm``, ...) are not
  the library's and are not counted.

:func:`launch` is also the seam of the host-cost benchmark (``python -m bench.host``): with
:func:`set_launcher` the Triton launches become no-ops, so that everything else on the path (the
plan, the autograd wiring, the launchers' argument checks) runs and is timed as it is.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Callable, Optional

__all__ = ["count", "region", "launch", "set_launcher", "Counts"]


class Counts:
    """``triton``: Triton kernel launches; ``aten``: working ATen operators inside the library's
    ops; ``total``: both; ``by_op``: the ATen operators by name."""

    def __init__(self):
        self.triton = 0
        self.aten = 0
        self.by_op: dict = {}

    @property
    def total(self) -> int:
        return self.triton + self.aten

    def __repr__(self) -> str:
        return f"Counts(total={self.total}, triton={self.triton}, aten={self.aten})"


_ACTIVE: Optional[Counts] = None
_STATE = threading.local()


def _default_launch(kernel, grid, args, kwargs):
    return kernel[grid](*args, **kwargs)


_LAUNCH: Callable = _default_launch


def set_launcher(fn: Optional[Callable]) -> Callable:
    """Replace how a Triton kernel is launched (``fn(kernel, grid, args, kwargs)``; None: the real
    launch). Returns the previous one. For the host-cost benchmark only."""
    global _LAUNCH
    old = _LAUNCH
    _LAUNCH = fn or _default_launch
    return old


def launch(kernel, grid, *args, **kwargs):
    """Launch ``kernel[grid](*args, **kwargs)``: every Triton launch of the library comes here."""
    counts = _ACTIVE
    if counts is None:
        return _LAUNCH(kernel, grid, args, kwargs)
    counts.triton += 1
    depth = getattr(_STATE, "depth", 0)
    _STATE.depth = -(1 << 30)  # the kernel's own work (the interpreter's copies) is not an operator of ours
    try:
        return _LAUNCH(kernel, grid, args, kwargs)
    finally:
        _STATE.depth = depth


@contextlib.contextmanager
def _region():
    _STATE.depth = getattr(_STATE, "depth", 0) + 1
    try:
        yield
    finally:
        _STATE.depth -= 1


_NULL = contextlib.nullcontext()


def region():
    """Marks the library's own work (ATen operators in it are counted while :func:`count` runs)."""
    return _NULL if _ACTIVE is None else _region()


@contextlib.contextmanager
def count():
    """Count the library's kernel launches while the block runs (one thread; on a GPU the autograd
    engine runs backward on other threads, so count on the CPU)."""
    global _ACTIVE
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    free = {torch.ops.aten.empty.memory_format, torch.ops.aten.empty_strided.default, torch.ops.aten.detach.default,
            torch.ops.aten.lift_fresh.default, torch.ops.aten.empty_like.default, torch.ops.aten.new_empty.default}
    counts = Counts()

    class _Mode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if (getattr(_STATE, "depth", 0) > 0 and func.namespace in ("aten", "atlas_kernels_ext")
                    and not func.is_view and func not in free):
                counts.aten += 1
                name = func.overloadpacket.__name__
                counts.by_op[name] = counts.by_op.get(name, 0) + 1
            return func(*args, **(kwargs or {}))

    if _ACTIVE is not None:
        raise RuntimeError("atlas_kernels launch counting is already active")
    _ACTIVE = counts
    try:
        with _Mode():
            yield counts
    finally:
        _ACTIVE = None
