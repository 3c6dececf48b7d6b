"""Linearised Atlas modules: one pass computes the primal ``f(x; theta0)`` and the tangent
``J f(x; theta0) . D(lam)`` together, with forward-mode dual tensors
(``torch.autograd.forward_ad``).

- The patched root enters a dual level before its forward and leaves it after: its output is
  ``primal + tangent``, a plain tensor differentiable in the coefficients.
- :class:`LinearisedAtlasParameter` (generic blocks) returns ``make_dual(theta0, D)``: the owning
  module's own ops (LayerNorm, convolution, embeddings, ``x @ proj``) carry the tangent with their
  forward-mode formulas.
- :class:`LinearisedAtlasLinear` unpacks ``(x0, x_t)`` and returns ``make_dual(y0, y_t)`` with
  ``y0 = x0 W0^T + c0`` (no graph) and ``y_t = x_t W0^T + x0 D_W^T + D_c``, the last two terms
  from :func:`~atlas_kernels.linearised.ops.tangent_linear` (no dense weight gradient on the
  Triton path; no ``D`` kept for backward).
- :class:`LinearisedAtlasMultiheadAttention`: the same for the projections, and its own attention
  tangent rule (the fused attention kernels have no forward-mode formula).

The primal activations carry no graph (theta0 is frozen); only the tangent is differentiated.
"""
from __future__ import annotations

import threading

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from ..blocks import Block
from ..modules import AtlasLinear, AtlasMultiheadAttention, AtlasParameter, _merge_masks
from ..ops.lora import lora_delta
from ..ops.torch_backend import acc_dtype
from . import ops as LO

__all__ = ["LinearisedAtlasLinear", "LinearisedAtlasMultiheadAttention", "LinearisedAtlasParameter",
           "linearise", "in_scope"]

_SCOPE = threading.local()


def in_scope() -> bool:
    return getattr(_SCOPE, "depth", 0) > 0


def _outside():
    return RuntimeError("a linearised atlas block has a value only inside a forward of the patched module "
                        "(primal theta0 carrying the tangent D); call the patched module itself, not one "
                        "of its submodules")


def _unpack(t):
    if t is None or not isinstance(t, torch.Tensor):
        return t, None
    p, tan = fwAD.unpack_dual(t)
    return p, tan


def _dual(p, t):
    return p if t is None else fwAD.make_dual(p, t)


def _add(a, b):
    return b if a is None else (a if b is None else a + b)


def block_delta(owner, name: str, dtype, backend):
    """``D = sum_i lam_i tau_i`` of the block ``name`` of ``owner`` (None when it is not adapted)."""
    if name not in owner._atlas_parts:
        return None
    block = owner._atlas_block(name)
    if block.lora is not None:
        with torch.autocast(block.lora[0].device.type, enabled=False):
            acc = acc_dtype(block.lora[0].dtype, block.coef.dtype, dtype)
            return lora_delta(*block.lora, block.coef, block.partition, acc).to(dtype)
    return LO.delta(block, dtype, backend)


def _linearised_read(self, name: str):
    """What ``module.<block>`` reads on a linearised module (the owner's own forward, and code
    outside it such as open_clip's AttentionPool2d reading ``q_proj.weight``): inside a forward of
    the patched root, ``theta0`` carrying the tangent ``D`` (so the reader's ops linearise it);
    outside one, the expansion point ``theta0`` itself. (Linear and attention modules called outside
    a forward of the patched root raise instead of computing a primal without its tangent.)"""
    alias = self._atlas_alias.get(name)
    if alias is not None:
        return alias[0]._atlas_read(alias[1])
    if name not in self._buffers:
        raise AttributeError(name)
    theta0 = self._buffers[name]
    if theta0 is None or not in_scope():
        return theta0
    d = block_delta(self, name, theta0.dtype, self._atlas_backend)
    return theta0 if d is None else fwAD.make_dual(theta0, d)


class LinearisedAtlasParameter(AtlasParameter):
    """The generic path of a linearised model: a block reads ``theta0`` carrying the tangent ``D``
    inside a forward of the patched root, ``theta0`` outside one (:func:`_linearised_read`)."""

    _atlas_read = _linearised_read


