"""One plan per patched tower, made when it is patched: :class:`Plan`.

The plan decides, once, everything a call needs, and keeps it on the modules:

- the backend object of every block (``"auto"`` resolved per device by
  :func:`atlas_kernels.ops.choose`; float64 blocks take the torch backend);
- which linear weights run their backend's own linear op (LoRA factors; the fused linear where
  ``fused_linear`` asks for it or the backend's rule picks it) and which blocks join a group;
- the groups (:class:`~atlas_kernels.grouping.BlockGroup`) with their launch tables.

Per call, a forward pre-hook on the patched root composes every group (one
:class:`~atlas_kernels.ops.group.GroupCompose` each: on the Triton backend one kernel launch) before
the forward body runs, and the modules read their views (:meth:`Plan.value`). The values are kept
until the next forward begins, so that a non-reentrant activation checkpoint's recomputation during
backward is served the very same tensors; outside a forward, a view is served only while the
block's coefficients and theta0 are unchanged since it was composed (and in the same grad mode),
else the module composes the block itself. Under ``torch.compile`` nothing is cached: each module
composes its blocks through its backend's per-block ops (custom ops), which trace into one graph.

The plan is redone when it no longer matches the modules: after ``.to()`` / ``.half()`` /
``.cuda()`` (their ``_apply`` marks it stale), ``load_state_dict`` (a post-hook marks it stale),
``copy.deepcopy``, or when a checked tensor was replaced (checked before every grouped compose:
theta0, slab and coefficient objects, and the coefficients' addresses).
"""
from __future__ import annotations

import copy
import dataclasses
from collections import defaultdict
from typing import Dict, List, Optional

import torch
import torch.nn as nn

from . import ops
from .grouping import BlockGroup, Entry
from .modules import AtlasModule, _BlockHolder
from .ops.group import GroupCompose
from .patch_config import CONFIG_ATTR

__all__ = ["Plan", "PLAN_ATTR", "plan_of"]

# Where the plan lives on the patched root (a plain attribute: no parameters, nothing in the state dict).
PLAN_ATTR = "_atlas_plan_root"


def plan_of(module: nn.Module) -> Optional["Plan"]:
    return module.__dict__.get(PLAN_ATTR)


def _version(t: torch.Tensor) -> Optional[int]:
    try:
        return t._version
    except RuntimeError:  # an inference tensor has no version counter
        return None


