"""Thin modules that hold frozen ``theta0``, a block's task-vector slab and its coefficients.

Every adapted block ``b`` of a module is stored as:

- ``<b>``: the frozen pre-trained value ``theta0`` (a persistent buffer, so state-dict keys stay
  where users expect them; reading the attribute ``module.<b>`` gives the composed value, and
  ``module._theta0("<b>")`` the frozen one);
- ``<b>_tau``: the ``[N, *shape]`` slab (a non-persistent buffer: task vectors are not copied into
  model checkpoints; ``<b>_scale`` beside it for int8/fp8 storage);
- ``<b>_coef``: the trainable coefficients, an ``nn.Parameter`` of shape ``(N,)`` or ``(N, K)``.

A block a task-vector set does not name is kept as a frozen buffer at ``theta0`` and has no
coefficients.

- :class:`AtlasLinear` replaces ``nn.Linear`` (its matmul and coefficient gradient are fused ops).
- :class:`AtlasMultiheadAttention` replaces ``nn.MultiheadAttention`` (in-projection and
  out-projection through the same fused linear op, attention through
  ``F.scaled_dot_product_attention``).
- :class:`AtlasParameter` is the generic path for every other block (LayerNorm weights and biases,
  the patch-embedding convolution, class and positional embeddings, the final projection, and any
  parameter of any module): a ``torch.nn.utils.parametrize`` parametrization whose value is the
  composed block, so the owning module's own ``forward`` runs unchanged.
- :class:`~atlas_kernels.grouping.SmallBlockGroup` (its own file, :mod:`atlas_kernels.grouping`)
  composes the small dense :class:`AtlasParameter` blocks of a patched module together, in one
  ``compose_packed`` launch per forward of that module (Triton backend, or the compiled extension).

Which path a block takes, and why every read of it sees the composed value:

- ``nn.Linear`` (plain forward) and ``nn.MultiheadAttention`` (packed in-projection) are swapped
  for :class:`AtlasLinear` / :class:`AtlasMultiheadAttention`, whose own ``forward`` runs the fused
  ops (no composed weight, or no weight-sized gradient, in memory). Code that reads their
  parameters *without* calling them (open_clip's ``AttentionPool2d`` in the RN50/RN101 towers
  hands ``q_proj.weight`` ... ``c_proj.bias`` to ``F.multi_head_attention_forward``; custom heads)
  gets the composed value too: each block is a class attribute that composes on read
  (differentiable in the coefficients), while the state-dict key keeps holding ``theta0``.
- Everything else (and a tied parameter, which has several owners) is a parametrization: the
  owner's attribute is ``theta0 + sum_i lam_i tau_i`` wherever it is read, by construction. A
  tied tensor gets one shared :class:`AtlasParameter` on every owner: one set of coefficients, one
  value for every user.

Modules only hold state and call :mod:`atlas_kernels.ops`; patching lives in
:mod:`atlas_kernels.patching`.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

from . import ops
from .blocks import Block, BlockSpec
from .partitions import Partition

__all__ = ["AtlasModule", "AtlasLinear", "AtlasMultiheadAttention", "AtlasParameter", "BlockSpec",
           "SMALL_BLOCK_NUMEL"]

# AtlasParameter blocks of at most this many elements are composed together by a SmallBlockGroup
# (one compose_packed launch per forward instead of one compose launch each). 1 << 17 (131,072)
# takes every LayerNorm weight/bias, class and positional embedding of a ViT-B/L (the largest,
# ViT-L/14's positional embedding, is 257 x 1024 = 263k: not grouped; ViT-B/32's 50 x 768 is), and
# leaves the large blocks (patch-embedding convolution, final projection) to their own launch,
# where one launch per block is cheap next to the bytes they move. The group keeps a packed copy of
# its blocks' task vectors, so this bound also bounds the duplicated memory per block.
SMALL_BLOCK_NUMEL = 1 << 17

# Backends with a packed (one call for many small blocks) compose: SmallBlockGroup uses them.
PACKED_BACKENDS = ops.PACKED_BACKENDS


def _block_compose(theta0, owner, prefix, partition, dtype, backend):
    """Compose one block registered by :meth:`BlockSpec.register` (differentiable in its coef)."""
    return ops.compose(Block.read(owner, prefix, theta0, partition), dtype, backend=backend)


# Tensors a dtype conversion of the model must not touch: coefficients stay float32 (AdamW on
# fp16 coefficients turns them into NaN, bf16 rounds small updates away), and the task vectors
# keep their storage dtype with its float32 scales (an fp16 copy of a bf16 slab can overflow).
_KEEP_DTYPE = ("coef", "tau", "scale", "lora_a", "lora_b", "index", "tau_flat", "scale_flat")


def _apply_keeping(module: nn.Module, names, fn, recurse: bool):
    """``nn.Module._apply`` in which the tensors ``names`` follow device moves but keep their
    dtype (``model.half()``, ``.to(torch.bfloat16)``); everything else (theta0) converts."""
    keep = set()
    for n in names:
        t = module._parameters.get(n)
        if t is None:
            t = module._buffers.get(n)
        if t is not None:
            keep.add(id(t))

    def fn_keep(t):
        out = fn(t)
        if id(t) in keep and out.dtype != t.dtype:
            out = t.to(device=out.device)
        return out

    return nn.Module._apply(module, fn_keep, recurse)


def _check_frozen(theta0: torch.Tensor, block) -> None:
    if theta0.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(
            f"the frozen pre-trained value (theta0, shape {tuple(theta0.shape)}) of a parametrized block with "
            f"coefficients {tuple(block.coef.shape)} requires grad (after model.requires_grad_(True)?); "
            f"atlas_kernels trains only the coefficients, and theta0 would get no gradient. Freeze it again with "
            f"model.requires_grad_(False), then enable the coefficients: "
            f"for p in atlas_kernels.coefficients(model).values(): p.requires_grad_(True)")


@torch.no_grad()
def _block_merged(theta0, owner, prefix, partition, what):
    coef = getattr(owner, prefix + "coef")
    if not torch.isfinite(coef).all():
        raise ValueError(f"coefficients of block {what!r} hold NaN or inf; refusing to merge them")
    block = Block.read(owner, prefix, theta0, partition)
    if block.lora is not None:
        return ops.lora_compose(block, theta0.dtype)
    from .ops import torch_backend

    return torch_backend.compose_values(theta0, block.tau, block.coef, partition, theta0.dtype, block.scale)


class _BlockHolder(nn.Module):
    """Storage and composition of named blocks; shared by :class:`AtlasModule` and
    :class:`AtlasParameter`."""

    def __init__(self, backend: str = "auto"):
        super().__init__()
        self.backend = ops.check_backend(backend)
        self._partitions: Dict[str, Partition] = {}

    def _apply(self, fn, recurse=True):
        names = [n + "_" + s for n in self._partitions for s in _KEEP_DTYPE]
        return _apply_keeping(self, names, fn, recurse)

    def _add_block(self, name: str, theta0: Optional[torch.Tensor], spec: Optional[BlockSpec]):
        if theta0 is None:
            self.register_buffer(name, None)
            return
        self.register_buffer(name, theta0.detach())
        if spec is None:
            return
        spec.register(self, name + "_")
        self._partitions[name] = spec.partition

    def _read_block(self, name: str, dtype: torch.dtype) -> Optional[torch.Tensor]:
        """What a read of the attribute ``name`` from outside the module gives (see
        :class:`_ComposedAttribute`): the composed value here; linearised modules override it."""
        return self.composed(name, dtype)

    def _theta0(self, name: str) -> Optional[torch.Tensor]:
        """The frozen ``theta0`` buffer of block ``name`` (the attribute ``name`` itself reads the
        composed value on :class:`AtlasModule`; see :class:`_ComposedAttribute`)."""
        return self._buffers[name]

    def _block(self, name: str) -> Block:
        """Block ``name`` as the ops take it: ``theta0`` with its slab (or LoRA factors) and the
        coefficients of the task vectors the slab holds (only ``theta0`` when not adapted)."""
        return Block.read(self, name + "_", self._theta0(name), self._partitions.get(name))

    def composed(self, name: str, dtype: torch.dtype) -> Optional[torch.Tensor]:
        """The block's current value in ``dtype`` (differentiable in its coefficients; ``theta0``
        cast for a frozen block, None for an absent one: :func:`atlas_kernels.ops.compose`)."""
        return ops.compose(self._block(name), dtype, backend=self.backend)

    def _linear(self, x: torch.Tensor, wname: str, bname: str) -> torch.Tensor:
        """``x W^T + c`` for blocks ``wname``/``bname`` through the backend's fused linear op (or the
        factored LoRA op)."""
        return ops.linear(x, self._block(wname), self._block(bname), backend=self.backend)

    def adapted_blocks(self) -> Dict[str, nn.Parameter]:
        """Local block name -> its coefficients, for the adapted blocks of this module."""
        return {name: getattr(self, name + "_coef") for name in self._partitions}

    def merged(self, name: str) -> torch.Tensor:
        """``theta0 + sum_i lam_i tau_i`` computed in float32, in theta0's dtype."""
        theta0 = self._theta0(name)
        if name not in self._partitions:
            return theta0.detach().clone()
        return _block_merged(theta0, self, name + "_", self._partitions[name], name)


