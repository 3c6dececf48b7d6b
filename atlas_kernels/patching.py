"""patch / unpatch / coefficients, and coefficient files.

``patch(module, task_vectors)`` swaps, in place:

- ``nn.Linear`` (and subclasses that keep its forward) -> :class:`~atlas_kernels.modules.AtlasLinear`;
- ``nn.MultiheadAttention`` (packed in-projection) -> :class:`~atlas_kernels.modules.AtlasMultiheadAttention`;
- every other adapted parameter (LayerNorm, convolution, embeddings, raw parameters such as
  ``class_embedding``, ``positional_embedding``, ``proj``) -> an
  :class:`~atlas_kernels.modules.AtlasParameter` parametrization on its owner.

Every parameter of the patched module stops requiring gradients; the coefficients are the only
trainable parameters. ``unpatch`` merges ``theta0 + sum_i lam_i tau_i`` (float32) back into plain
modules of the original classes, with the original parameter names and ``requires_grad`` flags.
"""
from __future__ import annotations

import json
import warnings
from collections import defaultdict
from typing import Callable, Dict, Iterable, Union

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from . import ops
from .modules import (SMALL_BLOCK_NUMEL, AtlasLinear, AtlasModule, AtlasMultiheadAttention, AtlasParameter,
                      BlockSpec, SmallBlockGroup)
from .partitions import MODES, Partition
from .task_vectors import TaskVectors

__all__ = ["patch", "unpatch", "is_patched", "coefficients", "save_coefficients", "load_coefficients"]

_STATE = "_atlas_state"
_GROUP = "_atlas_small_blocks"
_COEF_FORMAT = "atlas_kernels.coefficients"
BlockFilter = Union[None, str, Iterable[str], Callable[[str, torch.Tensor], bool]]


