"""patch / unpatch (coefficients and the coefficient files are re-exported from
:mod:`atlas_kernels._adapted` and :mod:`atlas_kernels.coefficient_files`).

``patch(module, task_vectors)`` swaps, in place:

- ``nn.Linear`` (and subclasses that keep its forward) -> :class:`~atlas_kernels.modules.AtlasLinear`;
- ``nn.MultiheadAttention`` (packed in-projection) -> :class:`~atlas_kernels.modules.AtlasMultiheadAttention`;
- every other adapted parameter (LayerNorm, convolution, embeddings, raw parameters such as
  ``class_embedding``, ``positional_embedding``, ``proj``) -> an
  adopted in place by :class:`~atlas_kernels.modules.AtlasParameter` (its class becomes ``Atlas<Class>``).

Every parameter of the patched module stops requiring gradients; the coefficients are the only
trainable parameters. ``unpatch`` merges ``theta0 + sum_i lam_i tau_i`` (float32) back into plain
modules of the original classes, with the original parameter names and ``requires_grad`` flags.

The flow: check the arguments and the blocks (:mod:`atlas_kernels._patch_guards`); take one
:class:`~atlas_kernels.blocks.BlockSpec` per block from the task vectors; group the specs by owning
module; hand each owner to the class that supports it (``AtlasMultiheadAttention``, ``AtlasLinear``,
else ``AtlasParameter``) through its ``from_module``; freeze, group or linearise; record a
:class:`~atlas_kernels.patch_config.PatchConfig` on the module.
"""
from __future__ import annotations

import warnings
from collections import defaultdict
from typing import Callable, Dict, Iterable, Optional, Union

import torch
import torch.nn as nn

from . import ops
from ._adapted import coefficients, join
from ._checks import all_finite
from ._patch_guards import (
    _buffers_named,
    _check_backend_device,
    _check_block,
    _check_blocks_exist,
    _check_tied_agree,
    _freeze_batchnorm,
    _tied_aliases,
    _unfreeze_batchnorm,
)
from .coefficient_files import load_coefficients, save_coefficients
from .modules import (
    AtlasLinear,
    AtlasModule,
    AtlasMultiheadAttention,
    AtlasParameter,
    BlockSpec,
)
from .partitions import MODES, Partition
from .patch_config import CONFIG_ATTR, RESTORE_ATTR, PatchConfig, is_patched, unwrap
from .plan import Plan, plan_of
from .state_dicts import attach_guard, detach_guard
from .task_vectors import TaskVectors

__all__ = ["patch", "unpatch", "is_patched", "coefficients", "save_coefficients", "load_coefficients",
           "load_linearised",
           "PatchConfig"]

BlockFilter = Union[None, str, Iterable[str], Callable[[str, torch.Tensor], bool]]

