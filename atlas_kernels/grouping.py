"""Many small blocks, one launch: :class:`SmallBlockGroup` and the walk that builds it.

The small dense :class:`~atlas_kernels.modules.AtlasParameter` blocks of a patched module
(LayerNorm weights and biases, embeddings: at most
:data:`~atlas_kernels.modules.SMALL_BLOCK_NUMEL` elements each) are composed together in one
``compose_packed`` call per forward of that module, on a backend that has one
(:data:`~atlas_kernels.modules.PACKED_BACKENDS`). :func:`group_small_blocks_of` builds the group at
patch time; :func:`ungroup_small_blocks` removes it at unpatch.
"""
from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import List, NamedTuple, Optional, Tuple

import torch
import torch.nn as nn

from . import ops
from ._adapted import atlas_parametrizations
from .modules import PACKED_BACKENDS, SMALL_BLOCK_NUMEL, _apply_keeping

__all__ = ["SmallBlockGroup", "group_small_blocks_of", "ungroup_small_blocks", "GROUP_ATTR"]

# Where the group is registered on the patched module (no parameters, nothing in the state dict).
GROUP_ATTR = "_atlas_small_blocks"


def _version(t: torch.Tensor):
    """``t._version``, or None for an inference tensor (which has no version counter)."""
    try:
        return t._version
    except RuntimeError:
        return None


@dataclasses.dataclass(frozen=True)
class _Composition:
    """One packed composition of the group's members (the cache of one (grad mode, inference mode)
    slot): the flat output, its per-member ``views``, and what it was composed from: per member
    ``(theta0 version, theta0 data_ptr, coef version, coef data_ptr)``, and ``flat``'s own version."""

    flat: torch.Tensor
    views: List[torch.Tensor]
    keys: List[Tuple[int, int, int, int]]
    flat_version: Optional[int]

    def serves(self, j: int, key) -> bool:
        """Whether member ``j``, now at ``key``, may be served its view: it is unchanged since the
        composition, and the flat output was not modified in place."""
        return self.keys[j] == key and _version(self.flat) == self.flat_version


class _PackedTheta0(NamedTuple):
    """The members' frozen ``theta0`` packed back to back (``flat``), and the ``(version,
    data_ptr)`` per member it was packed from (``keys``; repacked only when one changes)."""

    keys: Optional[List[Tuple[int, int]]] = None
    flat: Optional[torch.Tensor] = None


