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
from ._patch_guards import (
    _check_backend_device,
    _check_tied_agree,
    _freeze_batchnorm,
    _tied_aliases,
    _unfreeze_batchnorm,
)
from .grouping import group_small_blocks_of, ungroup_small_blocks
from .modules import (
    PACKED_BACKENDS,
    AtlasLinear,
    AtlasModule,
    AtlasMultiheadAttention,
    AtlasParameter,
    BlockSpec,
)
from .partitions import MODES, Partition
from .state_dicts import attach_guard, detach_guard
from .task_vectors import TaskVectors

__all__ = ["patch", "unpatch", "is_patched", "coefficients", "save_coefficients", "load_coefficients"]

_STATE = "_atlas_state"
_COEF_FORMAT = "atlas_kernels.coefficients"
BlockFilter = Union[None, str, Iterable[str], Callable[[str, torch.Tensor], bool]]


# ----------------------------------------------------------------------------- patch
def patch(module: nn.Module, task_vectors: TaskVectors, *, partitions: int = 1, partition_mode: str = "contiguous",
          seed: int = 0, backend: str = "auto", blocks: BlockFilter = None,
          group_small_blocks: bool = True, batchnorm: str = "frozen", verify=False,
          linearised: bool = False) -> nn.Module:
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
            ``"triton"`` or ``"cuda"`` (see :class:`~atlas_kernels.grouping.SmallBlockGroup`). The group is
            registered as ``module._atlas_small_blocks`` (on its first member when ``module`` is a
            container such as ``nn.Sequential``; no parameters, nothing in the state dict).
            False: one launch per block. Never built where ``"auto"`` resolves to the torch
            backend (a module on the CPU).
        batchnorm: BatchNorm running statistics are buffers, which task vectors do not adapt.
            ``"frozen"`` (default): every BatchNorm layer with running statistics normalizes with
            theta0's statistics, in train mode too, and never updates them (``.train()`` leaves
            those layers in eval mode until ``unpatch``); coefficient training then sees the same
            function that ``unpatch`` merges. ``"train"``: BatchNorm behaves as usual: batch
            statistics in train mode, running statistics overwritten in place (they persist after
            ``unpatch``).
        verify: ``False`` (default), ``True``, or an example input (a tensor or a tuple of
            positional arguments). When set, one forward of the patched module at random
            coefficients is checked against ``torch.func.functional_call`` of the unpatched module
            with ``theta0 + sum lam tau`` (see :mod:`atlas_kernels._verify`); a mismatch raises.
            ``True`` builds a random image from the module's config (open_clip, Hugging Face and
            timm image towers). Costs three forwards at batch 1 plus composing every adapted block
            once in plain PyTorch, and one composed copy of the adapted parameters while it runs.
            Measured on a shared, loaded 2-core CPU, N = 2: a tiny ViT 0.05 s to patch, 0.7 s with
            verify; ViT-B/32 0.8 s, 30 to 45 s with verify. Hence off by default: turn it on
            once for a new model family, or in a test.
        linearised: the linearised model around theta0 (task vectors in the tangent space):
            ``forward(x)`` returns ``f(x; theta0) + J f(x; theta0) . D(lam)``, primal and tangent
            in one pass (see :mod:`atlas_kernels.linearised`). No small-block grouping; such a module
            cannot be merged by ``unpatch`` (use :func:`atlas_kernels.export_linearised`).

    Tied parameters (one tensor reachable under two names) are adapted once: every owner reads
    the same composed value through one shared :class:`~atlas_kernels.modules.AtlasParameter`
    (one set of coefficients, listed under the first name). Task vectors may name either name, or
    both when they agree.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    if not isinstance(task_vectors, TaskVectors):
        raise TypeError(f"task_vectors must be an atlas_kernels.TaskVectors, got {type(task_vectors).__name__}")
    ops.check_backend(backend)
    if not isinstance(linearised, bool):
        raise TypeError(f"linearised must be True or False, got {linearised!r}")
    if not isinstance(partitions, int) or isinstance(partitions, bool) or partitions < 1:
        raise ValueError(f"partitions must be an integer >= 1, got {partitions!r}")
    if partition_mode not in MODES:
        raise ValueError(f"partition_mode must be one of {MODES}, got {partition_mode!r}")
    if is_patched(module) or _contains_atlas(module):
        raise RuntimeError("this module is already patched by atlas_kernels (patching twice would compose twice); "
                           "call atlas_kernels.unpatch(module) first")

    _check_backend_device(module, backend)
    if batchnorm not in ("frozen", "train"):
        raise ValueError(f"batchnorm must be 'frozen' or 'train', got {batchnorm!r}")
    reference = None
    if linearised and verify is not False and verify is not None:
        raise ValueError("verify= checks the standard composition theta0 + sum lam tau against functional_call; "
                         "it does not apply to linearised=True (the linearised tests compare against torch.func.jvp)")
    if verify is not False and verify is not None:
        from . import _verify

        probe = _verify.probe_input(module, verify)
        reference = _verify.snapshot(module)
    params = dict(module.named_parameters())
    # Tied parameters (one tensor under several names, e.g. GPT-2's lm_head.weight and
    # transformer.wte.weight): named_parameters() lists the first name only; the others are aliases.
    aliases = _tied_aliases(module)
    buffers = _buffers_named(task_vectors, module, params)
    _check_blocks_exist(task_vectors, {**params, **{a: params[c] for a, c in aliases.items()}}, buffers)
    _check_tied_agree(task_vectors, aliases)
    tv_name: Dict[str, str] = {}  # canonical parameter name -> the task vectors' name for it
    for b in _choose_blocks(task_vectors, {**params, **{a: params[c] for a, c in aliases.items()}}, blocks):
        if b not in buffers:
            tv_name.setdefault(aliases.get(b, b), b)
    chosen = list(tv_name)
    for name in chosen:
        _check_block(tv_name[name], params[name], task_vectors)

    specs = {name: task_vectors.block_spec(tv_name[name], Partition.for_block(name, partitions, partition_mode, seed))
             for name in chosen}
    requires_grad = {name: p.requires_grad for name, p in params.items()}

    # Group the blocks by owning module, then swap module by module. A tied block is seen by every
    # owner: each takes the generic path with one shared AtlasParameter (one set of coefficients,
    # the same composed value for every user).
    by_owner: Dict[str, Dict[str, BlockSpec]] = defaultdict(dict)
    tied_owners = set()
    for name, spec in specs.items():
        owner, _, local = name.rpartition(".")
        by_owner[owner][local] = spec
        for alias in (a for a, c in aliases.items() if c == name):
            a_owner, _, a_local = alias.rpartition(".")
            by_owner[a_owner][a_local] = spec
            tied_owners.update((owner, a_owner))
    _promote_out_proj(module, by_owner)
    shared: Dict[int, AtlasParameter] = {}

    for owner_path in sorted(by_owner, key=lambda p: p.count(".") if p else -1):
        owned = by_owner[owner_path]
        owner = module.get_submodule(owner_path) if owner_path else module
        if isinstance(owner, AtlasModule):
            continue  # an out_proj, swapped together with its AtlasMultiheadAttention parent
        parent_path = owner_path.rpartition(".")[0]
        parent = (module.get_submodule(parent_path) if parent_path else module) if owner_path else None
        if owner_path in tied_owners:
            pass  # generic path below
        elif owner_path and isinstance(owner, nn.MultiheadAttention) and AtlasMultiheadAttention.supports(owner):
            out_specs = by_owner.get(_join(owner_path, "out_proj"), {})
            _replace(module, owner_path, AtlasMultiheadAttention(owner, owned, out_specs, backend))
            continue
        elif owner_path and _plain_linear(owner) and not isinstance(parent, nn.MultiheadAttention):
            _replace(module, owner_path, AtlasLinear(owner, owned, backend))
            continue
        # Generic path; also an unsupported MHA's out_proj, whose weight the MHA reads directly.
        for local, spec in owned.items():
            atlas_p = shared.get(id(spec)) or shared.setdefault(id(spec), AtlasParameter(spec, backend))
            parametrize.register_parametrization(owner, local, atlas_p, unsafe=True)

    coef_ids = {id(c) for c in coefficients(module, _check=False).values()}
    for p in module.parameters():
        if id(p) not in coef_ids:
            p.requires_grad_(False)
    if linearised:
        from .linearised.modules import linearise

        linearise(module)
    else:
        # Group only where the backend that "auto" resolves to has a packed op (triton; the compiled
        # extension): the torch backend never uses a group, so none is built for it. A module moved
        # to another device after patching composes block by block there: correct, more launches.
        device = next((p.device for p in module.parameters()), torch.device("cpu"))
        if group_small_blocks and ops.resolve(backend, device) in PACKED_BACKENDS:
            group_small_blocks_of(module)
    attach_guard(module)  # load_state_dict checks every key and shape before copying anything
    frozen_bn = _freeze_batchnorm(module) if batchnorm == "frozen" else []
    setattr(module, _STATE, {
        "n": len(task_vectors), "names": task_vectors.names, "blocks": list(chosen), "partitions": partitions,
        "partition_mode": partition_mode, "seed": seed, "backend": backend, "requires_grad": requires_grad,
        "frozen_bn": frozen_bn,
        "linearised": linearised,
    })
    if reference is not None:
        from . import _verify

        try:
            _verify.check(module, reference, {n: params[n] for n in chosen}, task_vectors, tv_name,
                          coefficients(module, _check=False), {n: specs[n].partition for n in chosen}, probe)
        except Exception:
            unpatch(module)
            raise
    return module


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
        # Look at every missing name, not the first one (which sorts to a text-tower key of a
        # whole-CLIP state dict): a prefix that maps many of them onto the module's names is the hint.
        for p in ("visual.", "module.", "model.", "vision_model.", "model.visual."):
            fits = [b for b in missing if b.startswith(p) and b[len(p):] in params]
            if fits:
                whole = any(not b.startswith(p) for b in missing)
                what = "these look like whole-model task vectors; " if whole else ""
                hint = (f" ({what}{len(fits)} of them are the module's names behind a {p!r} prefix: build the task "
                        f"vectors with prefix={p!r}, or patch the whole model)")
                break
        dotted = [b for b in missing if b.startswith(".") and b[1:] in params]
        if not hint and dotted:
            hint = (f" (names such as {dotted[0]!r} start with a dot: the prefix given when building them lacked its "
                    f"trailing dot; pass e.g. prefix='visual.' rather than prefix='visual')")
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