# ----------------------------------------------------------------------------- patch
def patch(module: nn.Module, task_vectors: TaskVectors, *, partitions: int = 1, partition_mode: str = "contiguous",
          seed: int = 0, backend: str = "auto", blocks: BlockFilter = None,
          grouped: bool = True, fused_linear="auto", fused_max_m: Optional[int] = None,
          batchnorm: str = "frozen", verify=False, linearised: bool = False,
          group_small_blocks: Optional[bool] = None) -> nn.Module:
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
        backend: ``"auto"`` (decided here, per device, by the rule in ``docs/PERFORMANCE.md``:
            Triton on CUDA; the compiled extension on the CPU when it is built, else torch),
            ``"torch"``, ``"triton"`` or ``"ext"`` (the compiled extension from ``csrc/``; ``"cuda"``
            is its deprecated old name). A backend that cannot run here (Triton on the CPU, the
            extension not built) is refused. The backend that runs is recorded in
            ``PatchConfig.of(module).resolved_backend``.
        blocks: narrow the adapted set: ``None``/``"all"``; ``"weights"`` (blocks of 2 or more
            dimensions: matrices, convolutions and embedding tables); a list of block names; or a
            predicate ``f(name, parameter) -> bool``.
        grouped: compose every dense block of the tower in one pass before each eager forward and
            reduce every coefficient gradient in one pass in backward (on the Triton backend: one
            launch, and two; see :mod:`atlas_kernels.plan`). False: each module composes its own
            blocks (one launch per block, the path ``torch.compile`` always takes).
        fused_linear: ``"auto"`` (default: the backend's measured rule; the compiled extension on the
            CPU takes its fused linear for large weights), True (every dense linear weight runs its
            backend's own linear op: on Triton the tile-fused GEMMs at ``M <= fused_max_m`` rows,
            where neither the composed weight nor its gradient is ever in memory), False (never).
        fused_max_m: the row count up to which the Triton fused GEMMs run (default
            :data:`atlas_kernels.ops.triton_backend.FUSED_MAX_M`).
        group_small_blocks: the old name of ``grouped`` (deprecated).
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
            On a CPU that is tens of seconds for a ViT-B/32 (a fraction of a second for a tiny
            tower). Hence off by default: turn it on once for a new model family, or in a test.
        linearised: the linearised model around theta0 (task vectors in the tangent space):
            ``forward(x)`` returns ``f(x; theta0) + J f(x; theta0) . D(lam)``, primal and tangent
            in one pass (see :mod:`atlas_kernels.linearised`). No grouping; such a module cannot be
            merged by ``unpatch`` (use :func:`atlas_kernels.export_linearised`).

    Tied parameters (one tensor reachable under two names) are adapted once: every owner reads
    the same composed value (one set of coefficients, held by the first owner and listed under
    the first name). Task vectors may name either name, or both when they agree.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    if not isinstance(task_vectors, TaskVectors):
        raise TypeError(f"task_vectors must be an atlas_kernels.TaskVectors, got {type(task_vectors).__name__}")
    backend = ops.check_backend(backend)
    if group_small_blocks is not None:
        warnings.warn("patch(group_small_blocks=...) is deprecated: every dense block is grouped now; use grouped=",
                      DeprecationWarning, stacklevel=2)
        grouped = bool(group_small_blocks)
    if not isinstance(grouped, bool):
        raise TypeError(f"grouped must be True or False, got {grouped!r}")
    if fused_linear not in (True, False, "auto"):
        raise ValueError(f"fused_linear must be True, False or 'auto', got {fused_linear!r}")
    if fused_max_m is not None and (not isinstance(fused_max_m, int) or isinstance(fused_max_m, bool)
                                    or fused_max_m < 0):
        raise ValueError(f"fused_max_m must be an integer >= 0 or None, got {fused_max_m!r}")
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
    _check_backend_available(module, backend)
    if batchnorm not in ("frozen", "train"):
        raise ValueError(f"batchnorm must be 'frozen' or 'train', got {batchnorm!r}")
    reference = None
    if linearised and verify is not False and verify is not None:
        raise ValueError("verify= checks the standard composition theta0 + sum lam tau against functional_call; "
                         "it does not apply to linearised=True (the linearised tests compare against torch.func.jvp)")
    if task_vectors.sharding is not None and verify is not False and verify is not None:
        raise ValueError("verify= composes every block whole in one process; it does not apply to task vectors "
                         "loaded as one process's rows (TaskVectors.load_shard): verify a single-process patch")
    if verify is not False and verify is not None:
        from . import _verify

        probe = _verify.probe_input(module, verify)
        reference = _verify.snapshot(module)
    params = dict(module.named_parameters())
    # Tied parameters (one tensor under several names, e.g. GPT-2's lm_head.weight and
    # transformer.wte.weight): named_parameters() lists the first name only; the others are aliases.
    aliases = _tied_aliases(module)
    tv_name = _resolve_blocks(module, task_vectors, params, aliases, blocks)
    chosen = list(tv_name)
    small = [(n, params[n].numel()) for n in chosen if params[n].numel() < partitions]
    if small:
        n, numel = min(small, key=lambda x: x[1])
        raise ValueError(f"partitions={partitions} but block {n!r} has only {numel} element(s) ({len(small)} block(s) "
                         f"are smaller than K): some of its K coefficients would own no element and never train. Use "
                         f"partitions <= {numel}, or leave such blocks out with blocks=...")
    specs = {name: task_vectors.block_spec(tv_name[name], Partition.for_block(name, partitions, partition_mode, seed))
             for name in chosen}
    if task_vectors.sharding is not None:  # refused now, before anything is swapped
        from .sharding import check_shardable, resolve_group

        _, rank, world = resolve_group(task_vectors.sharding.group)
        check_shardable({n: tuple(params[n].shape) for n in chosen}, partitions=partitions, linearised=linearised,
                        world=world, rank=rank, uneven="pad", tv_layout=task_vectors.sharding)
        from .sharding import _check_no_wrappers

        _check_no_wrappers(module)
    requires_grad = {name: p.requires_grad for name, p in params.items()}
    _swap(module, *_specs_by_owner(module, specs, aliases), backend,
          {id(spec): tuple(name.rpartition(".")[::2]) for name, spec in specs.items()})

    coef_ids = {id(c) for c in coefficients(module, _check=False).values()}
    for p in module.parameters():
        if id(p) not in coef_ids:
            p.requires_grad_(False)
    if linearised:
        from .linearised.modules import linearise

        linearise(module)
    attach_guard(module)  # load_state_dict checks every key and shape before copying anything
    frozen_bn = _freeze_batchnorm(module) if batchnorm == "frozen" else []
    setattr(module, CONFIG_ATTR, PatchConfig(
        names=task_vectors.names, blocks=chosen, partitions=partitions, partition_mode=partition_mode, seed=seed,
        backend=backend, grouped=grouped, fused_linear=fused_linear, fused_max_m=fused_max_m, batchnorm=batchnorm,
        linearised=linearised))
    layout = task_vectors.sharding
    if layout is not None:  # this process's rows (TaskVectors.load_shard): a sharded plan
        from .sharding import _shard_patched, resolve_group

        group, rank, world = resolve_group(layout.group)
        _shard_patched(module, getattr(module, CONFIG_ATTR), group, rank, world, units="auto", reshard=True,
                       uneven="pad", sliced=True, tv_layout=layout)
    else:
        Plan(module, backend=backend, grouped=grouped, fused_linear=fused_linear, fused_max_m=fused_max_m,
             linearised=linearised).build().attach()
    setattr(module, RESTORE_ATTR, {"requires_grad": requires_grad, "frozen_bn": frozen_bn})
    if reference is not None:
        from . import _verify

        try:
            _verify.check(module, reference, {n: params[n] for n in chosen}, task_vectors, tv_name,
                          coefficients(module, _check=False), {n: specs[n].partition for n in chosen}, probe)
        except Exception:
            unpatch(module)
            raise
    return module