class _ComposedAttribute:
    """``module.<name>`` on an :class:`AtlasModule` reads the block's composed value
    ``theta0 + sum_i lam_i tau_i`` (in theta0's dtype, differentiable in the coefficients), exactly
    what the original module's attribute would hold with the merged weights.

    Why: code outside the module's own ``forward`` reads parameters directly. open_clip's
    ``AttentionPool2d`` (the RN50/RN101 towers) passes ``q_proj.weight``, ``k_proj.bias``,
    ``c_proj.weight``... straight to ``F.multi_head_attention_forward`` and never calls the
    projections; custom heads do the same. Reading the frozen ``theta0`` there would be a silent
    wrong answer. The module's own ``forward`` does not read the attribute: it hands ``theta0``
    (``_buffers[name]``) and the slab to the fused op. The state-dict key stays ``<name>`` (the
    buffer holds ``theta0``); a direct read composes afresh each time (one compose op per read).
    """

    def __init__(self, name: str):
        self.name = name

    def __get__(self, obj, objtype=None):
        if obj is None:
            return self
        buffers = obj.__dict__.get("_buffers")
        if buffers is None or self.name not in buffers:
            raise AttributeError(self.name)
        theta0 = buffers[self.name]
        return None if theta0 is None else obj._read_block(self.name, theta0.dtype)