class SmallBlockGroup(nn.Module):
    """The small dense :class:`AtlasParameter` blocks of one patched module, composed in one
    ``compose_packed`` launch per forward of that module (``patch(..., group_small_blocks=True)``,
    backend resolving to ``"triton"``).

    Holds (non-persistent buffers: never in a ``state_dict``; they follow ``.to()``) the members'
    task vectors packed as ``tau_flat [N, P]`` in their storage dtype, ``scale_flat [N, R]`` for
    int8/fp8 storage, and the :class:`~atlas_kernels.kernels.PackedLayout` table. ``theta0_flat`` is
    packed from the members' ``parametrizations.<name>.original`` and repacked only when one of them
    changes (version or storage), so a ``load_state_dict`` into the patched module is always seen. The coefficients stay
    the members' own ``coef`` parameters; ``coef_flat`` is one differentiable ``torch.cat`` of them.
    Members are referenced as plain attributes (not submodules): nothing here shows up in
    :func:`~atlas_kernels.coefficients`, ``parameters()`` or the state dict.

    Cache (correctness first): a forward pre-hook on the patched root drops any cache and composes
    once, eagerly, before the forward body runs (so outside any activation-checkpointed region);
    an ``always_call`` forward hook closes the forward but keeps the cache, so that a non-reentrant
    checkpoint's recomputation during backward is served the very same views and saves the same
    tensors. The composed flat tensor is cached per (grad mode, inference mode) slot, and a
    member's view is served only if its own ``theta0`` and ``coef`` still have the ``_version`` and
    ``data_ptr`` recorded at composition and the flat output itself was not modified in place;
    otherwise the group composes again inside a forward, or (outside one: a submodule called
    directly, reading ``module.weight`` by hand after ``optimizer.step()``) the member composes on
    its own, as without grouping.
    """

    def __init__(self, members):
        """``members``: ``[(owner, name, atlas_parameter)]``: dense, un-indexed blocks sharing
        device, storage dtype, theta0 dtype and scaled-or-not."""
        super().__init__()
        params = [p for _, _, p in members]
        first = params[0]
        n = first.tau.shape[0]
        shapes = [tuple(owner.parametrizations[name].original.shape) for owner, name, _ in members]
        layout = ops.packed_layout(shapes, [p.partition for p in params], device=first.tau.device)
        with torch.no_grad():
            tau_flat = torch.cat([p.tau.reshape(n, -1) for p in params], dim=1).contiguous()
            scale_flat = None
            if first.scale is not None:
                scale_flat = torch.cat([p.scale.reshape(n, -1) for p in params], dim=1).contiguous()
        self.register_buffer("tau_flat", tau_flat, persistent=False)
        self.register_buffer("scale_flat", scale_flat, persistent=False)
        # The layout's tables as buffers (they follow .to()); layout() puts them back in the layout.
        self.register_buffer("table", layout.table, persistent=False)
        self.register_buffer("tile_map", layout.tile_map, persistent=False)
        self._layout = dataclasses.replace(layout, table=None, tile_map=None)
        self._members = list(members)  # a plain list: the members are not submodules of the group
        self._depth = 0
        self._cache = {}  # (grad mode, inference mode) -> _Composition
        self._theta0 = _PackedTheta0()
        # Each member learns its group and slot once, here (plain attributes, object.__setattr__:
        # the group is not a submodule of every member).
        for j, p in enumerate(params):
            object.__setattr__(p, "_atlas_group", self)
            object.__setattr__(p, "_atlas_slot", j)

    def _apply(self, fn, recurse=True):
        return _apply_keeping(self, ("tau_flat", "scale_flat"), fn, recurse)

    def layout(self):
        """The :class:`~atlas_kernels.kernels.PackedLayout`, with the tables on the group's device."""
        return dataclasses.replace(self._layout, table=self.table, tile_map=self.tile_map)

    # ------------------------------------------------------------------ hooks on the patched root
    def attach(self, root: nn.Module) -> None:
        root.register_forward_pre_hook(self._begin_forward)
        root.register_forward_hook(self._end_forward, always_call=True)

    def detach(self, root: nn.Module) -> None:
        """Remove the hooks from ``root`` and the members' references to the group. Hooks are found
        by identity rather than kept handles, which would point at the wrong module after a
        ``copy.deepcopy`` of the patched module."""
        for hooks in (root._forward_pre_hooks, root._forward_hooks):
            for key, fn in list(hooks.items()):
                if getattr(fn, "__self__", None) is self:
                    del hooks[key]
                    for extra in ("_forward_hooks_always_called", "_forward_hooks_with_kwargs",
                                  "_forward_pre_hooks_with_kwargs"):
                        getattr(root, extra, {}).pop(key, None)
        for _, _, p in self._members:
            p.__dict__.pop("_atlas_group", None)
            p.__dict__.pop("_atlas_slot", None)
        self._cache = {}

    def _begin_forward(self, module, args):
        if torch.compiler.is_compiling():
            return None
        if self._depth == 0:
            self._cache = {}
            # Compose eagerly, here, outside any activation-checkpointed region of the forward: the
            # composition's saved tensors then belong to no checkpoint, and a checkpoint's
            # recomputation (during backward) is served the same views (see value()).
            first = self._members[0][2]
            if ops.resolve(first.backend, self.tau_flat.device) in PACKED_BACKENDS:
                entry = self._compose()
                if entry is not None:
                    self._cache[(torch.is_grad_enabled(), torch.is_inference_mode_enabled())] = entry
        self._depth += 1
        return None

    def _end_forward(self, module, args, output):
        if torch.compiler.is_compiling():
            return None
        # The cache is kept until the next forward begins, so non-reentrant activation checkpointing
        # recomputes with the very same views (no extra saved tensors); value() checks versions.
        self._depth = max(self._depth - 1, 0)
        return None

    # --------------------------------------------------------------------------------- compose
    def value(self, j: int, theta0: torch.Tensor) -> Optional[torch.Tensor]:
        """Member ``j``'s composed value (a view of the group's packed output), or None when the
        caller must compose the block itself (outside a forward of the root, or members no longer
        on one device/dtype)."""
        p = self._members[j][2]
        try:
            key = (theta0._version, theta0.data_ptr(), p.coef._version, p.coef.data_ptr())
        except RuntimeError:  # inference tensors have no version counter: never cache them
            return None
        slot = (torch.is_grad_enabled(), torch.is_inference_mode_enabled())
        entry = self._cache.get(slot)
        if entry is None or not entry.serves(j, key):
            if self._depth == 0:
                return None  # outside a forward of the root: never start a cache, compose per block
            entry = self._compose()
            if entry is None:
                return None
            self._cache[slot] = entry
            if entry.keys[j] != key:  # theta0 is not the member's original: do not guess
                return None
        return entry.views[j]

    def _compose(self) -> Optional[_Composition]:
        thetas = [owner.parametrizations[name].original for owner, name, _ in self._members]
        coefs = [p.coef for _, _, p in self._members]
        device, dtype = self.tau_flat.device, thetas[0].dtype
        if any(t.device != device or t.dtype != dtype for t in thetas) or any(c.device != device for c in coefs):
            return None
        if dtype == torch.float64:
            return None  # the kernels are fp32-accumulating; float64 goes block by block to torch
        try:
            keys = [(t._version, t.data_ptr(), c._version, c.data_ptr()) for t, c in zip(thetas, coefs)]
        except RuntimeError:
            return None
        n = self.tau_flat.shape[0]
        theta_keys = [k[:2] for k in keys]
        if self._theta0.keys != theta_keys:  # theta0 is frozen: repack only when one of them changed
            with torch.no_grad():
                self._theta0 = _PackedTheta0(theta_keys, torch.cat([t.reshape(-1) for t in thetas]))
        coef_flat = torch.cat([c.reshape(n, -1) for c in coefs], dim=1)
        layout = self.layout()
        flat = ops.compose_packed(self._theta0.flat, self.tau_flat, coef_flat, layout, dtype, self.scale_flat,
                                  backend=self._members[0][2].backend)
        return _Composition(flat, layout.views(flat), keys, _version(flat))

    def extra_repr(self) -> str:
        return f"blocks={len(self._members)}, numel={self._layout.total_numel}"