def _resolve_blocks(module: nn.Module, tvs: TaskVectors, params, aliases: Dict[str, str],
                    blocks: BlockFilter) -> Dict[str, str]:
    """The blocks to adapt: canonical parameter name -> the task vectors' name for it (either name
    of a tied tensor), checked against the module (names, shapes, dtypes, devices, tied agreement)."""
    named = {**params, **{a: params[c] for a, c in aliases.items()}}
    buffers = _buffers_named(tvs, module, params)
    _check_blocks_exist(tvs, named, buffers)
    _check_tied_agree(tvs, aliases)
    tv_name: Dict[str, str] = {}
    for b in _choose_blocks(tvs, named, blocks):
        if b not in buffers:
            tv_name.setdefault(aliases.get(b, b), b)
    for name, b in tv_name.items():
        _check_block(b, params[name], tvs)
    return tv_name


def _specs_by_owner(root: nn.Module, specs: Dict[str, BlockSpec], aliases: Dict[str, str]):
    """``(by_owner, tied_owners)``: owner path -> {local name -> spec}, every name of a tied block
    included (each owner holds the same spec), and the owners of tied blocks."""
    by_owner: Dict[str, Dict[str, BlockSpec]] = defaultdict(dict)
    tied_owners = set()
    for name, spec in specs.items():
        owner, _, local = name.rpartition(".")
        by_owner[owner][local] = spec
        for alias in (a for a, c in aliases.items() if c == name):
            a_owner, _, a_local = alias.rpartition(".")
            by_owner[a_owner][a_local] = spec
            tied_owners.update((owner, a_owner))
    _promote_out_proj(root, by_owner)
    return by_owner, tied_owners


