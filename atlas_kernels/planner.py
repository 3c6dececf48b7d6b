"""Predict the peak memory of an aTLAS training step on a patched open_clip ViT image tower.

    est = atlas_kernels.planner.estimate_memory(model.visual, tvs, batch=128, precision="bf16")
    print(est)            # a table in GiB; est.total is the predicted peak in bytes

The model (docs/PERFORMANCE.md, Memory: ``peak ~= activations + theta0 + S + composed + transient``), per
term, in bytes:

``theta0``
    Every parameter and buffer of the tower in its own dtype (the frozen weights; patching moves
    them into buffers without copying).
``task_vectors`` (S)
    ``TaskVectors.nbytes``: slabs, per-row scales, LoRA factors. Or, given ``(N, storage)``,
    N task vectors over every floating parameter of the tower: ``N * numel * bytes`` plus, for
    int8/fp8, ``N * rows * 4`` of scales.
``composed``
    What the step keeps of the composed blocks for backward: each adapted matrix that a matmul or
    convolution consumes (``nn.Linear`` and in-projection weights, the patch-embedding convolution,
    the final ``proj``) in the compute dtype; LayerNorm weights and biases in float32 under CUDA
    autocast (LayerNorm autocasts to float32), else in their own dtype. Biases of linear layers
    and convolutions, and the class and positional embeddings, are consumed by ops that keep
    nothing, so they count 0. With ``recompute=True``: only the largest of those blocks.
``activations``
    Tensors saved for backward, counted as unique storages, for ``batch`` images of ``tokens``
    tokens of width ``W`` (MLP width ``F``, ``h`` heads, compute dtype of ``c`` bytes, LayerNorm
    inputs of ``n`` bytes: 4 under CUDA autocast, which upcasts LayerNorm inputs to float32, else
    ``c``). Per token:

    - per resblock: ``ln_1`` and ``ln_2`` inputs (``2 W n``) with their mean and rstd (``2 x 8``);
      the in-projection's input (``W c``); the packed q/k/v that SDPA keeps (``3 W c``, one
      storage); the attention output, shared with ``out_proj``'s input (``W c``); SDPA's
      logsumexp (``4 h``); ``c_fc``'s input (``W c``); the GELU's input and output (``2 F c``;
      QuickGELU keeps its sigmoid too: ``+ F c``); a LayerScale keeps its input (``W c`` each);
    - stem: the image as the convolution keeps it (``3 H W c`` per image), ``ln_pre``'s input;
    - head: ``ln_post``'s input, and the ``ln_post`` output that ``x[:, 0] @ proj`` keeps alive
      (a view of all tokens: ``T W c``; ``W c`` for average pooling).

    This is exact against ``torch.autograd.graph.saved_tensors_hooks`` on the CPU (the tests count
    unique saved storages of a patched tower, fp32 and bf16 autocast). On CUDA the attention
    backend adds small differences (memory-efficient attention pads logsumexp to 32 tokens; a math
    fallback would keep ``h T^2`` probabilities), and the caching allocator rounds blocks.
``transient``
    The largest live temporaries, an upper bound taken from the torch backend: the dense gradient
    ``G`` of the largest adapted block (compute dtype, plus its float32 copy for the reduction
    against the slab under autocast), that block's compose temporaries (a float32 accumulator and
    one widened chunk of the slab: ``N x min(numel, 2^24 / N)`` float32 elements for non-float32
    storage, three such buffers for int8/fp8, which gather per-row scales), and the largest
    activation gradient in flight (``c_proj``'s input gradient, ``B T F c``). The Triton backend
    never forms ``G`` for linear layers.
``coefficients``
    ``N x K`` float32 coefficients per adapted block, times 4: values, gradients and AdamW's two
    moments.
``inputs``
    The float32 image batch the caller holds, when autocast keeps a separate cast copy (with
    fp32 the convolution keeps the batch itself, already counted in ``activations``).

Sharded (``world=W`` > 1, :mod:`atlas_kernels.sharding`), per process, with ``batch`` the
process's own batch:

``theta0``
    Each adapted block's ``ceil(R / W)`` rows (R: its dim 0; the last processes' padded with
    zeros), every other parameter and buffer whole.
``task_vectors``
    The same rows of every slab, of the int8/fp8 per-row scales (a 1-D block's one scale per task
    vector whole) and of LoRA's ``B``; LoRA's ``A`` whole.
``composed`` (the gathered blocks)
    The root unit's blocks (those outside the tower's layers: embeddings, the last norm, the head)
    gathered whole in the dtype they are read in (kept from the forward to the backward), their
    gradient ``G`` (kept through the backward until the last of them is ready), and, for the
    largest layer unit, the most of: twice its blocks (the all-gather buffer and the blocks copied
    out of it) in the forward; its blocks gathered again, their gradient and the float32
    reduce-scatter buffers (``4 + 4 / W`` bytes per element of at most
    :data:`atlas_kernels.sharding.RS_CHUNK` elements, or of the unit's largest block) in the
    backward.
``transient``
    As above without ``G`` (counted with the gathered blocks): the compose temporaries of the
    largest block's local rows, and the largest activation gradient in flight.

Causal LMs (Hugging Face Llama, Qwen2, Mistral: ``model.model.layers``), ``tokens`` per sequence,
``precision`` the model's dtype (``"fp32"`` or ``"bf16"``: weights and compute in that dtype, no
autocast), activations per token, measured with ``saved_tensors_hooks`` on the CPU (SDPA) and
exact there: per layer ``32 H + 8 kv + 4 h + 16 I + 8`` bytes in float32, ``20 H + 4 kv + 4 h +
8 I + 8`` in bfloat16 (``H`` hidden size, ``kv`` key/value width, ``h`` heads, ``I`` MLP width);
outside the layers ``12 H + 4 d`` (float32) or ``8 H + 2 d`` (bfloat16) with ``d`` the head width,
plus the next-token loss: ``4 V (T - 1) / T`` bytes of float32 log-probabilities and ``24`` bytes
of token ids and masks.

Not counted: the text tower (pass ``model.visual``; given a whole CLIP, its ``.visual`` is used and
the text tower's parameters are left out), the classifier head and loss, the CUDA context and
library workspaces (cuBLAS, cuDNN: tens to hundreds of MiB), and allocator fragmentation.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Dict, Optional, Tuple, Union

import torch
import torch.nn as nn

from .storage import BYTES_PER_ELEMENT, SCALED, slab_bytes

__all__ = ["MemoryEstimate", "estimate_memory", "PRECISIONS"]

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "32": "fp32"}
_GIB = float(1 << 30)
_MIB = float(1 << 20)


@dataclass
class MemoryEstimate:
    """Predicted peak memory of one training step, in bytes per term (see :mod:`atlas_kernels.planner`)."""

    theta0: int
    task_vectors: int
    composed: int
    activations: int
    transient: int
    coefficients: int
    inputs: int
    # what the estimate is for
    batch: int
    tokens: int
    width: int
    layers: int
    heads: int
    mlp_width: int
    precision: str
    device: str
    recompute: bool
    partitions: int
    n: int
    storage: Optional[str]
    blocks: int
    detail: Dict[str, int] = field(default_factory=dict)
    world: int = 1
    kind: str = "ViT"

    TERMS = ("theta0", "task_vectors", "composed", "activations", "transient", "coefficients", "inputs")

    @property
    def total(self) -> int:
        return sum(getattr(self, t) for t in self.TERMS)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["total"] = self.total
        return d

    def __str__(self) -> str:
        c = "float32" if self.precision == "fp32" else f"{self.precision} autocast"
        tv = f"N={self.n} {self.storage}" if self.n else "no task vectors"
        c = c if self.kind == "ViT" else self.precision
        per = f", per process of {self.world} (sharded)" if self.world > 1 else ""
        head = (f"Memory estimate: {self.kind} {self.layers} x {self.width} (MLP {self.mlp_width}, "
                f"{self.heads} heads), batch {self.batch} x {self.tokens} tokens, {c} on {self.device}, {tv}, "
                f"K={self.partitions}, {self.blocks} adapted blocks{', recompute' if self.recompute else ''}{per}")
        labels = {
            "theta0": "theta0 (frozen weights)",
            "task_vectors": "task vectors (S)",
            "composed": ("gathered blocks (root + one layer unit)" if self.world > 1 else
                         "composed weights" + (" (one block, recompute)" if self.recompute else " kept for backward")),
            "activations": "activations saved for backward",
            "transient": "transient (G, compose temps, dX)",
            "coefficients": "coefficients + grads + AdamW",
            "inputs": "input batch (fp32, caller's)",
        }
        total = max(1, self.total)
        lines = [head, f"  {'term':<42}{'GiB':>9}{'MiB':>11}{'share':>8}"]
        for t in self.TERMS:
            v = getattr(self, t)
            lines.append(f"  {labels[t]:<42}{v / _GIB:>9.3f}{v / _MIB:>11.1f}{100 * v / total:>7.1f}%")
        lines.append(f"  {'total (predicted peak)':<42}{self.total / _GIB:>9.3f}{self.total / _MIB:>11.1f}"
                     f"{100.0:>7.1f}%")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------ helpers
def _tower(model: nn.Module) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not hasattr(model, "conv1") and isinstance(getattr(model, "visual", None), nn.Module):
        model = model.visual
    missing = [a for a in ("conv1", "positional_embedding", "transformer") if getattr(model, a, None) is None]
    if missing or not hasattr(model.transformer, "resblocks"):
        raise ValueError(f"estimate_memory models open_clip ViT image towers (conv1, positional_embedding, "
                         f"transformer.resblocks); {type(model).__name__} lacks {missing or ['transformer.resblocks']}")
    if getattr(model, "attn_pool", None) is not None:
        raise ValueError("estimate_memory does not model open_clip's attentional pooler (CoCa towers)")
    return model


def _precision(precision) -> str:
    if isinstance(precision, torch.dtype):
        for k, v in PRECISIONS.items():
            if v == precision:
                return k
    p = _ALIASES.get(str(precision), str(precision))
    if p not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)} (fp32: no autocast; bf16/fp16: autocast), "
                         f"got {precision!r}")
    return p


def _pair(v) -> Tuple[int, int]:
    if isinstance(v, (tuple, list)):
        if len(v) != 2:
            raise ValueError(f"image_size must be an int or (height, width), got {v!r}")
        return int(v[0]), int(v[1])
    return int(v), int(v)


def _owner(tower: nn.Module, name: str):
    path, _, local = name.rpartition(".")
    try:
        return (tower.get_submodule(path) if path else tower), local
    except AttributeError:
        return None, local


def _is_layernorm(m) -> bool:
    return isinstance(m, (nn.LayerNorm, nn.GroupNorm)) or type(m).__name__.startswith("LayerNorm")


def _kept_bytes(tower: nn.Module, name: str, p: torch.Tensor, c: int, cuda_autocast: bool) -> int:
    """Bytes of block ``name``'s composed value that backward keeps (see the module docstring)."""
    owner, local = _owner(tower, name)
    numel = p.numel()
    if isinstance(owner, nn.MultiheadAttention):
        return numel * c if local == "in_proj_weight" else 0
    if isinstance(owner, (nn.Linear, nn.modules.conv._ConvNd)):
        return numel * c if local == "weight" else 0
    if _is_layernorm(owner):
        return numel * (4 if cuda_autocast else p.element_size())
    if owner is tower and local in ("class_embedding", "positional_embedding"):
        return 0
    if owner is tower and local == "proj":
        return numel * c
    if type(owner).__name__ == "LayerScale":
        return numel * p.element_size()
    return numel * max(c, p.element_size())  # unknown consumer: assume it keeps the block