class Plan:
    """The plan of one patched root (see the module docstring). ``groups``, ``backends`` (device ->
    backend name) and ``own`` (blocks composed or multiplied by their own module) describe it;
    :meth:`summary` says it in words. A sharded tower has a
    :class:`~atlas_kernels.sharding.ShardedPlan` (``sharded`` True)."""

    sharded = False

    def __init__(self, root: nn.Module, *, backend: str = "auto", grouped: bool = True, fused_linear="auto",
                 fused_max_m: Optional[int] = None, linearised: bool = False):
        self.root = root
        self.backend = backend
        self.grouped = grouped and not linearised
        self.fused_linear = fused_linear
        self.fused_max_m = fused_max_m
        self.groups: List[BlockGroup] = []
        self.backends: Dict[str, str] = {}
        self.own: List[str] = []
        self.stale = True
        self.depth = 0
        self.values: Optional[list] = None
        self._modes = None
        self._versions: Optional[list] = None
        self._ids: list = []
        self._ptrs: list = []
        self._theta0s: list = []

    # ------------------------------------------------------------------ building
    def owners(self):
        """``(path, module)`` of every module holding adapted blocks (or tied aliases)."""
        for path, m in self.root.named_modules():
            if isinstance(m, _BlockHolder):
                yield path, m

    def build(self) -> "Plan":
        """(Re)make the plan from the modules as they are now."""
        self.values = None
        self.groups, self.own = [], []
        self.backends = {}
        chosen: Dict[str, object] = {}
        pending = defaultdict(list)
        for path, m in self.owners():
            d = m.__dict__
            # tied blocks: the alias owner holds the primary's theta0 under its own key too
            for name, (primary, pname) in d["_atlas_alias"].items():
                m._buffers[name] = primary._buffers[pname]
            slots = {}
            own = set()
            backend = None
            for name, part in d["_atlas_parts"].items():
                theta0 = m._buffers[name]
                dev = str(theta0.device)
                if dev not in chosen:
                    chosen[dev] = ops.get(ops.choose(self.backend, theta0.device))
                    self.backends[dev] = chosen[dev].name
                backend = chosen[dev]
                block_backend = ops.for_dtype(backend, theta0.dtype)
                is_linear = isinstance(m, AtlasModule) and name in ("weight", "in_proj_weight")
                block = m._atlas_block(name)
                if block.lora is not None:
                    if is_linear:
                        own.add(name)
                    self.own.append(f"{path}.{name}".lstrip("."))
                    continue
                if is_linear and block_backend.own_linear(block, theta0.device, self.fused_linear):
                    own.add(name)
                    self.own.append(f"{path}.{name}".lstrip("."))
                    continue
                entry = Entry(m, name, 0 if isinstance(m, AtlasModule) else 1, part)
                if not self.grouped or entry.groupable() is not None:
                    self.own.append(f"{path}.{name}".lstrip("."))
                    continue
                pending[entry.key(block_backend.name)].append((block_backend, entry))
            d["_atlas_backend"] = backend if backend is not None else ops.get("torch")
            d["_atlas_own"] = frozenset(own)
            d["_atlas_fused_max_m"] = self.fused_max_m
            d["_atlas_plan"] = self
            d["_atlas_slots"] = slots
        slot = 0
        for _, items in pending.items():
            group = BlockGroup(items[0][0], [e for _, e in items])
            for e in group.entries:
                e.owner.__dict__["_atlas_slots"][e.name] = slot
                slot += 1
            self.groups.append(group)
        self._record()
        self.stale = False
        config = self.root.__dict__.get(CONFIG_ATTR)
        if config is not None:
            ran = "+".join(sorted(set(self.backends.values()))) or "torch"
            object.__setattr__(self.root, CONFIG_ATTR, dataclasses.replace(config, resolved_backend=ran))
        return self

    def _record(self):
        """What :meth:`_valid` checks before each grouped compose."""
        ids, ptrs, thetas = [], [], []
        for g in self.groups:
            for e in g.entries:
                b, p = e.owner._buffers, e.owner._parameters
                ids += [(b, e.name, e.theta0), (b, e.name + "_tau", e.tau), (p, e.name + "_coef", e.coef)]
                ptrs.append((e.coef, e.coef.data_ptr()))
                thetas.append(e.theta0)
        self._ids, self._ptrs, self._theta0s = ids, ptrs, thetas

    def _valid(self) -> bool:
        return (all(d.get(k) is t for d, k, t in self._ids)
                and all(t.data_ptr() == p for t, p in self._ptrs))

    # ------------------------------------------------------------------ hooks on the patched root
    def attach(self) -> None:
        root = self.root
        object.__setattr__(root, PLAN_ATTR, self)
        root.register_forward_pre_hook(self._begin)
        root.register_forward_hook(self._end, always_call=True)
        root.register_load_state_dict_post_hook(self._loaded)

    def detach(self) -> None:
        """Remove the hooks (found by identity: handles would point at the wrong module after a
        ``copy.deepcopy``) and the plan's attributes on the modules."""
        root = self.root
        for hooks in (root._forward_pre_hooks, root._forward_hooks, root._load_state_dict_post_hooks):
            for key, fn in list(hooks.items()):
                if getattr(fn, "__self__", None) is self:
                    del hooks[key]
                    for extra in ("_forward_hooks_always_called", "_forward_hooks_with_kwargs",
                                  "_forward_pre_hooks_with_kwargs"):
                        getattr(root, extra, {}).pop(key, None)
        root.__dict__.pop(PLAN_ATTR, None)
        for _, m in self.owners():
            m.__dict__["_atlas_plan"] = None
            m.__dict__["_atlas_slots"] = {}
        self.values = None

    def _loaded(self, module, incompatible_keys):
        self.stale = True
        self.values = None

    def _begin(self, module, args):
        if torch.compiler.is_compiling():
            return None
        if self.depth == 0:
            self.values = None
            if self.groups or self.stale:
                if self.stale or not self._valid():
                    self.build()
                if self.groups:
                    self._compose()
        self.depth += 1
        return None

    def _end(self, module, args, output):
        if torch.compiler.is_compiling():
            return None
        self.depth = max(self.depth - 1, 0)
        return None

    def _compose(self) -> None:
        values = []
        for g in self.groups:
            dev = g.device.type
            dt = g.entries[0].theta0.dtype
            lin = torch.get_autocast_dtype(dev) if dev in ("cuda", "cpu") and torch.is_autocast_enabled(dev) else dt
            values.extend(GroupCompose.apply(g, (lin, dt), *g.coefs))
        self._modes = (torch.is_grad_enabled(), torch.is_inference_mode_enabled())
        versions = [_version(t) for t, _ in self._ptrs] + [_version(t) for t in self._theta0s]
        self._versions = None if None in versions else versions
        self.values = values

    # ------------------------------------------------------------------ reads
    def value(self, owner: nn.Module, name: str, dtype: torch.dtype) -> Optional[torch.Tensor]:
        """The grouped value of ``owner``'s block ``name`` in ``dtype``, or None when the caller must
        compose it (see the module docstring for when a value is served)."""
        values = self.values
        if values is None or torch.compiler.is_compiling():
            return None
        slot = owner.__dict__["_atlas_slots"].get(name)
        if slot is None:
            return None
        v = values[slot]
        if v.dtype != dtype:
            return None
        if self.depth > 0:
            return v
        # outside a forward of the root: only what is unchanged since it was composed
        if self._versions is None or self._modes != (torch.is_grad_enabled(), torch.is_inference_mode_enabled()):
            return None
        n = len(self._ptrs)
        coef, theta0 = self._ptrs[slot][0], self._theta0s[slot]
        if _version(coef) != self._versions[slot] or _version(theta0) != self._versions[n + slot]:
            return None
        return v

    # ------------------------------------------------------------------ copies and words
    def __deepcopy__(self, memo):
        new = copy.copy(self)
        memo[id(self)] = new
        new.root = copy.deepcopy(self.root, memo)
        new.groups, new.values, new._ids, new._ptrs, new._theta0s = [], None, [], [], []
        new.stale, new.depth = True, 0
        return new

    def summary(self) -> str:
        n_grouped = sum(len(g) for g in self.groups)
        ran = ", ".join(f"{d}: {b}" for d, b in sorted(self.backends.items())) or "none"
        return (f"backend {self.backend!r} -> {ran}; {n_grouped} block(s) in {len(self.groups)} group(s), "
                f"{len(self.own)} on their own op(s)")