def _swap_class(owner: nn.Module, parent: Optional[nn.Module], tied: bool):
    """Which class takes ``owner``'s blocks (torchao's ``module_filter_fn``: the class's ``supports``,
    then its ``from_module`` as ``from_float``). :class:`AtlasParameter` (in place) for the root, which
    cannot be swapped; for an owner of a tied block, which shares it with other owners; and for a
    linear inside an attention module, whose weight the attention module reads directly."""
    if parent is None or tied:
        return AtlasParameter
    if AtlasMultiheadAttention.supports(owner):
        return AtlasMultiheadAttention
    if AtlasLinear.supports(owner) and not isinstance(parent, nn.MultiheadAttention):
        return AtlasLinear
    return AtlasParameter


def _swap(root: nn.Module, by_owner: Dict[str, Dict[str, BlockSpec]], tied_owners, backend: str,
          primary: Dict[int, tuple]) -> None:
    """Swap or adopt every owner of ``by_owner``, shallowest first, so that an attention module takes
    its out-projection's blocks along. ``primary``: ``id(spec)`` -> ``(owner path, local name)`` of
    the block's canonical name; a tied block's other owners read it from there."""
    generic = []
    for owner_path in sorted(by_owner, key=lambda p: p.count(".") if p else -1):
        owned = by_owner[owner_path]
        owner = root.get_submodule(owner_path) if owner_path else root
        if isinstance(owner, AtlasModule):
            continue  # an out_proj, swapped together with its AtlasMultiheadAttention parent
        parent_path = owner_path.rpartition(".")[0]
        parent = (root.get_submodule(parent_path) if parent_path else root) if owner_path else None
        cls = _swap_class(owner, parent, owner_path in tied_owners)
        if cls is AtlasParameter:
            generic.append((owner_path, owner, owned))
            continue
        if cls is AtlasMultiheadAttention:  # its out-projection's blocks go with it
            out_proj = by_owner.get(join(owner_path, "out_proj"), {})
            owned = {**owned, **{f"out_proj.{k}": spec for k, spec in out_proj.items()}}
        _replace(root, owner_path, cls.from_module(owner, owned, backend))
    holders = {}  # id(spec) -> (owner, local name) holding the block
    for owner_path, owner, owned in generic:
        mine = {local: spec for local, spec in owned.items() if primary[id(spec)] == (owner_path, local)}
        if mine:
            AtlasParameter.adopt(owner, mine, backend)
            holders.update({id(spec): (owner, local) for local, spec in mine.items()})
    for owner_path, owner, owned in generic:
        tied = {local: holders[id(spec)] for local, spec in owned.items() if primary[id(spec)] != (owner_path, local)}
        if tied:
            AtlasParameter.adopt(owner, {}, backend, aliases=tied)


def _promote_out_proj(root: nn.Module, by_owner) -> None:
    """An MHA reads ``out_proj.weight`` directly, so a task vector on its out_proj needs the whole MHA
    swapped (with no in-projection blocks if none are named)."""
    for path in list(by_owner):
        parent, _, last = path.rpartition(".")
        if last == "out_proj" and path:
            owner = root.get_submodule(parent) if parent else root
            if AtlasMultiheadAttention.supports(owner):
                by_owner.setdefault(parent, {})


def _replace(root: nn.Module, path: str, new: nn.Module) -> None:
    if not path:
        raise ValueError("cannot swap the root module itself; patch its parent, or wrap it")
    parent, _, last = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, last, new)


def _check_backend_available(module: nn.Module, backend: str) -> None:
    """An explicit backend that cannot run the module's tensors here is refused now, saying why (the
    extension not built, Triton on the CPU), not at the first forward."""
    if backend == "auto":
        return
    devices = {p.device for p in module.parameters()} or {torch.device("cpu")}
    for dev in sorted(devices, key=str):
        why = ops.unavailable(backend, dev)
        if why is not None:
            raise ValueError(f"backend={backend!r} cannot run this module's {dev} tensors: {why}")


def _contains_atlas(module: nn.Module) -> bool:
    for m in module.modules():
        if isinstance(m, (AtlasModule, AtlasParameter)) or hasattr(m, CONFIG_ATTR):
            return True
    return False


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