def _gelu_extra(act: nn.Module) -> int:
    """Extra ``F``-wide tensors an activation keeps beyond its input (QuickGELU: its sigmoid)."""
    return 1 if type(act).__name__ == "QuickGELU" else 0


def _adapted(tower: nn.Module, task_vectors, params: Dict[str, torch.Tensor]):
    """``(block names, N, storage, S bytes)`` for a TaskVectors, an ``(N, storage)`` pair, or None."""
    from .task_vectors import TaskVectors

    if task_vectors is None:
        return [], 0, None, 0
    if isinstance(task_vectors, TaskVectors):
        names = []
        for b in task_vectors.blocks:
            if b in params:
                names.append(b)
            elif b.startswith("visual.") and b[len("visual."):] in params:
                names.append(b[len("visual."):])
            else:
                raise ValueError(f"task vectors name block {b!r}, which the tower does not have "
                                 f"(its parameters look like {list(params)[:3]})")
        return names, len(task_vectors), task_vectors.storage, int(task_vectors.nbytes)
    if isinstance(task_vectors, (tuple, list)) and len(task_vectors) == 2:
        n, storage = task_vectors
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"task_vectors=(N, storage): N must be a positive int, got {n!r}")
        if storage not in BYTES_PER_ELEMENT:
            raise ValueError(f"task_vectors=(N, storage): storage must be one of {sorted(BYTES_PER_ELEMENT)}, "
                             f"got {storage!r}")
        names = [k for k, p in params.items() if p.is_floating_point()]
        s = sum(slab_bytes(n, params[k].shape, storage) for k in names)
        return names, n, storage, s
    raise TypeError("task_vectors must be an atlas_kernels.TaskVectors, an (N, storage) pair, or None; "
                    f"got {type(task_vectors).__name__}")