def _pair_linear(self, x0, xt, wname: str, bname: str):
    """``(y0, y_t)`` of the linear map with blocks ``wname``/``bname`` of ``self``."""
    dtype = ops.compute_dtype(x0)
    x0 = x0.to(dtype)
    w0 = self._theta0(wname)  # the frozen theta0 (the attribute reads a composed value)
    b0 = self._theta0(bname) if bname else None
    backend = self._atlas_backend
    y0 = LO.frozen_linear(x0, w0, b0)
    yt = None if xt is None else F.linear(xt.to(dtype), w0.to(dtype))
    w = self._block(wname)
    b = self._block(bname) if bname else Block(None)
    b_adapted = b.theta0 is not None and b.adapted
    if w.tau is not None and b.lora is None:  # dense weight (and a dense or frozen bias): one fused op
        return y0, _add(yt, LO.tangent_linear(x0, w, b, backend=backend, fused_max_m=self._atlas_fused_max_m))
    if w.adapted:  # LoRA weight: factored or composed by autograd (never densified per vector)
        yt = _add(yt, F.linear(x0, block_delta(self, wname, dtype, backend)))
    if b_adapted:
        yt = _add(yt, block_delta(self, bname, dtype, backend))
    return y0, yt


class LinearisedAtlasLinear(AtlasLinear):
    """``AtlasLinear`` of a linearised model: ``(x0, x_t) -> (x0 W0^T + c0, x_t W0^T + x0 D_W^T + D_c)``."""

    _atlas_read = _linearised_read
    _read_block = _linearised_read

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not in_scope():
            raise _outside()
        x0, xt = _unpack(x)
        return _dual(*_pair_linear(self, x0, xt, "weight", "bias"))


class LinearisedAtlasMultiheadAttention(AtlasMultiheadAttention):
    """``AtlasMultiheadAttention`` of a linearised model (primal and tangent of the projections and of
    attention, see :func:`~atlas_kernels.linearised.ops.attention_tangent`)."""

    _atlas_read = _linearised_read
    _read_block = _linearised_read

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if not in_scope():
            raise _outside()
        same = query is key and key is value
        ins = [_unpack(t) for t in (query, key, value)]
        if not self.batch_first:
            ins = [(p.transpose(0, 1), None if t is None else t.transpose(0, 1)) for p, t in ins]
        (q0, qt), (k0, kt), (v0, vt) = ins
        bsz, tgt_len, e = q0.shape
        src_len = k0.shape[1]
        if same:
            y0, yt = _pair_linear(self, q0, qt, "in_proj_weight", "in_proj_bias")
            q, k, v = y0.chunk(3, dim=-1)
            qt, kt, vt = (None, None, None) if yt is None else yt.chunk(3, dim=-1)
        else:
            q, k, v, qt, kt, vt = self._cross_projections(ins, e)
        h, d = self.num_heads, self.head_dim

        def heads(t, n):
            return None if t is None else t.reshape(bsz, n, h, d).transpose(1, 2)

        q, qt = heads(q, tgt_len), heads(qt, tgt_len)
        k, kt, v, vt = heads(k, src_len), heads(kt, src_len), heads(v, src_len), heads(vt, src_len)
        mask = _merge_masks(_unpack(attn_mask)[0], _unpack(key_padding_mask)[0], bsz, h, tgt_len, src_len,
                            q.dtype)
        if mask is None and is_causal:
            causal = torch.ones(tgt_len, src_len, dtype=torch.bool, device=q.device).triu(1)
            mask = torch.zeros(tgt_len, src_len, dtype=q.dtype, device=q.device).masked_fill(causal, float("-inf"))
        dropout = self.dropout if self.training else 0.0
        out, ot, w, wt = LO.attention_tangent(q, k, v, qt, kt, vt, mask, dropout, need_weights)
        out = out.transpose(1, 2).reshape(bsz, tgt_len, e)
        ot = None if ot is None else ot.transpose(1, 2).reshape(bsz, tgt_len, e)
        out = self.out_proj(_dual(out, ot))
        if not self.batch_first:
            out = out.transpose(0, 1)
        weights = None
        if need_weights:
            if average_attn_weights:
                w, wt = w.mean(dim=1), None if wt is None else wt.mean(dim=1)
            weights = _dual(w, wt)
        return out, weights

    def _cross_projections(self, ins, e):
        """Different query/key/value: compose the in-projection displacement once, then one matmul
        per slice (as the standard module does)."""
        dtype = ops.compute_dtype(ins[0][0])
        w0 = self._theta0("in_proj_weight").to(dtype)
        b0 = self._theta0("in_proj_bias")
        b0 = None if b0 is None else b0.to(dtype)
        d_w = block_delta(self, "in_proj_weight", dtype, self._atlas_backend)
        d_b = block_delta(self, "in_proj_bias", dtype, self._atlas_backend) if b0 is not None else None
        prim, tans = [], []
        for i, (p, t) in enumerate(ins):
            sl = slice(i * e, (i + 1) * e)
            p = p.to(dtype)
            prim.append(LO.frozen_linear(p, w0[sl], None if b0 is None else b0[sl]))
            tan = None if t is None else F.linear(t.to(dtype), w0[sl])
            if d_w is not None:
                tan = _add(tan, F.linear(p, d_w[sl]))
            if d_b is not None:
                tan = _add(tan, d_b[sl])
            tans.append(tan)
        return (*prim, *tans)