# ----------------------------------------------------------------------- unpatch
@torch.no_grad()
def unpatch(module: nn.Module) -> nn.Module:
    """Merge ``theta0 + sum_i lam_i tau_i`` (float32) into plain modules and return ``module``
    (a ``torch.compile``/DDP/DataParallel wrapper is returned as given, the module inside unpatched)."""
    wrapper, config = module, PatchConfig.of(module)
    if config.linearised:
        raise RuntimeError("unpatch cannot merge a linearised module: no plain model equals the linearised one "
                           "(f(x; theta0) + J f(x; theta0) . D); use atlas_kernels.export_linearised(module, path) "
                           "and atlas_kernels.load_linearised(path, model) to evaluate it")
    # Work on the module inside a wrapper: its names are the ones requires_grad was recorded under,
    # and it holds the config.
    module = unwrap(module)
    restore = getattr(module, RESTORE_ATTR)
    requires_grad = restore["requires_grad"]
    # Validate every coefficient first, so a failure leaves the module patched and whole.
    for name, c in coefficients(module).items():
        if not all_finite(c):
            raise ValueError(f"coefficients of block {name!r} hold NaN or inf; refusing to merge them")
    plan = plan_of(module)
    if getattr(plan, "sharded", False):
        plan.prepare_unpatch()  # every block merged from the local rows and all-gathered (a collective)
    if plan is not None:
        plan.detach()
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
            rg = requires_grad.get(join(path, name), theta0.requires_grad)
            setattr(orig, name, nn.Parameter(value, requires_grad=rg))
        if isinstance(orig, nn.MultiheadAttention):
            orig.out_proj = m.out_proj._atlas_original if isinstance(m.out_proj, AtlasModule) else m.out_proj
        _replace(module, path, orig)
    generic = [(p, m) for p, m in module.named_modules() if isinstance(m, AtlasParameter)]
    merged = {}  # id(theta0) of a block -> (merged value, requires_grad); tied owners share one entry
    for path, m in generic:
        for name in m._atlas_parts:
            merged[id(m._buffers[name])] = (m._atlas_merged(name), requires_grad.get(join(path, name), True))
    per_owner = []
    for path, m in generic:
        blocks = {name: merged[id(m._buffers[name])] for name in m._atlas_parts}
        blocks.update({name: merged[id(owner._buffers[other])] for name, (owner, other) in m._atlas_alias.items()})
        per_owner.append((m, blocks))
    for m, blocks in per_owner:
        originals = AtlasParameter.release(m)
        for name, (value, rg) in blocks.items():
            param = originals.get(name)  # the original Parameter object (shared by tied owners)
            if param is None:
                param = nn.Parameter(value)
            param.data = value
            param.requires_grad_(rg)
            m.register_parameter(name, param)
    for name, p in module.named_parameters():
        if name in requires_grad:
            p.requires_grad_(requires_grad[name])
    detach_guard(module)
    _unfreeze_batchnorm(module, restore["frozen_bn"])
    delattr(module, CONFIG_ATTR)
    delattr(module, RESTORE_ATTR)
    return wrapper


def load_linearised(path, module: nn.Module, *, backend: str = "auto") -> nn.Module:
    """Rebuild the linearised model written by :func:`atlas_kernels.export_linearised` on ``module``:
    a plain module of the same architecture (for an open_clip tower: ``create_model(name,
    pretrained=None).visual``), on the device it should run on. Returns ``module``, patched
    linearised, every coefficient 1 and frozen (inference: one forward-mode pass, no training graph).
    The file is read and checked by :func:`atlas_kernels.linearised.export.read_linearised`."""
    from .linearised.export import read_linearised

    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    if is_patched(module):
        raise RuntimeError("load_linearised needs a plain module; this one is already patched")
    theta0, deltas = read_linearised(path, module)
    with torch.no_grad():
        module.load_state_dict(theta0, strict=True)
    device = next(iter(module.parameters())).device
    tvs = TaskVectors({k: d[None] for k, d in deltas.items()}, names=["linearised"]).to(device)
    patch(module, tvs, backend=backend, linearised=True)
    with torch.no_grad():
        for c in coefficients(module).values():
            c.fill_(1.0)
            c.requires_grad_(False)
    return module