class AtlasModule(_BlockHolder):
    """Base of the swapped-in modules. ``_atlas_original`` is the original module, stripped of the
    tensors that moved here, kept (hidden from ``.modules()``) so that ``unpatch`` can hand it back
    with merged parameters and every other attribute, hook and subclass intact.

    Each block in ``block_names`` reads as its composed value (see :class:`_ComposedAttribute`):
    ``atlas_linear.weight`` is ``theta0 + sum_i lam_i tau_i``, wherever it is read; the frozen value
    is ``atlas_linear._theta0("weight")``.
    """

    block_names: tuple = ()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        for name in cls.__dict__.get("block_names", ()):
            setattr(cls, name, _ComposedAttribute(name))

    def _keep_original(self, module: nn.Module):
        object.__setattr__(self, "_atlas_original", module)

    def extra_repr(self) -> str:
        adapted = ", ".join(self._partitions) or "none"
        return f"adapted=[{adapted}], backend={self.backend!r}"


class AtlasLinear(AtlasModule):
    """Drop-in for ``nn.Linear``: ``y = x W^T + c`` with ``W``, ``c`` composed from task vectors.

    Forward and backward are :func:`atlas_kernels.ops.linear`: with the Triton backend the composed
    weight is built tile by tile inside the matmul (small batches) and ``dlam_i = <dy^T x, tau_i>``
    is reduced tile by tile, so no weight-sized gradient exists.
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
            dtype = ops.compute_dtype(q_in)
            # Different inputs: compose the packed in-projection once, then one matmul per slice.
            w = self.composed("in_proj_weight", dtype)
            b = self.composed("in_proj_bias", dtype)
            q, k, v = (F.linear(t.to(dtype), w[i * e:(i + 1) * e], None if b is None else b[i * e:(i + 1) * e])
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


class AtlasParameter(nn.Module):
    """Generic composed block, registered with ``torch.nn.utils.parametrize``: the owning module
    reads ``theta0 + sum_i lam_i tau_i`` wherever it reads the parameter.

    ``parametrize`` keeps ``theta0`` as ``parametrizations.<name>.original`` (frozen); this module
    holds the slab (``tau``), optional ``scale`` and the coefficients (``coef``).
    """

    def __init__(self, spec: BlockSpec, backend: str = "auto"):
        super().__init__()
        self.backend = ops.check_backend(backend)
        spec.register(self, "")
        self.partition = spec.partition

    @classmethod
    def from_module(cls, owner: nn.Module, specs: Dict[str, BlockSpec], backend: str = "auto",
                    shared: Optional[Dict[int, "AtlasParameter"]] = None) -> nn.Module:
        """Parametrize the blocks ``specs`` names on ``owner``, in place. ``shared`` (``id(spec)`` ->
        parametrization, filled as it goes) gives every owner of a tied tensor the same one."""
        shared = {} if shared is None else shared
        for name, spec in specs.items():
            atlas_p = shared.get(id(spec)) or shared.setdefault(id(spec), cls(spec, backend))
            parametrize.register_parametrization(owner, name, atlas_p, unsafe=True)
        return owner

    def _apply(self, fn, recurse=True):
        return _apply_keeping(self, _KEEP_DTYPE, fn, recurse)

    def forward(self, theta0: torch.Tensor) -> torch.Tensor:
        _check_frozen(theta0, self)
        # Grouped (see SmallBlockGroup): this block's view of the group's one packed composition
        # for the current forward of the patched module. Not while torch.compile traces: the
        # group's cache is Python state mutated by hooks, which tracing would bake in or guard on,
        # so compiled code always composes block by block (the custom ops of the Triton backend).
        if not torch.compiler.is_compiling():
            group = self.__dict__.get("_atlas_group")
            if group is not None and ops.resolve(self.backend, theta0.device) in PACKED_BACKENDS:
                value = group.value(self.__dict__["_atlas_slot"], theta0)
                if value is not None:
                    return value
        return _block_compose(theta0, self, "", self.partition, theta0.dtype, self.backend)

    def merged_from(self, theta0: torch.Tensor, what: str = "") -> torch.Tensor:
        return _block_merged(theta0, self, "", self.partition, what)

    def extra_repr(self) -> str:
        return f"coef={tuple(self.coef.shape)}, backend={self.backend!r}"