_CLASSES = {AtlasLinear: LinearisedAtlasLinear, AtlasMultiheadAttention: LinearisedAtlasMultiheadAttention}


class _DualScope:
    """Hooks on the patched root: enter a dual level before its forward; after it, leave the level
    and hand back ``primal + tangent`` for every tensor of the output."""

    def __init__(self):
        self.levels = []
        self.math_attention = []

    def _enter_math_attention(self):
        # Code of the tower that calls scaled_dot_product_attention itself (open_clip's
        # AttentionPool2d through F.multi_head_attention_forward) meets dual tensors; the fused SDPA
        # kernels have no forward-mode formula, the math path has one.
        from torch.nn.attention import SDPBackend, sdpa_kernel

        ctx = sdpa_kernel(SDPBackend.MATH)
        ctx.__enter__()
        self.math_attention.append(ctx)

    def begin(self, module, args):
        if in_scope():
            raise RuntimeError("a linearised patched module was called inside the forward of another one; "
                               "nested linearised models are not supported")
        try:
            self.levels.append(fwAD.enter_dual_level())
        except RuntimeError as exc:
            raise RuntimeError("a linearised patched module runs its own forward-mode pass and cannot run "
                               "inside another forward-mode AD level (torch.autograd.forward_ad / "
                               f"torch.func.jvp): {exc}") from exc
        _SCOPE.depth = 1
        self._enter_math_attention()
        return None

    def end(self, module, args, output):
        if not self.levels:
            return None
        try:
            result = None if output is None else _combine(output)
        finally:
            _SCOPE.depth = 0
            if self.math_attention:
                self.math_attention.pop().__exit__(None, None, None)
            fwAD.exit_dual_level(level=self.levels.pop())
        return result


def _combine(out):
    if isinstance(out, torch.Tensor):
        p, t = fwAD.unpack_dual(out)
        return p if t is None else p + t
    if isinstance(out, tuple) and hasattr(out, "_fields"):
        return type(out)(*(_combine(o) for o in out))
    if isinstance(out, (tuple, list)):
        return type(out)(_combine(o) for o in out)
    if isinstance(out, dict):
        return type(out)((k, _combine(v)) for k, v in out.items())
    return out


def linearise(module: nn.Module) -> None:
    """Turn the Atlas modules of a freshly patched ``module`` into their linearised subclasses (same
    state, the forward above) and install the dual-level hooks on ``module``."""
    from ..modules import _generic_class

    for m in module.modules():
        cls = _CLASSES.get(type(m))
        if cls is not None:
            m.__class__ = cls
        elif isinstance(m, AtlasParameter) and not isinstance(m, LinearisedAtlasParameter):
            m.__class__ = _generic_class(m.__dict__["_atlas_orig_class"], type(m)._atlas_names,
                                         LinearisedAtlasParameter)
    scope = _DualScope()
    module.register_forward_pre_hook(scope.begin)
    module.register_forward_hook(scope.end, always_call=True)
    object.__setattr__(module, "_atlas_dual_scope", scope)
