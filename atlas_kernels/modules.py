"""Thin modules that hold frozen ``theta0``, a block's task-vector slab and its coefficients.

Every adapted block ``b`` of a module is stored as:

- ``<b>``: the frozen pre-trained value ``theta0`` (a persistent buffer, so state-dict keys stay
  where users expect them: ``c_fc.weight``, ``ln_1.weight``); reading the attribute ``module.<b>``
  gives the composed value, and ``module._theta0("<b>")`` the frozen one;
- ``<b>_tau``: the ``[N, *shape]`` slab (a non-persistent buffer: task vectors are not copied into
  model checkpoints; ``<b>_scale`` beside it for int8/fp8 storage, ``<b>_index`` for a ragged block,
  ``<b>_lora_a`` / ``<b>_lora_b`` for LoRA factors);
- ``<b>_coef``: the trainable coefficients, an ``nn.Parameter`` of shape ``(N,)`` or ``(N, K)``.

A block a task-vector set does not name is kept as a frozen buffer at ``theta0`` and has no
coefficients.

- :class:`AtlasLinear` replaces ``nn.Linear``; :class:`AtlasMultiheadAttention` replaces
  ``nn.MultiheadAttention`` (in-projection and out-projection through the same linear path,
  attention through ``F.scaled_dot_product_attention``).
- :class:`AtlasParameter` is the generic path for every other block (LayerNorm weights and biases,
  the patch-embedding convolution, class and positional embeddings, the final projection, and any
  parameter of any module): the owner keeps its own class's ``forward``, its class is swapped for
  one subclass per original class (``AtlasLayerNorm`` for every LayerNorm: no class per block, so
  ``torch.compile`` traces them all with one set of guards) whose block attributes read the
  composed value.

Where a composed value comes from (every read sees ``theta0 + sum_i lam_i tau_i``):

- in an eager forward of the patched root, the root's :class:`~atlas_kernels.plan.Plan` composes
  every grouped block at once before the forward body runs (:class:`~atlas_kernels.ops.group.GroupCompose`),
  and each module reads its view (``plan.value``);
- otherwise (under ``torch.compile``, a submodule called on its own, a block outside any group, a
  read after ``optimizer.step()``) the module composes the block itself through its backend's
  per-block op.

Modules only hold state and call :mod:`atlas_kernels.ops`; patching lives in
:mod:`atlas_kernels.patching`, the plan in :mod:`atlas_kernels.plan`.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops
from ._launches import region
from .blocks import Block, BlockSpec
from .ops.backend import compute_dtype

__all__ = ["AtlasModule", "AtlasLinear", "AtlasMultiheadAttention", "AtlasParameter", "BlockSpec"]

# Tensors a dtype conversion of the model must not touch: coefficients stay float32 (AdamW on
# fp16 coefficients turns them into NaN, bf16 rounds small updates away), and the task vectors
# keep their storage dtype with its float32 scales (an fp16 copy of a bf16 slab can overflow).
_KEEP_DTYPE = ("coef", "tau", "scale", "lora_a", "lora_b", "index")


def _check_frozen(theta0: torch.Tensor, coef: torch.Tensor) -> None:
    if theta0.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(
            f"the frozen pre-trained value (theta0, shape {tuple(theta0.shape)}) of a block with coefficients "
            f"{tuple(coef.shape)} requires grad; atlas_kernels trains only the coefficients, and theta0 would get "
            f"no gradient. Freeze it again with model.requires_grad_(False), then enable the coefficients: "
            f"for p in atlas_kernels.coefficients(model).values(): p.requires_grad_(True)")


def _composed_property(name: str) -> property:
    """``module.<name>``: the block's composed value, in theta0's dtype (see :meth:`_BlockHolder._atlas_read`)."""
    def fget(self):
        return self._atlas_read(name)

    return property(fget, doc=f"the composed value of block {name!r}: theta0 + sum_i lam_i tau_i")


# Every name the mixin adds to a generic owner's class starts with "_atlas_" (and _apply, which it
# extends): a user's module may have methods called `merged` or `composed`, which must not be shadowed.


class _BlockHolder:
    """Storage and composition of named blocks: mixed into :class:`AtlasModule` and the generic
    owners (:class:`AtlasParameter`). Per-instance state lives in ``__dict__`` (plain attributes, not
    module state): ``_atlas_parts`` (adapted block -> partition), ``_atlas_backend`` (the backend
    object of its own ops), ``_atlas_plan`` and ``_atlas_slots`` (set by the plan: where the
    grouped values are), ``_atlas_own`` (linear weights that run the backend's own linear op),
    ``_atlas_alias`` (tied blocks read from another owner)."""

    def _atlas_setup(self, backend: str) -> None:
        d = self.__dict__
        d["_atlas_parts"] = {}
        d["_atlas_backend_name"] = ops.check_backend(backend)
        d["_atlas_backend"] = ops.get("torch")  # until the plan resolves it
        d["_atlas_plan"] = None
        d["_atlas_slots"] = {}
        d["_atlas_own"] = frozenset()
        d["_atlas_fused_max_m"] = None
        d["_atlas_alias"] = {}

    def _apply(self, fn, recurse=True):
        """``nn.Module._apply`` (``.to()``, ``.half()``, ``.cuda()``) in which coefficients, slabs and
        scales follow device moves but keep their dtype; theta0 converts. The plan is redone."""
        keep = set()
        for n in self._atlas_parts:
            for s in _KEEP_DTYPE:
                t = self._parameters.get(n + "_" + s)
                if t is None:
                    t = self._buffers.get(n + "_" + s)
                if t is not None:
                    keep.add(id(t))

        def fn_keep(t):
            out = fn(t)
            if id(t) in keep and out.dtype != t.dtype:
                out = t.to(device=out.device)
            return out

        out = super()._apply(fn_keep, recurse)
        plan = self.__dict__.get("_atlas_plan")
        if plan is not None:
            plan.stale = True
        return out

    def _atlas_add_block(self, name: str, theta0: Optional[torch.Tensor], spec: Optional[BlockSpec]):
        if theta0 is None:
            self.register_buffer(name, None)
            return
        self.register_buffer(name, theta0.detach().contiguous())
        if spec is None:
            return
        spec.register(self, name + "_")
        self._atlas_parts[name] = spec.partition

    def _atlas_theta0(self, name: str) -> Optional[torch.Tensor]:
        """The frozen ``theta0`` buffer of block ``name`` (the attribute reads the composed value)."""
        return self._buffers[name]

    def _atlas_block(self, name: str) -> Block:
        """Block ``name`` as the ops take it: ``theta0`` with its slab (or LoRA factors) and the
        coefficients of the task vectors the slab holds (only ``theta0`` when not adapted)."""
        return Block.read(self, name + "_", self._buffers[name], self._atlas_parts.get(name))

    def _atlas_value(self, name: str, dtype: torch.dtype) -> Optional[torch.Tensor]:
        """Block ``name``'s value in ``dtype`` for a computation: the plan's grouped view when it has
        a valid one, else composed here (differentiable in the coefficients either way); ``theta0``
        cast for a frozen block, None for an absent one."""
        alias = self._atlas_alias.get(name)
        if alias is not None:
            owner, other = alias
            return owner._atlas_value(other, dtype)
        theta0 = self._buffers[name]
        if theta0 is None:
            return None
        if name not in self._atlas_parts:
            return theta0 if theta0.dtype == dtype else theta0.to(dtype)
        plan = self._atlas_plan
        if plan is not None:
            v = plan.value(self, name, dtype)
            if v is not None:
                return v
        _check_frozen(theta0, self._parameters[name + "_coef"])
        return ops.compose(self._atlas_block(name), dtype, self._atlas_backend)

    def _atlas_read(self, name: str) -> Optional[torch.Tensor]:
        """What a read of the attribute ``name`` gives: the composed value in theta0's dtype (code
        outside the module's own forward reads parameters directly: open_clip's
        ``AttentionPool2d`` hands ``q_proj.weight`` to ``F.multi_head_attention_forward``; reading
        theta0 there would be a silent wrong answer). Linearised modules override it."""
        alias = self._atlas_alias.get(name)
        if alias is not None:
            theta0 = alias[0]._buffers[alias[1]]
        elif name in self._buffers:
            theta0 = self._buffers[name]
        else:  # not registered yet (register_buffer asks hasattr first)
            raise AttributeError(name)
        return None if theta0 is None else self._atlas_value(name, theta0.dtype)

    def _atlas_adapted(self) -> Dict[str, nn.Parameter]:
        """Local block name -> its coefficients, for the adapted blocks of this module."""
        return {name: self._parameters[name + "_coef"] for name in self._atlas_parts}

    @torch.no_grad()
    def _atlas_merged(self, name: str) -> torch.Tensor:
        """``theta0 + sum_i lam_i tau_i`` computed in float32 (float64 for float64 blocks), in theta0's
        dtype; refuses non-finite coefficients."""
        override = self.__dict__.get("_atlas_merged_override")
        if override is not None and name in override:  # a sharded block, merged and all-gathered by its plan
            return override.pop(name)
        theta0 = self._buffers[name]
        if name not in self._atlas_parts:
            return theta0.detach().clone()
        coef = self._parameters[name + "_coef"]
        if not torch.isfinite(coef).all():
            raise ValueError(f"coefficients of block {name!r} hold NaN or inf; refusing to merge them")
        block = self._atlas_block(name)
        if block.lora is not None:
            return ops.lora_compose(block, theta0.dtype)
        from .ops.torch_backend import compose_values

        return compose_values(theta0, block.tau, block.coef, block.partition, theta0.dtype, block.scale)


class AtlasModule(_BlockHolder, nn.Module):
    """Base of the swapped-in modules. ``_atlas_original`` is the original module, stripped of the
    tensors that moved here, kept (hidden from ``.modules()``) so that ``unpatch`` can hand it back
    with merged parameters and every other attribute, hook and subclass intact.

    Each block in ``block_names`` reads as its composed value: ``atlas_linear.weight`` is
    ``theta0 + sum_i lam_i tau_i``, wherever it is read; the frozen value is
    ``atlas_linear._theta0("weight")``.
    """

    block_names: tuple = ()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        for name in cls.__dict__.get("block_names", ()):
            setattr(cls, name, _composed_property(name))

    def __init__(self, backend: str = "auto"):
        nn.Module.__init__(self)
        self._atlas_setup(backend)

    # Our own classes: the friendly names of the mixin's methods.
    _add_block = _BlockHolder._atlas_add_block
    _theta0 = _BlockHolder._atlas_theta0
    _block = _BlockHolder._atlas_block
    _read_block = _BlockHolder._atlas_read
    adapted_blocks = _BlockHolder._atlas_adapted
    merged = _BlockHolder._atlas_merged

    def composed(self, name: str, dtype: torch.dtype) -> Optional[torch.Tensor]:
        """The block's current value in ``dtype`` (differentiable in its coefficients; ``theta0``
        cast for a frozen block, None for an absent one)."""
        return self._atlas_value(name, dtype)

    @property
    def backend(self) -> str:
        """The backend this module was patched with (``"auto"``, ``"torch"``, ...); the one that runs
        is ``self._atlas_backend.name`` (resolved by the plan)."""
        return self._atlas_backend_name

    def _keep_original(self, module: nn.Module):
        object.__setattr__(self, "_atlas_original", module)

    def _linear(self, x: torch.Tensor, wname: str, bname: str) -> torch.Tensor:
        """``x W^T + c`` for blocks ``wname``/``bname``: ``F.linear`` on their values (grouped views in
        an eager forward), or the backend's own linear op for a weight that takes it (LoRA factors;
        the fused linear, see :class:`~atlas_kernels.patch_config.PatchConfig` ``fused_linear``)."""
        if wname in self._atlas_own:
            dtype = compute_dtype(x)
            block = self._atlas_block(wname)
            _check_frozen(block.theta0, block.coef)
            bias = self._atlas_value(bname, dtype)
            with region():
                if block.lora is not None:
                    return ops.lora_linear(x, block, bias)
                y = self._atlas_backend.linear(x, block, **self._atlas_linear_kw)
                return y if bias is None else y + bias
        dtype = compute_dtype(x)
        return F.linear(x, self._atlas_value(wname, dtype), self._atlas_value(bname, dtype))

    @property
    def _atlas_linear_kw(self) -> dict:
        m = self._atlas_fused_max_m
        return {} if m is None or self._atlas_backend.name != "triton" else {"fused_max_m": m}

    def extra_repr(self) -> str:
        adapted = ", ".join(self._atlas_parts) or "none"
        return f"adapted=[{adapted}], backend={self._atlas_backend.name!r}"


class AtlasLinear(AtlasModule):
    """Drop-in for ``nn.Linear``: ``y = x W^T + c`` with ``W``, ``c`` composed from task vectors.

    In an eager forward of the patched root, ``W`` and ``c`` are views of the plan's grouped
    compose and ``F.linear`` (cuBLAS) runs as in the plain model; the plain model's own weight
    gradient ``G = dy^T x`` flows back into the grouped coefficient-gradient pass. A weight that runs
    its backend's own op (``fused_linear``) never exists in memory on the fused paths.
    """

    block_names = ("weight", "bias")

    def __init__(self, linear: nn.Linear, specs: Dict[str, BlockSpec], backend: str = "auto"):
        super().__init__(backend)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        for name in self.block_names:
            self._add_block(name, getattr(linear, name), specs.get(name))
        self._keep_original(linear)

    @staticmethod
    def supports(module: nn.Module) -> bool:
        """An ``nn.Linear`` running ``nn.Linear.forward`` (a subclass with its own forward is not)."""
        return isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward

    @classmethod
    def from_module(cls, linear: nn.Linear, specs: Dict[str, BlockSpec], backend: str = "auto") -> "AtlasLinear":
        """What replaces ``linear`` (torchao's ``from_float``); ``specs``: local block name -> spec."""
        return cls(linear, specs, backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._linear(x, "weight", "bias")


class AtlasMultiheadAttention(AtlasModule):
    """Drop-in for ``nn.MultiheadAttention`` (packed in-projection, no ``bias_k``/``bias_v``, no
    ``add_zero_attn``; other configurations are patched through :class:`AtlasParameter` instead).

    Self-attention runs the in-projection as one composed linear op over ``[3E, E]``; the output
    projection is an :class:`AtlasLinear` child named ``out_proj`` (as in the original).
    """

    block_names = ("in_proj_weight", "in_proj_bias")

    def __init__(self, mha: nn.MultiheadAttention, specs: Dict[str, BlockSpec],
                 out_proj_specs: Dict[str, BlockSpec], backend: str = "auto"):
        super().__init__(backend)
        if not self.supports(mha):
            raise ValueError("AtlasMultiheadAttention needs a packed in-projection and no bias_k/bias_v")
        for attr in ("embed_dim", "num_heads", "dropout", "batch_first", "head_dim"):
            setattr(self, attr, getattr(mha, attr))
        for name in self.block_names:
            self._add_block(name, getattr(mha, name), specs.get(name))
        self.out_proj = AtlasLinear(mha.out_proj, out_proj_specs, backend)
        self._keep_original(mha)

    @staticmethod
    def supports(mha: nn.Module) -> bool:
        return (isinstance(mha, nn.MultiheadAttention) and mha._qkv_same_embed_dim
                and mha.in_proj_weight is not None and mha.bias_k is None and mha.bias_v is None
                and not mha.add_zero_attn and type(mha.out_proj).forward is nn.Linear.forward)

    @classmethod
    def from_module(cls, mha: nn.MultiheadAttention, specs: Dict[str, BlockSpec],
                    backend: str = "auto") -> "AtlasMultiheadAttention":
        """What replaces ``mha``; ``specs`` names its blocks and its ``out_proj.weight``/``.bias``."""
        own = {k: s for k, s in specs.items() if not k.startswith("out_proj.")}
        out = {k[len("out_proj."):]: s for k, s in specs.items() if k.startswith("out_proj.")}
        return cls(mha, own, out, backend)

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if self.batch_first:
            q_in, k_in, v_in = query, key, value
        else:
            q_in, k_in, v_in = (t.transpose(0, 1) for t in (query, key, value))
        bsz, tgt_len, e = q_in.shape
        src_len = k_in.shape[1]
        if query is key and key is value:
            q, k, v = self._linear(q_in, "in_proj_weight", "in_proj_bias").chunk(3, dim=-1)
        else:
            dtype = compute_dtype(q_in)
            # Different inputs: compose the packed in-projection once, then one matmul per slice.
            w = self.composed("in_proj_weight", dtype)
            b = self.composed("in_proj_bias", dtype)
            q, k, v = (F.linear(t, w[i * e:(i + 1) * e], None if b is None else b[i * e:(i + 1) * e])
                       for i, t in enumerate((q_in, k_in, v_in)))
        h, d = self.num_heads, self.head_dim
        q = q.reshape(bsz, tgt_len, h, d).transpose(1, 2)
        k = k.reshape(bsz, src_len, h, d).transpose(1, 2)
        v = v.reshape(bsz, src_len, h, d).transpose(1, 2)
        mask = _merge_masks(attn_mask, key_padding_mask, bsz, h, tgt_len, src_len, q.dtype)
        dropout = self.dropout if self.training else 0.0
        if need_weights:
            scores = (q * d ** -0.5) @ k.transpose(-2, -1)
            if mask is not None:
                scores = scores + mask
            elif is_causal:
                causal = torch.ones(tgt_len, src_len, dtype=torch.bool, device=q.device).triu(1)
                scores = scores.masked_fill(causal, float("-inf"))
            weights = scores.softmax(-1)
            out = F.dropout(weights, dropout, self.training) @ v
        else:
            weights = None
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                                 is_causal=is_causal and mask is None)
        out = out.transpose(1, 2).reshape(bsz, tgt_len, e)
        out = self.out_proj(out)
        if not self.batch_first:
            out = out.transpose(0, 1)
        if weights is not None and average_attn_weights:
            weights = weights.mean(dim=1)
        return out, weights


def _merge_masks(attn_mask, key_padding_mask, bsz, h, tgt, src, dtype):
    """``nn.MultiheadAttention``'s masks (bool True = masked out, or additive float) as one additive
    float mask broadcastable to ``[bsz, h, tgt, src]``, or None."""
    mask = None
    if attn_mask is not None:
        m = attn_mask
        if m.dtype == torch.bool:
            m = torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(m, float("-inf"))
        m = m.to(dtype)
        mask = m.reshape(bsz, h, tgt, src) if m.dim() == 3 else m
    if key_padding_mask is not None:
        kp = key_padding_mask
        if kp.dtype == torch.bool:
            kp = torch.zeros(kp.shape, dtype=dtype, device=kp.device).masked_fill(kp, float("-inf"))
        kp = kp.to(dtype).reshape(bsz, 1, 1, src)
        mask = kp if mask is None else mask + kp
    return mask


class AtlasParameter(_BlockHolder):
    """The generic path: every adapted parameter of a module that is neither a linear layer nor a
    packed multi-head attention (LayerNorm, convolution, embeddings, raw parameters such as
    ``class_embedding``, ``positional_embedding``, ``proj``, tied weights).

    :meth:`adopt` moves the parameter's tensor into a ``theta0`` buffer of the same name (the state-dict
    key stays ``ln_1.weight``), registers the slab and coefficients beside it (``ln_1.weight_coef``),
    and swaps the owner's class for ``Atlas<Class>``: the original class with this mixin in front and a
    property per adapted name that reads the composed value. One such class per (original class,
    adapted names): every LayerNorm of a tower shares ``AtlasLayerNorm``. The owner's own ``forward``
    runs unchanged. :meth:`release` undoes it (``unpatch``).
    """

    @classmethod
    def adopt(cls, owner: nn.Module, specs: Dict[str, BlockSpec], backend: str = "auto",
              aliases: Optional[Dict[str, tuple]] = None) -> nn.Module:
        """Adapt the blocks ``specs`` names on ``owner`` in place; ``aliases`` (local name ->
        ``(primary owner, name)``) names tied blocks whose value another owner holds."""
        aliases = aliases or {}
        names = tuple(sorted(set(specs) | set(aliases)))
        orig = type(owner)
        if isinstance(owner, _BlockHolder):  # a second call (more names): widen its class
            orig = owner.__dict__["_atlas_orig_class"]
            names = tuple(sorted(set(names) | set(type(owner)._atlas_names)))
        else:
            owner.__dict__["_atlas_orig_class"] = orig
            owner.__dict__["_atlas_orig_params"] = {}
            _BlockHolder._atlas_setup(owner, backend)
        for name in specs:
            p = owner._parameters.pop(name)
            owner.__dict__["_atlas_orig_params"][name] = p
        for name, (primary, pname) in aliases.items():
            p = owner._parameters.pop(name, None)
            owner.__dict__["_atlas_orig_params"][name] = p
            owner._atlas_alias[name] = (primary, pname)
            # the same tensor under both keys, as in the plain model's state dict
            owner._buffers[name] = primary._buffers[pname]
        owner.__class__ = _generic_class(orig, names, cls)
        for name, spec in specs.items():
            owner._atlas_add_block(name, owner.__dict__["_atlas_orig_params"][name], spec)
        return owner

    @staticmethod
    def release(owner: nn.Module) -> Dict[str, Optional[nn.Parameter]]:
        """Undo :meth:`adopt`: the owner's original class back, and its blocks' buffers, slabs and
        coefficients removed. Returns the original parameters by name (to receive merged values)."""
        names = type(owner)._atlas_names
        for name in names:
            owner._buffers.pop(name, None)
            for s in _KEEP_DTYPE:
                owner._buffers.pop(f"{name}_{s}", None)
                owner._parameters.pop(f"{name}_{s}", None)
        owner.__class__ = owner.__dict__.pop("_atlas_orig_class")
        for k in ("_atlas_parts", "_atlas_backend_name", "_atlas_backend", "_atlas_plan", "_atlas_slots", "_atlas_own",
                  "_atlas_fused_max_m", "_atlas_alias", "_atlas_shard", "_atlas_merged_override"):
            owner.__dict__.pop(k, None)
        return owner.__dict__.pop("_atlas_orig_params")

    def extra_repr(self) -> str:
        base = super().extra_repr()
        adapted = ", ".join(self._atlas_parts) or "tied"
        return (base + ", " if base else "") + f"atlas=[{adapted}]"


_CLASSES: Dict[tuple, type] = {}


def _generic_class(orig: type, names: tuple, mixin: type) -> type:
    """``Atlas<orig>``: ``mixin`` in front of ``orig``, a composed-value property per name. Cached
    per ``(orig, names, mixin)``, so that every module of one kind shares one class."""
    key = (orig, names, mixin)
    cls = _CLASSES.get(key)
    if cls is None:
        body = {name: _composed_property(name) for name in names}
        body.update(_atlas_names=names, __module__=orig.__module__, __qualname__="Atlas" + orig.__qualname__)
        cls = type("Atlas" + orig.__name__, (mixin, orig), body)
        _CLASSES[key] = cls
    return cls