def group_small_blocks_of(module: nn.Module) -> None:
    """Collect the small dense AtlasParameter blocks of ``module`` into a SmallBlockGroup (the
    largest set sharing device, storage dtype, theta0 dtype and scaled-or-not; the rest, if any,
    stay per block)."""
    sets = defaultdict(list)
    seen = set()
    for _, m in module.named_modules():
        for local, chain, p in atlas_parametrizations(m):
            if p.lora_a is not None or p.index is not None:
                continue
            if id(p) in seen:
                continue  # a tied block: one member, whichever owner reads it
            seen.add(id(p))
            theta0 = chain.original
            if p.tau is None or theta0.numel() > SMALL_BLOCK_NUMEL or theta0.device != p.tau.device:
                continue
            sets[(str(p.tau.device), p.tau.dtype, theta0.dtype, p.scale is not None)].append((m, local, p))
    if not sets:
        return
    members = max(sets.values(), key=len)
    if len(members) < 2:
        return
    group = SmallBlockGroup(members)
    # A container's forward runs its children: hold the group on a member there instead.
    holder = members[0][2] if isinstance(module, (nn.Sequential, nn.ModuleList, nn.ModuleDict)) else module
    holder.add_module(GROUP_ATTR, group)
    group.attach(module)


def ungroup_small_blocks(module: nn.Module) -> None:
    for m in list(module.modules()):
        group = m._modules.get(GROUP_ATTR)
        if isinstance(group, SmallBlockGroup):
            group.detach(module)
            del m._modules[GROUP_ATTR]