def _chunk_elems() -> int:
    try:
        from .ops import torch_backend

        return int(getattr(torch_backend, "_CHUNK_ELEMS", 1 << 24))
    except Exception:  # pragma: no cover
        return 1 << 24


# ------------------------------------------------------------------------------------------ estimate
def estimate_memory(model: nn.Module, task_vectors, batch: int, *, precision: str = "bf16", partitions: int = 1,
                    recompute: bool = False, image_size: Union[int, Tuple[int, int], None] = None,
                    tokens: Optional[int] = None, device: str = "cuda", world: int = 1) -> MemoryEstimate:
    """Predict the peak memory of one training step of ``model`` patched with ``task_vectors``.

    Args:
        model: the (unpatched) open_clip ViT image tower to be patched (``model.visual``), or a
            whole CLIP model, whose ``.visual`` is used. Only shapes and dtypes are read; a tower
            on the ``meta`` device works.
        task_vectors: a :class:`~atlas_kernels.TaskVectors` (its blocks are the adapted blocks), an
            ``(N, storage)`` pair meaning N task vectors over every floating parameter of the
            tower (plan without building them), or None (the plain model's step).
        batch: images per step.
        precision: ``"fp32"`` (no autocast), ``"bf16"`` or ``"fp16"`` (autocast, float32 weights).
        partitions: K coefficients per task vector per block.
        recompute: keep one composed block instead of all of them.
        image_size: input resolution (int or ``(H, W)``); default the tower's own.
        tokens: tokens per image; default from ``image_size`` and the patch size when given, else
            from the positional embedding's shape.
        device: ``"cuda"`` (LayerNorm autocasts its input to float32) or ``"cpu"`` (it does not).
        world: processes the task vectors are sharded over (:func:`atlas_kernels.shard`); the
            estimate is then per process, ``batch`` being each process's own batch.

    A Hugging Face causal LM (``model.model.layers``: Llama, Qwen2, Mistral) is planned too: pass
    the ``*ForCausalLM`` model (built on the ``meta`` device from its config: no weights needed),
    ``batch`` sequences of ``tokens`` tokens, ``precision`` its dtype (``"fp32"`` or ``"bf16"``).

    Returns:
        a :class:`MemoryEstimate` (bytes per term; ``.total``; ``print()`` shows a table in GiB).
        The terms are defined in the module docstring of :mod:`atlas_kernels.planner`.
    """
    from .patching import is_patched

    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise ValueError(f"world must be a positive int (processes the task vectors are sharded over), got {world!r}")
    if _is_causal_lm(model):
        return _estimate_lm(model, task_vectors, batch, precision=precision, partitions=partitions, tokens=tokens,
                            device=device, world=world)
    tower = _tower(model)
    if is_patched(tower) or any(type(m).__module__.startswith("atlas_kernels") for m in tower.modules()):
        raise ValueError("estimate_memory reads the plain tower: call it before patch() (or after unpatch())")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive int, got {batch!r}")
    if isinstance(partitions, bool) or not isinstance(partitions, int) or partitions < 1:
        raise ValueError(f"partitions must be an int >= 1, got {partitions!r}")
    if device not in ("cuda", "cpu"):
        raise ValueError(f"device must be 'cuda' or 'cpu', got {device!r}")
    prec = _precision(precision)
    autocast = prec != "fp32"
    c = 4 if prec == "fp32" else 2
    cuda_autocast = autocast and device == "cuda"
    ln_in = 4 if cuda_autocast else c

    params = dict(tower.named_parameters())
    blocks = list(tower.transformer.resblocks)
    if not blocks:
        raise ValueError("the tower has no resblocks")
    b0 = blocks[0]
    pos = tower.positional_embedding
    width = int(pos.shape[-1])
    heads = int(b0.attn.num_heads)
    mlp_width = int(b0.mlp.c_fc.out_features)
    conv = tower.conv1
    kh, kw = _pair(conv.stride)
    hw = _pair(image_size) if image_size is not None else _pair(getattr(tower, "image_size", 224))
    cls_tok = 1 if getattr(tower, "class_embedding", None) is not None else 0
    if tokens is None:
        tokens = (hw[0] // kh) * (hw[1] // kw) + cls_tok if image_size is not None else int(pos.shape[0])
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
        raise ValueError(f"tokens must be a positive int, got {tokens!r}")
    B, T, W, F = batch, tokens, width, mlp_width

    # ---- activations (bytes), see the module docstring
    ln_stats = 8  # mean and rstd, float32, per token
    per_block = 0
    for blk in blocks:
        w = int(blk.ln_1.normalized_shape[0]) if hasattr(blk.ln_1, "normalized_shape") else W
        f = int(blk.mlp.c_fc.out_features)
        h = int(blk.attn.num_heads)
        tok = 2 * (w * ln_in + ln_stats)  # ln_1, ln_2 inputs
        tok += w * c + 3 * w * c + w * c + 4 * h  # in_proj input, qkv, attention output, logsumexp
        tok += w * c + 2 * f * c + _gelu_extra(blk.mlp.gelu) * f * c  # c_fc input, GELU in/out
        tok += sum(w * c for ls in (getattr(blk, "ls_1", None), getattr(blk, "ls_2", None))
                   if ls is not None and not isinstance(ls, nn.Identity))
        per_block += tok
    act_blocks = B * T * per_block
    has_ln_pre = not isinstance(getattr(tower, "ln_pre", nn.Identity()), nn.Identity)
    act_stem = B * 3 * hw[0] * hw[1] * c + (B * T * (W * ln_in + ln_stats) if has_ln_pre else 0)
    proj = getattr(tower, "proj", None)
    pool = getattr(tower, "pool_type", "tok")
    if getattr(tower, "final_ln_after_pool", False):
        # ln_post runs on the pooled token; x[:, 0] is a view of the whole residual (T W c) unless
        # CUDA autocast copies it to float32 first (W 4).
        ln_post = B * ((W * 4) if cuda_autocast else (T * W * c if pool == "tok" else W * c)) + B * ln_stats
        head_keep = B * W * c if proj is not None else 0
    else:
        ln_post = B * T * (W * ln_in + ln_stats)
        head_keep = 0 if proj is None else (B * T * W * c if pool == "tok" else B * W * c)
    act_head = ln_post + head_keep
    activations = act_blocks + act_stem + act_head

    # ---- theta0, task vectors, composed
    theta0 = sum(p.numel() * p.element_size() for p in tower.parameters())
    theta0 += sum(b.numel() * b.element_size() for b in tower.buffers())
    names, n, storage, s_bytes = _adapted(tower, task_vectors, params)
    kept = {k: _kept_bytes(tower, k, params[k], c, cuda_autocast) for k in names}
    composed = (max(kept.values(), default=0) if recompute else sum(kept.values()))

    # ---- transient: G of the largest adapted block + its compose temporaries + dX in flight
    big = max((params[k].numel() for k in names if params[k].dim() >= 2), default=0)
    g_bytes = big * c + (big * 4 if c != 4 else 0)
    widen = 0
    if storage is not None and storage != "float32" and big:
        chunk = min(big, max(1, _chunk_elems() // max(1, n)))
        widen = n * chunk * 4 * (3 if storage in SCALED else 1)
    compose_tmp = big * 4 + widen
    dx = B * T * F * c
    transient = g_bytes + compose_tmp + dx

    coefficients = 4 * 4 * n * partitions * len(names)
    inputs = B * 3 * hw[0] * hw[1] * 4 if autocast else 0
    sharded = {}
    if world > 1:
        # what the sharded plan gathers: linear and attention blocks in the compute dtype, the rest in theta0's
        read = {k: (c if isinstance(_owner(tower, k)[0], (nn.Linear, nn.MultiheadAttention))
                    else params[k].element_size()) for k in names}
        sharded = _sharded_terms(tower, params, names, task_vectors, n, storage, world, read, c, partitions)
        theta0 = theta0 - sum(params[k].numel() * params[k].element_size() for k in names) + sharded["theta0"]
        s_bytes, composed = sharded["task_vectors"], sharded["gathered"]
        transient = sharded["compose_tmp"] + dx

    detail = {
        "activations_per_resblock": act_blocks // len(blocks), "activations_resblocks": act_blocks,
        "activations_stem": act_stem, "activations_head": act_head,
        "transient_G": g_bytes, "transient_compose": compose_tmp, "transient_dx": dx,
        "largest_block_numel": big,
        **{f"sharded_{k}": v for k, v in sharded.items()},
    }
    return MemoryEstimate(
        theta0=int(theta0), task_vectors=int(s_bytes), composed=int(composed), activations=int(activations),
        transient=int(transient), coefficients=int(coefficients), inputs=int(inputs),
        batch=B, tokens=T, width=W, layers=len(blocks), heads=heads, mlp_width=F, precision=prec, device=device,
        recompute=bool(recompute), partitions=partitions, n=n, storage=storage, blocks=len(names), detail=detail,
        world=world,
    )


# ------------------------------------------------------------------------------------------ sharded
def _layer_units(model: nn.Module) -> Dict[str, str]:
    """Parameter name -> the unit a sharded plan gathers it with (as ``units="auto"``: each element
    of a ModuleList is a unit; "" for the root)."""
    lists = []
    for path, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and not any(path.startswith(p + ".") for p in lists):
            lists.append(path)
    out = {}
    for name, _ in model.named_parameters():
        unit = ""
        for p in lists:
            if name.startswith(p + "."):
                idx = name[len(p) + 1:].split(".", 1)[0]
                unit = f"{p}.{idx}"
        out[name] = unit
    return out


def _rows(shape) -> int:
    return int(shape[0]) if len(shape) else 1


def _sharded_terms(model, params, names, task_vectors, n, storage, world, read, c, partitions) -> Dict[str, int]:
    """Per-process bytes of a sharded tower (see the module docstring): theta0 rows, task-vector
    rows, the gathered blocks with their gradients and reduce-scatter buffers, compose temporaries."""
    from .task_vectors import TaskVectors

    if partitions > 1:
        raise ValueError("estimate_memory(world > 1): partitions are not sharded (atlas_kernels.shard refuses them)")
    units = _layer_units(model)
    theta0 = tv = 0
    from .sharding import RS_CHUNK

    unit_vals: Dict[str, int] = {}
    unit_numel: Dict[str, int] = {}
    unit_big: Dict[str, int] = {}
    for k in names:
        p = params[k]
        rows = _rows(p.shape)
        per = -(-rows // world)
        row_numel = p.numel() // max(1, rows)
        theta0 += per * row_numel * p.element_size()
        if isinstance(task_vectors, TaskVectors):
            if task_vectors.is_lora(k):
                a, b = task_vectors.lora(k)
                held = a.shape[0]
                tv += a.numel() * a.element_size() + held * per * b.shape[2] * b.element_size()
            else:
                slab = task_vectors[k]
                held = slab.shape[0]
                tv += held * per * row_numel * slab.element_size()
                sc = task_vectors.scale(k)
                if sc is not None:
                    tv += held * (per if p.dim() >= 2 else 1) * 4
        else:
            tv += n * per * row_numel * BYTES_PER_ELEMENT[storage]
            if storage in SCALED:
                tv += n * (per if p.dim() >= 2 else 1) * 4
        u = units.get(k, "")
        unit_vals[u] = unit_vals.get(u, 0) + p.numel() * read[k]
        unit_numel[u] = unit_numel.get(u, 0) + p.numel()
        unit_big[u] = max(unit_big.get(u, 0), per * row_numel * world)

    def chunk(u):  # elements reduce-scattered at once (sharding.RS_CHUNK, or the unit's largest block)
        return max(min(unit_numel.get(u, 0), RS_CHUNK), unit_big.get(u, 0))

    rs = 4 + 4 / world  # float32 reduce-scatter: the send buffer (whole blocks) and this process's rows
    root_vals, root_rs = unit_vals.pop("", 0), chunk("") * rs
    unit_numel.pop("", 0)
    big = max(unit_vals, key=unit_vals.get, default=None)
    u_vals = unit_vals.get(big, 0)
    layer_peak = max(2 * u_vals, 2 * u_vals + chunk(big) * rs)  # forward: buffer + copy-out; backward: values, G, rs
    # root: values kept, G kept until its last block's gradient; its reduce-scatter when no layer unit is live
    gathered = root_vals + root_vals + max(layer_peak, int(root_rs))
    largest = max((params[k].numel() for k in names), default=0)
    per_largest = max(((-(-_rows(params[k].shape) // world)) * (params[k].numel() // max(1, _rows(params[k].shape)))
                       for k in names if params[k].numel() == largest), default=0)
    widen = 0
    if storage is not None and storage != "float32" and per_largest:
        chunk = min(per_largest, max(1, _chunk_elems() // max(1, n)))
        widen = n * chunk * 4 * (3 if storage in SCALED else 1)
    return {"theta0": int(theta0), "task_vectors": int(tv), "gathered": int(gathered),
            "compose_tmp": int(per_largest * 4 + widen), "root_values": int(root_vals),
            "layer_unit_values": int(u_vals), "layer_unit_peak": int(layer_peak)}


# --------------------------------------------------------------------------------------- causal LMs
def _is_causal_lm(model) -> bool:
    inner = getattr(model, "model", None)
    return (isinstance(model, nn.Module) and hasattr(model, "config") and inner is not None
            and isinstance(getattr(inner, "layers", None), nn.ModuleList)
            and hasattr(model.config, "num_hidden_layers") and hasattr(model.config, "intermediate_size"))


# bytes per token per layer: coefficients of (H, kv width, heads, I, 1); outside the layers: (H, head width)
_LM_LAYER = {"fp32": (32, 8, 4, 16, 8), "bf16": (20, 4, 4, 8, 8), "fp16": (20, 4, 4, 8, 8)}
_LM_HEAD = {"fp32": (12, 4), "bf16": (8, 2), "fp16": (8, 2)}


def _estimate_lm(model, task_vectors, batch, *, precision, partitions, tokens, device, world) -> MemoryEstimate:
    from .patching import is_patched

    if is_patched(model):
        raise ValueError("estimate_memory reads the plain model: call it before patch() (or after unpatch())")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive int, got {batch!r}")
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
        raise ValueError(f"a causal LM needs tokens= (tokens per sequence, a positive int), got {tokens!r}")
    if isinstance(partitions, bool) or not isinstance(partitions, int) or partitions < 1:
        raise ValueError(f"partitions must be an int >= 1, got {partitions!r}")
    prec = _precision(precision)
    cfg = model.config
    H, I, L = int(cfg.hidden_size), int(cfg.intermediate_size), int(cfg.num_hidden_layers)
    h = int(cfg.num_attention_heads)
    d = int(getattr(cfg, "head_dim", None) or H // h)
    kv = int(getattr(cfg, "num_key_value_heads", None) or h) * d
    V = int(cfg.vocab_size)
    B, T = batch, tokens
    c = 4 if prec == "fp32" else 2
    lay = _LM_LAYER[prec]
    per_layer = lay[0] * H + lay[1] * kv + lay[2] * h + lay[3] * I + lay[4]
    hd = _LM_HEAD[prec]
    head = hd[0] * H + hd[1] * d + 4 * V * (T - 1) / T + 24
    activations = int(B * T * (L * per_layer + head))
    params = dict(model.named_parameters())
    tied = {n for n, _ in model.named_parameters(remove_duplicate=False)} - set(params)
    names, n, storage, s_bytes = _adapted_lm(model, task_vectors, params)
    theta0 = sum(p.numel() * p.element_size() for p in model.parameters())
    theta0 += sum(b.numel() * b.element_size() for b in model.buffers())
    # every adapted matrix and norm is read in the model's dtype (no autocast): kept for backward whole
    composed = sum(params[k].numel() * c for k in names)
    big = max((params[k].numel() for k in names if params[k].dim() >= 2), default=0)
    g_bytes = big * c + (big * 4 if c != 4 else 0)
    widen = 0
    if storage is not None and storage != "float32" and big:
        chunk = min(big, max(1, _chunk_elems() // max(1, n)))
        widen = n * chunk * 4 * (3 if storage in SCALED else 1)
    dx = B * T * max(I, V) * 4
    transient = g_bytes + big * 4 + widen + dx
    sharded = {}
    if world > 1:
        sharded = _sharded_terms(model, params, names, task_vectors, n, storage, world, {k: c for k in names}, c,
                                 partitions)
        theta0 = theta0 - sum(params[k].numel() * params[k].element_size() for k in names) + sharded["theta0"]
        s_bytes, composed = sharded["task_vectors"], sharded["gathered"]
        transient = sharded["compose_tmp"] + dx
    coefficients = 4 * 4 * n * partitions * len(names)
    detail = {"activations_per_layer": int(B * T * per_layer), "activations_outside_layers": int(B * T * head),
              "tied_names": len(tied), **{f"sharded_{k}": v for k, v in sharded.items()}}
    return MemoryEstimate(
        theta0=int(theta0), task_vectors=int(s_bytes), composed=int(composed), activations=activations,
        transient=int(transient), coefficients=int(coefficients), inputs=int(B * T * 8),
        batch=B, tokens=T, width=H, layers=L, heads=h, mlp_width=I, precision=prec, device=device, recompute=False,
        partitions=partitions, n=n, storage=storage, blocks=len(names), detail=detail, world=world,
        kind=type(model).__name__)


def _adapted_lm(model, task_vectors, params):
    from .task_vectors import TaskVectors

    if task_vectors is None:
        return [], 0, None, 0
    if isinstance(task_vectors, TaskVectors):
        missing = [b for b in task_vectors.blocks if b not in params]
        if missing:
            raise ValueError(f"task vectors name block(s) {missing[:3]}, which the model does not have (or only "
                             f"as a tied alias: name the first, e.g. {list(params)[:1]})")
        return list(task_vectors.blocks), len(task_vectors), task_vectors.storage, int(task_vectors.nbytes)
    return _adapted(model, task_vectors, params)