def _unwrap(module):
    """The module inside ``torch.compile`` (``_orig_mod``), ``DistributedDataParallel`` and
    ``nn.DataParallel`` wrappers (``.module``), so coefficient names are the same for all of them."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    for _ in range(16):
        inner = module.__dict__.get("_modules", {}).get("_orig_mod")
        if isinstance(inner, nn.Module) and type(module).__name__ == "OptimizedModule":
            module = inner
        elif isinstance(module, (DataParallel, DistributedDataParallel)):
            module = module.module
        else:
            break
    return module


def is_patched(module: nn.Module) -> bool:
    return hasattr(_unwrap(module), _STATE)


def _state(module: nn.Module) -> dict:
    module = _unwrap(module)
    if not is_patched(module):
        inside = [path for path, m in module.named_modules() if path and is_patched(m)]
        if inside:
            shown = ", ".join(f"module.{p}" for p in inside[:3])
            raise RuntimeError(f"this module was not patched by atlas_kernels.patch, but {len(inside)} of its "
                               f"submodules were: {shown}; pass that submodule (e.g. "
                               f"atlas_kernels.coefficients(model.{inside[0]}))")
        raise RuntimeError("this module was not patched by atlas_kernels.patch (nothing to do)")
    return getattr(module, _STATE)


# ------------------------------------------------------------------- coefficients
def coefficients(module: nn.Module, _check: bool = True) -> Dict[str, nn.Parameter]:
    """Original parameter name -> its coefficients ``nn.Parameter`` (``(N,)`` or ``(N, K)``).
    A ``torch.compile``, ``DistributedDataParallel`` or ``nn.DataParallel`` wrapper gives the same
    names as the module it wraps."""
    module = _unwrap(module)
    if _check:
        _state(module)
    out: Dict[str, nn.Parameter] = {}
    seen = set()  # a tied block is listed once, under its first name (as named_parameters() does)
    for path, m in module.named_modules():
        if isinstance(m, AtlasModule):
            for local, c in m.adapted_blocks().items():
                out[_join(path, local)] = c
        plist = getattr(m, "parametrizations", None)
        if isinstance(plist, nn.ModuleDict):
            for local, chain in plist.items():
                for p in chain:
                    if isinstance(p, AtlasParameter) and id(p.coef) not in seen:
                        seen.add(id(p.coef))
                        out[_join(path, local)] = p.coef
    return out


# ----------------------------------------------------------------------- unpatch
@torch.no_grad()
def unpatch(module: nn.Module) -> nn.Module:
    """Merge ``theta0 + sum_i lam_i tau_i`` (float32) into plain modules and return ``module``."""
    state = _state(module)
    if state.get("linearised"):
        raise RuntimeError("unpatch cannot merge a linearised module: no plain model equals the linearised one "
                           "(f(x; theta0) + J f(x; theta0) . D); use atlas_kernels.export_linearised(module, path) "
                           "and atlas_kernels.load_linearised(path, model) to evaluate it")
    requires_grad = state["requires_grad"]
    # Validate every coefficient first, so a failure leaves the module patched and whole.
    for name, c in coefficients(module).items():
        if not torch.isfinite(c).all():
            raise ValueError(f"coefficients of block {name!r} hold NaN or inf; refusing to merge them")
    ungroup_small_blocks(module)
    atlas = [(p, m) for p, m in module.named_modules() if isinstance(m, AtlasModule)]
    # Deepest first: an MHA's out_proj hands its merged weights to the original out_proj object,
    # which the original MHA still holds.
    for path, m in sorted(atlas, key=lambda pm: -pm[0].count(".")):
        orig = m._atlas_original
        for name in m.block_names:
            theta0 = m._theta0(name)
            if theta0 is None:
                continue
            value = m.merged(name)
            rg = requires_grad.get(_join(path, name), theta0.requires_grad)
            setattr(orig, name, nn.Parameter(value, requires_grad=rg))
        if isinstance(orig, nn.MultiheadAttention):
            orig.out_proj = m.out_proj._atlas_original if isinstance(m.out_proj, AtlasModule) else m.out_proj
        _replace(module, path, orig)
    merged = {}
    for path, m in list(module.named_modules()):
        plist = getattr(m, "parametrizations", None)
        if not isinstance(plist, nn.ModuleDict):
            continue
        for local in list(plist.keys()):
            chain = plist[local]
            atlas_p = [p for p in chain if isinstance(p, AtlasParameter)]
            if not atlas_p:
                continue
            _own_class(m)
            if id(atlas_p[0]) in merged:  # a tied block, merged already through its first owner
                parametrize.remove_parametrizations(m, local, leave_parametrized=False)
                setattr(m, local, merged[id(atlas_p[0])])
                continue
            value = atlas_p[0].merged_from(chain.original, _join(path, local))
            parametrize.remove_parametrizations(m, local, leave_parametrized=False)
            param = getattr(m, local)
            param.data = value
            merged[id(atlas_p[0])] = param
            param.requires_grad_(requires_grad.get(_join(path, local), True))
    for name, p in module.named_parameters():
        if name in requires_grad:
            p.requires_grad_(requires_grad[name])
    detach_guard(module)
    _unfreeze_batchnorm(module, state.get("frozen_bn", ()))
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
    from ._io import atomic_save_safetensors

    state = _state(module)
    coefs = coefficients(module)
    if not str(path).endswith(".safetensors"):
        warnings.warn(f"save_coefficients writes a safetensors file; {str(path)!r} does not end in .safetensors "
                      f"(it is not a torch.save/pickle file: read it with load_coefficients or safetensors)",
                      stacklevel=2)
    tensors = {}
    for name, c in coefs.items():
        if not torch.isfinite(c).all():
            raise ValueError(f"coefficients of block {name!r} hold NaN or inf; not saving them")
        tensors[name] = c.detach().float().cpu().contiguous()
    meta = {
        "format": _COEF_FORMAT, "version": "1", "n": str(state["n"]), "partitions": str(state["partitions"]),
        "partition_mode": state["partition_mode"], "seed": str(state["seed"]),
        "names": json.dumps(state["names"]), "blocks": json.dumps(sorted(coefs)),
        "linearised": "1" if state.get("linearised") else "0",
    }
    atomic_save_safetensors(tensors, str(path), metadata=meta)


def _names_diff(meta, names, strict: bool):
    """What differs between the file's task-vector names and the module's (see load_coefficients)."""
    raw = meta.get("names")
    try:
        got = json.loads(raw) if raw is not None else None
    except ValueError:
        return [f"its metadata 'names' is not JSON ({raw[:60]!r})"]
    if got is None:
        return ["it names no task vectors (metadata 'names' is missing)"] if strict else []
    if not isinstance(got, list):
        return [f"its metadata 'names' is not a list ({type(got).__name__})"]
    got = [str(n) for n in got]
    if got == names:
        return []
    if len(got) == len(names) and sorted(got) == sorted(names):
        return [f"the task vectors are in another order: file {got}, model {names} (coefficient i belongs to "
                f"task vector i; patch with the file's order, or save again)"]
    if strict:
        return [f"task-vector names differ: file {got}, model {names} (load_coefficients(..., strict=False) "
                f"accepts renamed task vectors, if the order is the same)"]
    if set(got) & set(names) and len(got) == len(names):
        moved = [n for i, n in enumerate(got) if n in names and names.index(n) != i]
        if moved:
            return [f"task vectors {moved} are at other positions: file {got}, model {names}"]
    return []


@torch.no_grad()
def load_coefficients(module: nn.Module, path, *, strict: bool = True) -> nn.Module:
    """Load coefficients written by :func:`save_coefficients`. A file for other blocks, another N or
    K, another partition layout, other task vectors, or holding non-finite values is refused before
    anything is written: nothing is half-loaded.

    The file's task-vector names must equal the patched module's, in the same order (coefficient
    ``i`` belongs to task vector ``i``). ``strict=False`` accepts other names (a renamed task
    vector), never the same names in another order: that would load every coefficient onto the
    wrong task vector."""
    from .checkpoints import check_file, read_safetensors

    state = _state(module)
    coefs = coefficients(module)
    path = str(path)
    check_file(path, "coefficient file")
    meta, loaded = read_safetensors(path)
    if meta.get("format") != _COEF_FORMAT:
        raise ValueError(f"{path!r} is not an atlas_kernels coefficient file (format={meta.get('format')!r})")
    file_lin, model_lin = meta.get("linearised", "0") == "1", bool(state.get("linearised"))
    if file_lin != model_lin:
        mode = {True: "linearised (patch(..., linearised=True))", False: "standard"}
        raise ValueError(f"{path!r} holds coefficients learned by a {mode[file_lin]} model; this module is "
                         f"patched {mode[model_lin]}: the coefficients of one mode mean nothing in the other")
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
    diffs += _names_diff(meta, [str(n) for n in state["names"]], strict)
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