# ----------------------------------------------------------------------------- patch
def patch(module: nn.Module, task_vectors: TaskVectors, *, partitions: int = 1, partition_mode: str = "contiguous",
          seed: int = 0, backend: str = "auto", blocks: BlockFilter = None,
          group_small_blocks: bool = True) -> nn.Module:
    """Swap atlas modules into ``module`` (in place) and return it.

    Args:
        task_vectors: a :class:`TaskVectors` whose block names are parameter names of ``module``
            (for an open_clip model's image tower: build them with ``prefix="visual."`` and patch
            ``model.visual``). Blocks it does not name stay frozen at ``theta0``.
        partitions: K coefficients per task vector per block (aTLAS x K); coefficients have shape
            ``(N,)`` for K = 1, else ``(N, K)``.
        partition_mode: ``"contiguous"`` (K equal contiguous chunks of the flattened block: row
            groups for a matrix) or ``"hash"`` (seeded pseudo-random elementwise split, computed
            inside the kernels: no masks in memory). See :mod:`atlas_kernels.partitions`.
        seed: the hash partition's seed.
        backend: ``"auto"`` (Triton on CUDA, torch elsewhere), ``"torch"``, ``"triton"``, ``"cuda"``.
        blocks: narrow the adapted set: ``None``/``"all"``; ``"weights"`` (blocks of 2 or more
            dimensions: matrices and convolutions); a list of block names; or a predicate
            ``f(name, parameter) -> bool``.
        group_small_blocks: compose the small dense generic blocks (LayerNorms, embeddings, ...: at
            most :data:`~atlas_kernels.modules.SMALL_BLOCK_NUMEL` elements, not LoRA, not ragged)
            together, in one launch per forward of ``module``, whenever the backend resolves to
            ``"triton"`` or ``"cuda"`` (see :class:`~atlas_kernels.modules.SmallBlockGroup`). The group is
            registered as ``module._atlas_small_blocks`` (on its first member when ``module`` is a
            container such as ``nn.Sequential``; no parameters, nothing in the state dict).
            False: one launch per block.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    if not isinstance(task_vectors, TaskVectors):
        raise TypeError(f"task_vectors must be an atlas_kernels.TaskVectors, got {type(task_vectors).__name__}")
    ops.check_backend(backend)
    if not isinstance(partitions, int) or isinstance(partitions, bool) or partitions < 1:
        raise ValueError(f"partitions must be an integer >= 1, got {partitions!r}")
    if partition_mode not in MODES:
        raise ValueError(f"partition_mode must be one of {MODES}, got {partition_mode!r}")
    if is_patched(module) or _contains_atlas(module):
        raise RuntimeError("this module is already patched by atlas_kernels (patching twice would compose twice); "
                           "call atlas_kernels.unpatch(module) first")

    params = dict(module.named_parameters())
    buffers = _buffers_named(task_vectors, module, params)
    _check_blocks_exist(task_vectors, params, buffers)
    chosen = [b for b in _choose_blocks(task_vectors, params, blocks) if b not in buffers]
    for name in chosen:
        _check_block(name, params[name], task_vectors)

    specs = {name: _spec(task_vectors, name, Partition.for_block(name, partitions, partition_mode, seed))
             for name in chosen}
    requires_grad = {name: p.requires_grad for name, p in params.items()}

    # Group the blocks by owning module, then swap module by module.
    by_owner: Dict[str, Dict[str, BlockSpec]] = defaultdict(dict)
    for name, spec in specs.items():
        owner, _, local = name.rpartition(".")
        by_owner[owner][local] = spec
    _promote_out_proj(module, by_owner)

    for owner_path in sorted(by_owner, key=lambda p: p.count(".") if p else -1):
        owned = by_owner[owner_path]
        owner = module.get_submodule(owner_path) if owner_path else module
        if isinstance(owner, AtlasModule):
            continue  # an out_proj, swapped together with its AtlasMultiheadAttention parent
        parent_path = owner_path.rpartition(".")[0]
        parent = (module.get_submodule(parent_path) if parent_path else module) if owner_path else None
        if owner_path and isinstance(owner, nn.MultiheadAttention) and AtlasMultiheadAttention.supports(owner):
            out_specs = by_owner.get(_join(owner_path, "out_proj"), {})
            _replace(module, owner_path, AtlasMultiheadAttention(owner, owned, out_specs, backend))
        elif owner_path and _plain_linear(owner) and not isinstance(parent, nn.MultiheadAttention):
            _replace(module, owner_path, AtlasLinear(owner, owned, backend))
        else:
            # Generic path; also an unsupported MHA's out_proj, whose weight the MHA reads directly.
            for local, spec in owned.items():
                parametrize.register_parametrization(owner, local, AtlasParameter(spec, backend), unsafe=True)

    coef_ids = {id(c) for c in coefficients(module, _check=False).values()}
    for p in module.parameters():
        if id(p) not in coef_ids:
            p.requires_grad_(False)
    if group_small_blocks and backend in ("auto", "triton", "cuda"):
        _group_small_blocks(module)
    setattr(module, _STATE, {
        "n": len(task_vectors), "names": task_vectors.names, "blocks": list(chosen), "partitions": partitions,
        "partition_mode": partition_mode, "seed": seed, "backend": backend, "requires_grad": requires_grad,
    })
    return module


def _group_small_blocks(module: nn.Module) -> None:
    """Collect the small dense AtlasParameter blocks of ``module`` into a SmallBlockGroup (the
    largest set sharing device, storage dtype, theta0 dtype and scaled-or-not; the rest, if any,
    stay per block)."""
    sets = defaultdict(list)
    for _, m in module.named_modules():
        plist = getattr(m, "parametrizations", None)
        if not isinstance(plist, nn.ModuleDict):
            continue
        for local, chain in plist.items():
            for p in chain:
                if not isinstance(p, AtlasParameter) or p.lora_a is not None or p.index is not None:
                    continue
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
    holder.add_module(_GROUP, group)
    group.attach(module)


def _ungroup_small_blocks(module: nn.Module) -> None:
    for m in list(module.modules()):
        group = m._modules.get(_GROUP)
        if isinstance(group, SmallBlockGroup):
            group.detach(module)
            del m._modules[_GROUP]


def _spec(tvs: TaskVectors, name: str, partition: Partition) -> BlockSpec:
    if tvs.is_lora(name):
        return BlockSpec(None, None, partition, lora=tvs.lora(name), index=tvs.index(name), n=len(tvs))
    return BlockSpec(tvs[name], tvs.scale(name), partition, index=tvs.index(name), n=len(tvs))


def _join(a: str, b: str) -> str:
    return f"{a}.{b}" if a else b


def _promote_out_proj(root: nn.Module, by_owner) -> None:
    """An MHA reads ``out_proj.weight`` directly, so a task vector on its out_proj needs the whole MHA
    swapped (with no in-projection blocks if none are named)."""
    for path in list(by_owner):
        parent, _, last = path.rpartition(".")
        if last == "out_proj" and path:
            owner = root.get_submodule(parent) if parent else root
            if isinstance(owner, nn.MultiheadAttention) and AtlasMultiheadAttention.supports(owner):
                by_owner.setdefault(parent, {})


def _plain_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) and type(m).forward is nn.Linear.forward


def _replace(root: nn.Module, path: str, new: nn.Module) -> None:
    if not path:
        raise ValueError("cannot swap the root module itself; patch its parent, or wrap it")
    parent, _, last = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, last, new)


def _contains_atlas(module: nn.Module) -> bool:
    for m in module.modules():
        if isinstance(m, (AtlasModule, AtlasParameter)) or hasattr(m, _STATE):
            return True
    return False


def _buffers_named(tvs: TaskVectors, module: nn.Module, params) -> set:
    """Blocks that are buffers of the module (a state dict holds BatchNorm running statistics
    beside the parameters): not parameters, so not adapted; said once, then skipped."""
    bufs = {k for k, _ in module.named_buffers()}
    named = {b for b in tvs.blocks if b not in params and b in bufs}
    if named:
        warnings.warn(f"task vectors name {len(named)} buffer(s) of the module, e.g. {sorted(named)[:3]}; buffers "
                      f"(such as BatchNorm running statistics) are not parameters and stay as they are",
                      stacklevel=3)
    return named


def _check_blocks_exist(tvs: TaskVectors, params, buffers=frozenset()) -> None:
    missing = [b for b in tvs.blocks if b not in params and b not in buffers]
    if missing:
        hint = ""
        sample = missing[0]
        for p in ("visual.", "module.", "model."):
            if sample.startswith(p) and sample[len(p):] in params:
                hint = f" (the task vectors carry a {p!r} prefix: build them with prefix={p!r})"
        if not hint and any(_join("visual", sample) == k or k.endswith("." + sample) for k in params):
            hint = " (the model holds it under a longer path: patch the submodule, e.g. model.visual)"
        raise ValueError(f"task vectors name {len(missing)} block(s) the model does not have, e.g. "
                         f"{missing[:3]}{hint}")


def _choose_blocks(tvs: TaskVectors, params, blocks: BlockFilter):
    names = tvs.blocks
    if blocks is None or blocks == "all":
        return names
    if blocks == "weights":
        return [b for b in names if b in params and params[b].dim() >= 2]
    if isinstance(blocks, str):
        raise ValueError(f"blocks must be None, 'all', 'weights', a list of block names or a predicate, "
                         f"got {blocks!r}")
    if callable(blocks):
        return [b for b in names if b in params and blocks(b, params[b])]
    wanted = list(blocks)
    unknown = [b for b in wanted if b not in tvs]
    if unknown:
        raise ValueError(f"blocks: {unknown[:3]} are not blocks of these task vectors")
    return [b for b in names if b in set(wanted)]


def _check_block(name: str, p: torch.Tensor, tvs: TaskVectors) -> None:
    shape = tvs.shape(name)
    if shape != p.shape:
        raise ValueError(f"block {name!r}: the model's parameter has shape {tuple(p.shape)}, the task vectors "
                         f"have {tuple(shape)} (task vectors of another model?)")
    if not p.is_floating_point():
        raise TypeError(f"block {name!r}: the model's parameter is {p.dtype}; only floating blocks can be adapted")
    if tvs.device != p.device:
        raise ValueError(f"block {name!r}: task vectors are on {tvs.device}, the model's parameter on {p.device}; "
                         f"move them with task_vectors.to({str(p.device)!r})")


def is_patched(module: nn.Module) -> bool:
    return hasattr(module, _STATE)


def _state(module: nn.Module) -> dict:
    if not is_patched(module):
        raise RuntimeError("this module was not patched by atlas_kernels.patch (nothing to do)")
    return getattr(module, _STATE)


# ------------------------------------------------------------------- coefficients
def coefficients(module: nn.Module, _check: bool = True) -> Dict[str, nn.Parameter]:
    """Original parameter name -> its coefficients ``nn.Parameter`` (``(N,)`` or ``(N, K)``)."""
    if _check:
        _state(module)
    out: Dict[str, nn.Parameter] = {}
    for path, m in module.named_modules():
        if isinstance(m, AtlasModule):
            for local, c in m.adapted_blocks().items():
                out[_join(path, local)] = c
        plist = getattr(m, "parametrizations", None)
        if isinstance(plist, nn.ModuleDict):
            for local, chain in plist.items():
                for p in chain:
                    if isinstance(p, AtlasParameter):
                        out[_join(path, local)] = p.coef
    return out


# ----------------------------------------------------------------------- unpatch
@torch.no_grad()
def unpatch(module: nn.Module) -> nn.Module:
    """Merge ``theta0 + sum_i lam_i tau_i`` (float32) into plain modules and return ``module``."""
    state = _state(module)
    requires_grad = state["requires_grad"]
    # Validate every coefficient first, so a failure leaves the module patched and whole.
    for name, c in coefficients(module).items():
        if not torch.isfinite(c).all():
            raise ValueError(f"coefficients of block {name!r} hold NaN or inf; refusing to merge them")
    _ungroup_small_blocks(module)
    atlas = [(p, m) for p, m in module.named_modules() if isinstance(m, AtlasModule)]
    # Deepest first: an MHA's out_proj hands its merged weights to the original out_proj object,
    # which the original MHA still holds.
    for path, m in sorted(atlas, key=lambda pm: -pm[0].count(".")):
        orig = m._atlas_original
        for name in m.block_names:
            theta0 = getattr(m, name)
            if theta0 is None:
                continue
            value = m.merged(name)
            rg = requires_grad.get(_join(path, name), theta0.requires_grad)
            setattr(orig, name, nn.Parameter(value, requires_grad=rg))
        if isinstance(orig, nn.MultiheadAttention):
            orig.out_proj = m.out_proj._atlas_original if isinstance(m.out_proj, AtlasModule) else m.out_proj
        _replace(module, path, orig)
    for path, m in list(module.named_modules()):
        plist = getattr(m, "parametrizations", None)
        if not isinstance(plist, nn.ModuleDict):
            continue
        for local in list(plist.keys()):
            chain = plist[local]
            atlas_p = [p for p in chain if isinstance(p, AtlasParameter)]
            if not atlas_p:
                continue
            value = atlas_p[0].merged_from(chain.original, _join(path, local))
            _own_class(m)
            parametrize.remove_parametrizations(m, local, leave_parametrized=False)
            param = getattr(m, local)
            param.data = value
            param.requires_grad_(requires_grad.get(_join(path, local), True))
    for name, p in module.named_parameters():
        if name in requires_grad:
            p.requires_grad_(requires_grad[name])
    delattr(module, _STATE)
    return module


def _own_class(m: nn.Module) -> None:
    """Give ``m`` a private copy of its parametrized class before parametrizations are removed:
    ``copy.deepcopy`` of a parametrized module shares that generated class, and
    ``remove_parametrizations`` deletes the parameter's property from the class, which would break
    every copy of the patched model that is not being unpatched."""
    cls = type(m)
    if not parametrize.is_parametrized(m):
        return
    body = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
    m.__class__ = type(cls.__name__, cls.__bases__, body)


# ------------------------------------------------------------- coefficient files
def save_coefficients(module: nn.Module, path) -> None:
    """Write the coefficients to a safetensors file with metadata (N, K, partition layout, block
    list, task-vector names). Refuses NaN or inf."""
    from safetensors.torch import save_file

    state = _state(module)
    coefs = coefficients(module)
    tensors = {}
    for name, c in coefs.items():
        if not torch.isfinite(c).all():
            raise ValueError(f"coefficients of block {name!r} hold NaN or inf; not saving them")
        tensors[name] = c.detach().float().cpu().contiguous()
    meta = {
        "format": _COEF_FORMAT, "version": "1", "n": str(state["n"]), "partitions": str(state["partitions"]),
        "partition_mode": state["partition_mode"], "seed": str(state["seed"]),
        "names": json.dumps(state["names"]), "blocks": json.dumps(sorted(coefs)),
    }
    save_file(tensors, str(path), metadata=meta)


@torch.no_grad()
def load_coefficients(module: nn.Module, path) -> nn.Module:
    """Load coefficients written by :func:`save_coefficients`. A file for other blocks, another N or
    K, another partition layout, or holding non-finite values is refused before anything is
    written: nothing is half-loaded."""
    from safetensors import safe_open

    state = _state(module)
    coefs = coefficients(module)
    path = str(path)
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            loaded = {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError:
        raise
    except Exception as exc:
        raise ValueError(f"{path!r} is not a readable safetensors file (truncated or corrupted?): {exc}") from exc
    if meta.get("format") != _COEF_FORMAT:
        raise ValueError(f"{path!r} is not an atlas_kernels coefficient file (format={meta.get('format')!r})")
    diffs = []
    for key in ("n", "partitions"):
        if meta.get(key) != str(state[key]):
            diffs.append(f"{key}: file {meta.get(key)}, model {state[key]}")
    if state["partitions"] > 1:
        for key in ("partition_mode", "seed"):
            if meta.get(key) != str(state[key]):
                diffs.append(f"{key}: file {meta.get(key)}, model {state[key]}")
    missing = sorted(set(coefs) - set(loaded))
    extra = sorted(set(loaded) - set(coefs))
    if missing:
        diffs.append(f"the file lacks {len(missing)} block(s) the model has, e.g. {missing[:3]}")
    if extra:
        diffs.append(f"the file has {len(extra)} block(s) the model lacks, e.g. {extra[:3]}")
    if diffs:
        raise ValueError(f"{path!r} does not match this patched module: " + "; ".join(diffs))
    for name, c in coefs.items():
        t = loaded[name]
        if t.shape != c.shape:
            raise ValueError(f"{path!r}: block {name!r} has coefficients of shape {tuple(t.shape)}, "
                             f"the model expects {tuple(c.shape)}")
        if not t.is_floating_point() or not torch.isfinite(t).all():
            raise ValueError(f"{path!r}: coefficients of block {name!r} are not finite floats")
    for name, c in coefs.items():
        c.copy_(loaded[name].to(c.device, c.dtype))
    return module
