"""Task vectors sharded over processes: :func:`shard`, and the plan of a sharded tower.

Every rank of a process group holds 1/W of each adapted block: the rows ``[lo, hi)`` of its dim 0
(theta0's rows, the same rows of every task vector's slab in its storage dtype, of the int8/fp8
per-row scales, and of LoRA's ``B``; LoRA's ``A`` is whole, see below). The coefficients are
whole and replicated. Per forward, each *unit* (the patched root, and each layer of the tower:
by default every element of a ``ModuleList`` that holds adapted blocks, as one calls
``fully_shard`` per transformer layer) is

1. composed from the local rows only, every block of the unit in one grouped pass over the local
   slabs (the backend's ``compose_group``: one launch on the Triton backend), in the compute dtype;
2. all-gathered (one collective per unit and dtype) and copied out into whole blocks, which the
   modules read as they read the plan's grouped values (:meth:`ShardedPlan.value`);
3. released after the unit's forward (``reshard_after_forward``): autograd keeps no reference to a
   gathered block (saved-tensor hooks keep a token), and backward gathers the unit again when it
   first needs one (the local compose and the all-gather once more; the coefficients have not
   changed).

In backward, each unit's gathered-block gradients ``G`` are reduce-scattered in float32 (float64
for float64 blocks; a few blocks at a time, :data:`RS_CHUNK` elements), so each rank holds the sum
over ranks of its rows of ``G``; each rank reduces ``<G_rows, tau_rows>`` for every coefficient
(the backend's ``coef_grad_group``), and the coefficient gradients (N x K numbers per block) are
summed over the ranks with one all-reduce per unit. Each rank's batch is its own (data parallel):
the summed coefficient gradient is the gradient of the sum of the ranks' losses, as a single
process on the whole batch computes it. :class:`ShardedCompose` is that autograd function;
:class:`ShardedPlan` is "one more kind of plan" (:class:`atlas_kernels.plan.Plan`).

Why a helper of our own rather than FSDP2's ``fully_shard`` on the patched module (the design
decision of issue 23): FSDP2 shards ``nn.Parameter`` s and all-gathers them as they are stored. A
sharded aTLAS block is not a parameter: its state is theta0 plus N slabs (plus scales), its
all-gathered value is a *function* of those shards and of the replicated coefficients, and its
gradient must reach the coefficients, not the shards. The torchao-style route (a tensor subclass
whose ``fsdp_pre_all_gather`` composes the local rows so that FSDP2 all-gathers the composed shard)
can do the forward, but then (1) FSDP2 reduce-scatters the block gradient into a float32 ``.grad``
of the frozen theta0 shard (theta0/W of memory nobody wants, which the optimizer must be kept away
from) and the coefficient gradients have to be computed in a hook after it, outside autograd;
(2) ``fully_shard`` would shard the coefficients themselves unless every one is listed in
``ignored_params``; (3) it composes one parameter at a time, where a unit's blocks here are
composed in one grouped pass; (4) the subclass hooks' signatures differ between the torch versions
this library runs on (2.11 and 2.14). So: ``ak.shard(module, mesh)`` (or loading the task vectors
with :meth:`~atlas_kernels.TaskVectors.load_shard` and patching with them) takes the same
``DeviceMesh`` as ``fully_shard`` and reads like it; it composes with FSDP2 for the rest of a
model: ``fully_shard`` other submodules (the frozen parameters a task-vector set does not name),
passing ``ignored_params=set(ak.coefficients(tower).values())`` where a ``fully_shard`` call
covers the tower. Wrapping a sharded module in DDP is refused (DDP would sum the already summed
coefficient gradients and broadcast rank 0's shards over the others').

LoRA blocks: ``B [N, out, r]`` is split by rows with theta0 (the row shard of ``B A`` is
``B[rows] A``); ``A [N, r, in]`` stays whole on every rank: it is the input side of every row
(splitting it would split the block by columns, which theta0's and the scales' row shards do not
match), and it is small (``N r in`` against theta0's ``out in / W``).

Uneven blocks: a block of ``R`` rows is cut into ``W`` shards of ``ceil(R / W)`` rows; the last
shards are padded with zero rows (a zero row of theta0 and of every slab composes to zero and its
gradient reduces to zero), as FSDP2 pads its dim-0 shards. ``shard(..., uneven="error")`` refuses
such a block instead, naming it. A block of no dimensions (a scalar parameter) cannot be split by
rows and is refused. Partitions (``partitions > 1``) are not sharded: the part of an element
depends on its index in the whole block.

Rules of use: every forward of a sharded module is a collective (every rank runs it, in the same
order, with batches of the same structure); so is reading a block's value outside a forward
(``model.lm_head.weight``), ``unpatch`` (each block is merged from the local rows and
all-gathered), and :meth:`~atlas_kernels.TaskVectors.load_shard`. ``torch.compile`` of a sharded
module is refused. The state dict of a sharded module holds this rank's (padded) rows of theta0.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from . import ops
from .grouping import BlockGroup, Entry
from .ops.lora import lora_compose
from .plan import PLAN_ATTR, Plan, plan_of

__all__ = ["shard", "ShardedPlan", "ShardedCompose", "Rows", "rows_of", "resolve_group", "is_sharded"]

UNEVEN = ("pad", "error")
# Elements of whole blocks reduce-scattered at once in backward (float32: 256 MiB of send buffer),
# unless one block is larger.
RS_CHUNK = 1 << 26


# ----------------------------------------------------------------------------------------- groups
def resolve_group(mesh=None):
    """``(group, rank, world)`` of a ``DeviceMesh`` (one dimension: FSDP2's data-parallel mesh), a
    ``ProcessGroup``, or None (the default group). torch.distributed must be initialised."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("sharding needs torch.distributed initialised (run under torchrun and call "
                           "torch.distributed.init_process_group, or init_device_mesh, first)")
    group = mesh
    if mesh is not None and hasattr(mesh, "get_group"):  # a DeviceMesh
        if getattr(mesh, "ndim", 1) != 1:
            raise ValueError(f"mesh: shard takes a 1-D DeviceMesh (the data-parallel dimension), got {mesh.ndim} "
                             f"dimensions; pass mesh['dp'] (its data-parallel dimension)")
        group = mesh.get_group()
    elif mesh is not None and not isinstance(mesh, dist.ProcessGroup):
        raise TypeError(f"mesh must be a torch.distributed DeviceMesh, a ProcessGroup or None, got "
                        f"{type(mesh).__name__}")
    return group, dist.get_rank(group), dist.get_world_size(group)


def comm_device(group) -> torch.device:
    """Where a small tensor for a collective of ``group`` lives: the current CUDA device for nccl,
    else the CPU."""
    import torch.distributed as dist

    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_gather(out: torch.Tensor, inp: torch.Tensor, group) -> None:
    import torch.distributed as dist

    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # 2.14 renamed it
    fn(out, inp, group=group)


def _reduce_scatter(out: torch.Tensor, inp: torch.Tensor, group) -> None:
    import torch.distributed as dist

    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    fn(out, inp, group=group)


def _all_reduce(t: torch.Tensor, group, op=None) -> None:
    import torch.distributed as dist

    dist.all_reduce(t, op=dist.ReduceOp.SUM if op is None else op, group=group)


# ------------------------------------------------------------------------------------------- rows
@dataclass(frozen=True)
class Rows:
    """The rows of a block of ``total`` rows that ``rank`` of ``world`` holds: ``[lo, hi)`` of the
    block, stored as ``per = ceil(total / world)`` rows, the last ``pad`` of them zeros."""

    total: int
    per: int
    rank: int
    world: int

    @property
    def lo(self) -> int:
        return min(self.rank * self.per, self.total)

    @property
    def hi(self) -> int:
        return min(self.lo + self.per, self.total)

    @property
    def pad(self) -> int:
        return self.per - (self.hi - self.lo)


def rows_of(total: int, rank: int, world: int) -> Rows:
    return Rows(int(total), max(1, -(-int(total) // world)), rank, world)


def take_rows(t: torch.Tensor, dim: int, rows: Rows, fill: float = 0.0) -> torch.Tensor:
    """Rows ``[lo, hi)`` of ``t`` along ``dim``, padded with ``fill`` to ``per`` rows: a new
    contiguous tensor (the whole ``t`` is not kept alive by it)."""
    part = t.narrow(dim, rows.lo, rows.hi - rows.lo)
    if not rows.pad:
        # the whole tensor (one process) stays as it is; a part is copied, or its view would keep the whole alive
        return part.contiguous() if part.numel() == t.numel() else part.clone(memory_format=torch.contiguous_format)
    shape = list(t.shape)
    shape[dim] = rows.pad
    return torch.cat([part, torch.full(shape, fill, dtype=t.dtype, device=t.device)], dim=dim)


def check_uneven(name: str, total: int, world: int, uneven: str) -> None:
    if uneven not in UNEVEN:
        raise ValueError(f"uneven must be one of {UNEVEN}, got {uneven!r}")
    if total % world and uneven == "error":
        raise ValueError(f"block {name!r} has {total} rows, which {world} processes do not divide "
                         f"(uneven='error'); with uneven='pad' (the default) each process holds "
                         f"{-(-total // world)} rows, the last ones padded with zero rows")


def is_sharded(module: nn.Module) -> bool:
    return isinstance(plan_of(module), ShardedPlan)


# ------------------------------------------------------------------------------------------ guards
class _NoDDP:
    """Put where DistributedDataParallel looks for the names to ignore: building a DDP around a
    sharded module raises, saying why, before DDP broadcasts rank 0's shards over the others'."""

    MSG = ("this module's task vectors are sharded by atlas_kernels.shard: its coefficient gradients are "
           "already summed over the processes in backward, and each process holds other rows of theta0 and of "
           "the task vectors. DistributedDataParallel would sum the gradients again and broadcast rank 0's rows "
           "over the others'. Use the sharded module as it is (each process feeds its own batch; call "
           "optimizer.step() on the coefficients), without DDP")

    def __iter__(self):
        raise RuntimeError(self.MSG)


DDP_ATTR = "_ddp_params_and_buffers_to_ignore"


def _check_no_wrappers(module: nn.Module) -> None:
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(module, DistributedDataParallel):
        raise RuntimeError("shard(): the module is wrapped in DistributedDataParallel; shard the module inside "
                           "(module.module) and do not wrap it: " + _NoDDP.MSG)
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        FSDPModule = ()
    from torch.distributed.tensor import DTensor

    if isinstance(module, FSDPModule) or any(isinstance(p, DTensor) for p in module.parameters()):
        raise RuntimeError("shard(): fully_shard (FSDP2) already manages this module's parameters; shard the "
                           "patched tower first, then fully_shard the rest of the model with "
                           "ignored_params=set(atlas_kernels.coefficients(tower).values())")


# ------------------------------------------------------------------------------------------- shard
def shard(module: nn.Module, mesh=None, *, units="auto", reshard_after_forward: bool = True,
          uneven: str = "pad") -> nn.Module:
    """Shard a patched module's theta0 and task vectors over the processes of ``mesh`` (see the
    module docstring); returns ``module``. Every rank calls it, with the same arguments.

    The coefficient gradients are summed over the processes (the gradient of the sum of their
    losses), not averaged as DDP and ``fully_shard`` do: divide each process's loss by the world
    size (or sum its samples and divide by the global batch) for the global batch's mean.

    Args:
        module: a module patched by :func:`atlas_kernels.patch` with whole task vectors (every
            rank then keeps its rows and frees the rest). To never hold the whole set, load each
            rank's rows with :meth:`~atlas_kernels.TaskVectors.load_shard` and ``patch`` with them:
            that patch is sharded already (a second ``shard`` call is a no-op).
        mesh: a 1-D ``DeviceMesh`` (as ``fully_shard`` takes), a ``ProcessGroup``, or None (the
            default group).
        units: which submodules gather their blocks together: ``"auto"`` (each element of a
            ``ModuleList`` holding adapted blocks: a tower's layers; the rest with the root),
            ``"root"`` (the whole module at once, never released before backward), or a list of
            submodule paths.
        reshard_after_forward: release a unit's gathered blocks after its forward and gather them
            again in backward (memory: one unit's blocks at a time, plus the root's); False keeps
            every gathered block from its forward to the backward (no second gather).
        uneven: ``"pad"`` (default: a block whose rows the world size does not divide gets zero
            rows of padding) or ``"error"`` (refuse such a block).
    """
    from .patch_config import PatchConfig, unwrap

    if unwrap(module) is not module:
        _check_no_wrappers(module)
    config = PatchConfig.of(module)
    group, rank, world = resolve_group(mesh)
    plan = plan_of(module)
    if isinstance(plan, ShardedPlan):
        if plan.world != world or plan.rank != rank:
            raise RuntimeError(f"this module is already sharded over {plan.world} processes (this is rank "
                               f"{plan.rank}); the mesh given has {world} (rank {rank})")
        if (plan.unit_spec, plan.reshard) != (units, reshard_after_forward):  # the same shards, planned anew
            plan.unit_spec, plan.reshard, plan.stale = units, reshard_after_forward, True
            plan.build()
        return module
    _shard_patched(module, config, group, rank, world, units=units, reshard=reshard_after_forward, uneven=uneven,
                   sliced=False)
    return module


def check_shardable(shapes: Dict[str, tuple], *, partitions: int, linearised: bool, world: int, rank: int,
                    uneven: str = "pad", tv_layout=None) -> None:
    """Refuse, before anything changes, what cannot be sharded: a linearised module, partitions,
    blocks of no dimensions, uneven rows with ``uneven="error"``, task vectors read for another
    rank or world size."""
    if linearised:
        raise ValueError("shard(): a linearised module (forward-mode tangents) is not sharded")
    if partitions > 1:
        raise ValueError(f"shard(): partitions={partitions} are not sharded (the part of an element depends on "
                         f"its index in the whole block); shard with partitions=1")
    if tv_layout is not None and (tv_layout.world, tv_layout.rank) != (world, rank):
        raise ValueError(f"the task vectors were loaded as shard {tv_layout.rank} of {tv_layout.world} "
                         f"(TaskVectors.load_shard), but this process is rank {rank} of {world} in the mesh given: "
                         f"load them with the same mesh")
    for name, shape in shapes.items():
        if len(shape) == 0:
            raise ValueError(f"block {name!r} has no dimensions (a scalar parameter) and cannot be split by rows: "
                             f"leave it out of the sharded set (patch(..., blocks=...))")
        check_uneven(name, shape[0], world, uneven)


def _owners(root: nn.Module):
    from .modules import _BlockHolder

    for path, m in root.named_modules():
        if isinstance(m, _BlockHolder):
            yield path, m


def _shard_patched(root: nn.Module, config, group, rank: int, world: int, *, units, reshard: bool, uneven: str,
                   sliced: bool, tv_layout=None) -> None:
    """Cut every adapted block of a patched ``root`` to this rank's rows (``sliced``: the slabs
    are this rank's rows already, from :meth:`TaskVectors.load_shard`; only theta0 is cut), free
    the whole tensors the original modules still hold, and put a :class:`ShardedPlan` in place of
    the plan."""
    _check_no_wrappers(root)
    holders = list(_owners(root))
    check_shardable({f"{path}.{name}".lstrip("."): tuple(m._buffers[name].shape)
                     for path, m in holders for name in m._atlas_parts},
                    partitions=config.partitions, linearised=config.linearised, world=world, rank=rank,
                    uneven=uneven, tv_layout=tv_layout)
    stats = []  # per block: what the coefficient files' fingerprint needs, reduced over the ranks below
    with torch.no_grad():
        for path, m in holders:
            meta = m.__dict__.setdefault("_atlas_shard", {})
            for name in m._atlas_parts:
                b = m._buffers
                theta0 = b[name]
                rows = rows_of(theta0.shape[0], rank, world)
                meta[name] = rows
                b[name] = take_rows(theta0, 0, rows)
                if not sliced:
                    if b[name + "_tau"] is not None:
                        b[name + "_tau"] = take_rows(b[name + "_tau"], 1, rows)
                        if b[name + "_scale"] is not None and theta0.dim() >= 2:
                            b[name + "_scale"] = take_rows(b[name + "_scale"], 1, rows, fill=1.0)
                    if b[name + "_lora_b"] is not None:
                        b[name + "_lora_b"] = take_rows(b[name + "_lora_b"], 1, rows)
                _release_original(m, name, theta0)
                stats.append((f"{path}.{name}".lstrip("."), m, name, tuple(theta0.shape)))
    fingerprint = _fingerprint(stats, group)
    old = plan_of(root)
    if old is not None:
        old.detach()
    plan = ShardedPlan(root, group=group, rank=rank, world=world, units=units, reshard=reshard,
                       backend=config.backend)
    plan.fingerprint = fingerprint
    plan.build().attach()


def _release_original(m: nn.Module, name: str, theta0: torch.Tensor) -> None:
    """The original module (kept for ``unpatch``) still holds the whole block: empty it (unpatch
    gives it the merged, all-gathered value)."""
    orig = m.__dict__.get("_atlas_original")
    if orig is not None:
        p = orig._parameters.get(name)
        if p is not None:
            p.data = torch.empty(0, dtype=p.dtype, device=p.device)
    originals = m.__dict__.get("_atlas_orig_params")
    if originals is not None and originals.get(name) is not None:
        p = originals[name]
        p.data = torch.empty(0, dtype=p.dtype, device=p.device)


@torch.no_grad()
def _fingerprint(stats, group) -> dict:
    """``{"shapes", "theta0_norms", "tv_norms"}`` as :func:`atlas_kernels.coefficient_files.fingerprint`
    computes them on the whole blocks, from the local rows: sums of squares (and LoRA's ``B^T B``)
    summed over the ranks in one all-reduce. Padding rows are zero and add nothing."""
    from .storage import scale_rows

    parts, layout = [], []
    for key, m, name, shape in stats:
        blk = m._atlas_block(name)
        coef = m._parameters[name + "_coef"]
        n = coef.shape[0]
        held = list(range(n)) if blk.index is None else [int(i) for i in blk.index]
        theta0 = blk.theta0.double()
        parts.append(theta0.pow(2).sum().reshape(1))
        if blk.lora is not None:
            a, bb = blk.lora[0].double(), blk.lora[1].double()
            gram = bb.transpose(1, 2) @ bb  # [n_held, r, r]: B^T B over this rank's rows
            parts.append(gram.reshape(-1))
            layout.append((key, shape, n, held, ("lora", a, gram.shape)))
        else:
            t = blk.tau.double()
            if blk.scale is not None:
                t = t.reshape(t.shape[0], scale_rows(t.shape[1:]), -1) * blk.scale.double()[:, :, None]
            parts.append(t.reshape(t.shape[0], -1).pow(2).sum(1))
            layout.append((key, shape, n, held, ("dense", t.shape[0])))
    flat = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64, device=comm_device(group))
    _all_reduce(flat, group)
    shapes, t_norms, tv_norms = {}, {}, {}
    off = 0
    for key, shape, n, held, kind in layout:
        shapes[key] = list(shape)
        t_norms[key] = float(flat[off].clamp_min(0).sqrt())
        off += 1
        norms = [0.0] * n
        if kind[0] == "lora":
            a, gshape = kind[1], kind[2]
            gram = flat[off:off + math.prod(gshape)].reshape(gshape)
            off += gram.numel()
            vals = ((a @ a.transpose(1, 2)) * gram).sum((1, 2)).clamp_min(0).sqrt()
        else:
            vals = flat[off:off + kind[1]].clamp_min(0).sqrt()
            off += kind[1]
        for j, i in enumerate(held):
            norms[i] = float(vals[j])
        tv_norms[key] = norms
    return {"shapes": shapes, "theta0_norms": t_norms, "tv_norms": tv_norms}


# ------------------------------------------------------------------------------------------- units
class _SEntry:
    """One sharded block of a unit: its owner and name, slot in the plan's values, rows, and where
    its local rows sit in the unit's flat buffers."""

    __slots__ = ("owner", "name", "sel", "slot", "rows", "rest", "local_numel", "lora", "coef", "dtype")

    def __init__(self, owner, name, sel, slot, rows: Rows):
        self.owner, self.name, self.sel, self.slot, self.rows = owner, name, sel, slot, rows
        theta0 = owner._buffers[name]
        self.rest = tuple(theta0.shape[1:])
        self.local_numel = theta0.numel()
        self.lora = owner._buffers.get(name + "_lora_a") is not None
        self.coef = owner._parameters[name + "_coef"]
        self.dtype = theta0.dtype


class _Unit:
    """The blocks one module gathers together (see the module docstring): dense blocks in
    :class:`~atlas_kernels.grouping.BlockGroup` s over the local rows, LoRA blocks beside them."""

    def __init__(self, plan: "ShardedPlan", path: str, module: nn.Module, entries: List[_SEntry], reshard: bool):
        self.plan, self.path, self.module, self.entries, self.reshard = plan, path, module, entries, reshard
        self.groups: List[Tuple[BlockGroup, List[int]]] = []
        pending = defaultdict(list)
        for i, e in enumerate(entries):
            if e.lora:
                continue
            backend = ops.for_dtype(plan.backend_of(e.owner._buffers[e.name].device), e.dtype)
            entry = Entry(e.owner, e.name, e.sel, e.owner._atlas_parts[e.name])
            why = entry.groupable()
            if why is not None:
                raise RuntimeError(f"sharded block {e.owner}.{e.name}: {why}")
            pending[entry.key(backend.name)].append((backend, entry, i))
        for items in pending.values():
            group = BlockGroup(items[0][0], [en for _, en, _ in items])
            pos = {id(en): i for _, en, i in items}
            self.groups.append((group, [pos[id(en)] for en in group.entries]))
        self.lora_idx = [i for i, e in enumerate(entries) if e.lora]
        self.coefs = [e.coef for e in entries]
        self.acc = torch.float64 if any(e.dtype == torch.float64 for e in entries) else torch.float32
        # backward reduce-scatters the blocks' gradients a few blocks at a time: at most RS_CHUNK
        # elements of the whole blocks (or one block larger than that) in one send buffer
        self.chunks: List[List[int]] = []
        size = 0
        for i, e in enumerate(entries):
            whole = e.local_numel * plan.world
            if not self.chunks or size + whole > RS_CHUNK:
                self.chunks.append([])
                size = 0
            self.chunks[-1].append(i)
            size += whole
        self.bwd: Optional[Tuple[tuple, list]] = None  # values gathered again in backward
        self.hooks = []

    def __len__(self):
        return len(self.entries)

    def dtypes(self, autocast_dtype) -> tuple:
        """The dtype of each entry's value: linear weights (``sel`` 0) in the autocast dtype where it
        is on, everything else (and everything without autocast) in theta0's dtype."""
        return tuple(autocast_dtype if (e.sel == 0 and autocast_dtype is not None and e.dtype != torch.float64)
                     else e.dtype for e in self.entries)

    # ---------------------------------------------------------------------------- forward pieces
    def compose_local(self, dtypes) -> List[torch.Tensor]:
        """Every entry's local rows composed, in ``dtypes`` (no autograd): one grouped pass per group."""
        out: List[Optional[torch.Tensor]] = [None] * len(self.entries)
        for group, idx in self.groups:
            sel_dt = [None, None]
            for i in idx:
                sel_dt[self.entries[i].sel] = dtypes[i]
            ref = group.entries[0].theta0.dtype
            vals = group.backend.compose_group(group, tuple(d or ref for d in sel_dt))
            for i, v in zip(idx, vals):
                out[i] = v
        for i in self.lora_idx:
            e = self.entries[i]
            out[i] = lora_compose(e.owner._atlas_block(e.name), dtypes[i])
        return out

    def gather(self, dtypes) -> List[torch.Tensor]:
        """Every entry's whole composed block (no autograd): local compose, one all-gather per dtype,
        copy-out. Each returned block owns its storage."""
        local = self.compose_local(dtypes)
        plan = self.plan
        world = plan.world
        out: List[Optional[torch.Tensor]] = [None] * len(local)
        by_dtype = defaultdict(list)
        for i, v in enumerate(local):
            by_dtype[v.dtype].append(i)
        for dt, idx in by_dtype.items():
            flat = torch.cat([local[i].reshape(-1) for i in idx]) if len(idx) > 1 else local[idx[0]].reshape(-1)
            full = torch.empty(world * flat.numel(), dtype=dt, device=flat.device)
            _all_gather(full, flat.contiguous(), plan.group)
            full = full.view(world, -1)
            off = 0
            for i in idx:
                e = self.entries[i]
                v = full[:, off:off + e.local_numel].reshape(world * e.rows.per, *e.rest)
                if world == 1:
                    v = v.clone()  # a view of `full` otherwise: every block owns its storage
                out[i] = v[:e.rows.total]
                off += e.local_numel
        return out

    # ---------------------------------------------------------------------------- backward pieces
    def coef_grads(self, grads: Sequence[Optional[torch.Tensor]]) -> List[torch.Tensor]:
        """The coefficient gradient of every entry from the gradients of its whole block (None:
        unused here, zeros), summed over the ranks."""
        plan, world = self.plan, self.plan.world
        dev = self.entries[0].coef.device
        shards: List[Optional[torch.Tensor]] = [None] * len(self.entries)
        for chunk in self.chunks:  # the float32 send buffer holds at most RS_CHUNK elements (or one block)
            total = sum(self.entries[i].local_numel for i in chunk)
            send = torch.zeros(world, total, dtype=self.acc, device=dev)
            off = 0
            for i in chunk:
                e, g = self.entries[i], grads[i]
                if g is not None:
                    dst = send[:, off:off + e.local_numel].view(world, e.rows.per, -1)
                    g2 = g.reshape(e.rows.total, -1)
                    for q in range(world):
                        lo = q * e.rows.per
                        hi = min(lo + e.rows.per, e.rows.total)
                        if hi > lo:
                            dst[q, :hi - lo].copy_(g2[lo:hi])
                off += e.local_numel
            local = torch.empty(total, dtype=self.acc, device=dev)
            _reduce_scatter(local, send.view(-1), plan.group)
            del send
            off = 0
            for i in chunk:
                e = self.entries[i]
                shards[i] = local[off:off + e.local_numel].view(e.rows.per, *e.rest)
                off += e.local_numel
        out: List[Optional[torch.Tensor]] = [None] * len(self.entries)
        for group, idx in self.groups:
            # cast=False: a float64 model's partial sums are all-reduced before they round to the
            # float32 coefficients (rounded first, cancelling partials lost up to 1e-6 relative)
            for i, cg in zip(idx, group.backend.coef_grad_group(group, [shards[i] for i in idx], cast=False)):
                out[i] = cg
        for i in self.lora_idx:
            out[i] = _lora_coef_grad(self.entries[i], shards[i])
        flat = torch.cat([c.reshape(-1).to(self.acc) for c in out])
        _all_reduce(flat, plan.group)
        res, off = [], 0
        for e in self.entries:
            n = e.coef.numel()
            res.append(flat[off:off + n].view(e.coef.shape).to(e.coef.dtype))
            off += n
        return res


def _lora_coef_grad(e: _SEntry, g: torch.Tensor) -> torch.Tensor:
    """``dcoef_i = <G_rows, B_i[rows] A_i> = sum((B_i[rows]^T G_rows) * A_i)`` (K = 1), scattered to
    the coefficient rows a ragged block holds."""
    blk = e.owner._atlas_block(e.name)
    a, b = blk.lora
    acc = g.dtype
    v = ((b.to(acc).transpose(1, 2) @ g.to(acc)) * a.to(acc)).sum((1, 2))
    if blk.index is not None:
        v = torch.zeros(e.coef.shape[0], dtype=acc, device=v.device).index_copy_(0, blk.index, v)
    return v.reshape(e.coef.shape)


class ShardedCompose(torch.autograd.Function):
    """The whole blocks of a unit, composed from the local rows and all-gathered; differentiable in
    every coefficient of the unit.

    Chain rule: with ``G_b`` the gradient of whole block ``b`` on each rank (from its own batch),
    ``dL/dcoef_b[i] = sum_ranks <sum_ranks' G_b[rows of rank], tau_b,i[rows of rank]>``: the block
    gradients are reduce-scattered (each rank gets its rows of ``sum G_b``), each rank reduces its
    rows against its rows of the slabs, and the N coefficient gradients are all-reduced. Every rank
    computes the same total: the gradient of the sum of the ranks' losses.
    """

    @staticmethod
    def forward(ctx, unit: _Unit, dtypes, *coefs):
        ctx.unit = unit
        ctx.set_materialize_grads(False)
        with torch.autocast(unit.entries[0].coef.device.type, enabled=False):
            return tuple(unit.gather(dtypes))

    @staticmethod
    def backward(ctx, *grads):
        unit = ctx.unit
        with torch.autocast(unit.entries[0].coef.device.type, enabled=False):
            out = unit.coef_grads(grads)
        unit.bwd = None  # every op of the unit that needed a gathered block has run
        return (None, None, *out)


class _Token:
    """What autograd keeps instead of a gathered block a reshardable unit released: where to find
    it again, and the view it saved."""

    __slots__ = ("unit", "index", "dtypes", "size", "stride", "offset")

    def __init__(self, unit, index, dtypes, t):
        self.unit, self.index, self.dtypes = unit, index, dtypes
        self.size, self.stride, self.offset = t.size(), t.stride(), t.storage_offset()


# -------------------------------------------------------------------------------------------- plan
class ShardedPlan(Plan):
    """The plan of a sharded tower (see the module docstring): units instead of groups, values
    gathered per unit, the values' rows reduce-scattered back in backward."""

    sharded = True

    def __init__(self, root: nn.Module, *, group, rank: int, world: int, units="auto", reshard: bool = True,
                 backend: str = "auto"):
        super().__init__(root, backend=backend, grouped=True)
        self.group, self.rank, self.world = group, rank, world
        self.unit_spec, self.reshard = units, reshard
        self.units: List[_Unit] = []
        self.root_unit: Optional[_Unit] = None
        self.fingerprint: dict = {}
        self._live: Dict[int, tuple] = {}  # storage address of a released unit's gathered block -> (unit, index)
        self._hooks_ctx = None
        self._one: Dict[tuple, _Unit] = {}
        self._chosen: Dict[str, object] = {}
        self._unit_handles = []

    def backend_of(self, device: torch.device):
        dev = str(device)
        if dev not in self._chosen:
            self._chosen[dev] = ops.get(ops.choose(self.backend, device))
            self.backends[dev] = self._chosen[dev].name
        return self._chosen[dev]

    # ------------------------------------------------------------------------------ building
    def _unit_paths(self) -> List[str]:
        spec = self.unit_spec
        holders = {p for p, _ in _owners(self.root) if self._adapted(_owner_of(self.root, p))}
        if spec == "root":
            return [""]
        if spec == "auto":
            paths = []
            for path, m in self.root.named_modules():
                if isinstance(m, nn.ModuleList) and not any(path.startswith(p + ".") for p in paths):
                    for i, _ in enumerate(m):
                        child = f"{path}.{i}".lstrip(".")
                        if any(h == child or h.startswith(child + ".") for h in holders):
                            paths.append(child)
            return [""] + paths
        if isinstance(spec, str) or not isinstance(spec, (list, tuple)):
            raise ValueError(f"units must be 'auto', 'root' or a list of submodule paths, got {spec!r}")
        names = dict(self.root.named_modules())
        bad = [p for p in spec if p not in names]
        if bad:
            raise ValueError(f"units: {bad[:3]} are not submodules of the sharded module")
        return [""] + [p for p in spec if p]

    @staticmethod
    def _adapted(m) -> bool:
        return m is not None and bool(m.__dict__.get("_atlas_parts"))

    def build(self) -> "ShardedPlan":
        from .patch_config import CONFIG_ATTR

        self._remove_unit_hooks()
        self.values = None
        self._live, self._one = {}, {}
        self.backends = {}
        self._chosen = {}
        paths = self._unit_paths()
        by_unit: Dict[str, List[Tuple[nn.Module, str]]] = defaultdict(list)
        slot = 0
        owners = list(_owners(self.root))
        for path, m in owners:
            d = m.__dict__
            for name, (primary, pname) in d["_atlas_alias"].items():
                m._buffers[name] = primary._buffers[pname]  # tied blocks: the primary's (local) theta0
            d["_atlas_own"] = frozenset()  # every adapted block is composed and gathered: none runs its own op
            d["_atlas_fused_max_m"] = None
            d["_atlas_plan"] = self
            d["_atlas_slots"] = {}
            backend = None
            for name in d["_atlas_parts"]:
                backend = self.backend_of(m._buffers[name].device)
                unit = max((p for p in paths if p == "" or path == p or path.startswith(p + ".")), key=len)
                by_unit[unit].append((m, name))
            d["_atlas_backend"] = backend if backend is not None else ops.get("torch")
        self.units = []
        from .modules import AtlasModule

        for p in paths:
            items = by_unit.get(p, [])
            if not items:
                continue
            entries = []
            for m, name in items:
                entries.append(_SEntry(m, name, 0 if isinstance(m, AtlasModule) else 1, slot,
                                       m.__dict__["_atlas_shard"][name]))
                m.__dict__["_atlas_slots"][name] = slot
                slot += 1
            module = self.root.get_submodule(p) if p else self.root
            unit = _Unit(self, p, module, entries, reshard=self.reshard and p != "")
            self.units.append(unit)
        self.root_unit = next((u for u in self.units if u.path == ""), None)
        self.nslots = slot
        self.groups = [g for u in self.units for g, _ in u.groups]
        self._record()
        for u in self.units:
            if u.path:
                self._unit_handles.append(u.module.register_forward_pre_hook(self._unit_begin(u)))
                self._unit_handles.append(u.module.register_forward_hook(self._unit_end(u), always_call=True))
        self.stale = False
        config = self.root.__dict__.get(CONFIG_ATTR)
        if config is not None:
            import dataclasses

            ran = "+".join(sorted(set(self.backends.values()))) or "torch"
            object.__setattr__(self.root, CONFIG_ATTR, dataclasses.replace(config, resolved_backend=ran))
        return self

    def _record(self):
        ids = []
        for u in self.units:
            for e in u.entries:
                b, p = e.owner._buffers, e.owner._parameters
                ids += [(b, e.name, b[e.name]), (p, e.name + "_coef", e.coef)]
                for s in ("_tau", "_lora_b"):
                    if b.get(e.name + s) is not None:
                        ids.append((b, e.name + s, b[e.name + s]))
        self._ids, self._ptrs, self._theta0s = ids, [], []

    def _remove_unit_hooks(self):
        for h in self._unit_handles:
            h.remove()
        self._unit_handles = []

    # ------------------------------------------------------------------------------ hooks
    def attach(self) -> None:
        super().attach()
        self.root.__dict__[DDP_ATTR] = _NoDDP()

    def detach(self) -> None:
        self._remove_unit_hooks()
        self._exit_hooks()
        super().detach()
        self.root.__dict__.pop(DDP_ATTR, None)
        for _, m in _owners(self.root):
            m.__dict__.pop("_atlas_shard", None)

    def _check_context(self, coefs: bool = True):
        if torch.compiler.is_compiling():
            raise RuntimeError("a sharded module does not run under torch.compile (its forwards are collectives); "
                               "run it eagerly")
        from torch.nn.parallel import DistributedDataParallel

        if getattr(DistributedDataParallel, "_active_ddp_module", None) is not None:
            raise RuntimeError(_NoDDP.MSG)
        if not coefs:
            return
        for u in self.units:
            for e in u.entries:
                if e.owner._parameters.get(e.name + "_coef") is not e.coef:
                    raise RuntimeError(
                        f"the coefficients of block {e.name!r} of this sharded module were replaced since it was "
                        f"sharded (fully_shard, FSDP2, over a module holding them turns them into sharded DTensors); "
                        f"they must stay whole and replicated: pass "
                        f"ignored_params=set(atlas_kernels.coefficients(tower).values()) to fully_shard")

    def _begin(self, module, args):
        self._check_context()
        if self.depth == 0:
            if self.stale or not self._valid():
                self.build()
            self.values = [None] * self.nslots
            self._live = {}
            for u in self.units:
                u.bwd = None
            if torch.is_grad_enabled() and any(u.reshard for u in self.units):
                self._enter_hooks()
            if self.root_unit is not None:
                self._gather(self.root_unit)
        self.depth += 1
        return None

    def _end(self, module, args, output):
        self.depth = max(self.depth - 1, 0)
        if self.depth == 0:
            self._exit_hooks()
        return None

    def _unit_begin(self, unit):
        def hook(module, args):
            self._check_context(coefs=False)
            if self.values is None:
                self.values = [None] * self.nslots
            if self.stale or not self._valid():
                raise RuntimeError("the sharded module changed since its plan was made (a block or coefficient "
                                   "replaced); call it through its root module")
            if any(self.values[e.slot] is None for e in unit.entries):
                self._gather(unit)
            return None
        return hook

    def _unit_end(self, unit):
        def hook(module, args, output):
            if unit.reshard:
                self._release(unit)
            return None
        return hook

    def _autocast_dtype(self, device: torch.device):
        dev = device.type
        if dev in ("cuda", "cpu") and torch.is_autocast_enabled(dev):
            return torch.get_autocast_dtype(dev)
        return None

    def _gather(self, unit: _Unit) -> None:
        dtypes = unit.dtypes(self._autocast_dtype(unit.entries[0].coef.device))
        vals = ShardedCompose.apply(unit, dtypes, *unit.coefs)
        for e, v in zip(unit.entries, vals):
            self.values[e.slot] = v
            if unit.reshard:
                self._live[v.untyped_storage().data_ptr()] = (unit, e.slot - unit.entries[0].slot, dtypes)

    def _release(self, unit: _Unit) -> None:
        if self.values is None:
            return
        for e in unit.entries:
            v = self.values[e.slot]
            if v is not None:
                self._live.pop(v.untyped_storage().data_ptr(), None)
                self.values[e.slot] = None

    # saved-tensor hooks: a released unit's blocks are kept by autograd as tokens
    def _enter_hooks(self):
        if self._hooks_ctx is None:
            self._hooks_ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
            self._hooks_ctx.__enter__()

    def _exit_hooks(self):
        if self._hooks_ctx is not None:
            ctx, self._hooks_ctx = self._hooks_ctx, None
            ctx.__exit__(None, None, None)

    def _pack(self, t):
        if not self._live:
            return t
        try:
            key = self._live.get(t.untyped_storage().data_ptr())
        except (RuntimeError, NotImplementedError):  # a tensor without storage (a subclass)
            return t
        if key is None:
            return t
        return _Token(key[0], key[1], key[2], t)

    @staticmethod
    def _unpack(x):
        if not isinstance(x, _Token):
            return x
        unit = x.unit
        if unit.bwd is None or unit.bwd[0] != x.dtypes:
            with torch.no_grad(), torch.autocast(unit.entries[0].coef.device.type, enabled=False):
                unit.bwd = (x.dtypes, unit.gather(x.dtypes))  # a collective: every rank unpacks alike
        return unit.bwd[1][x.index].as_strided(x.size, x.stride, x.offset)

    # ------------------------------------------------------------------------------ reads
    def value(self, owner: nn.Module, name: str, dtype: torch.dtype) -> torch.Tensor:
        """The whole composed block: the unit's gathered value inside a forward, else gathered now
        for this one block (a collective: every rank must read it)."""
        if torch.compiler.is_compiling():
            self._check_context(coefs=False)
        slot = owner.__dict__["_atlas_slots"].get(name)
        if slot is None:
            raise RuntimeError(f"block {name!r} of {type(owner).__name__} is not in the sharded plan")
        if self.depth > 0 and self.values is not None:
            v = self.values[slot]
            if v is not None and v.dtype == dtype:
                return v
        return self._gather_one(owner, name, dtype)

    def _gather_one(self, owner, name, dtype):
        key = (id(owner), name)
        unit = self._one.get(key)
        if unit is None:
            from .modules import AtlasModule

            sel = 0 if isinstance(owner, AtlasModule) else 1
            e = _SEntry(owner, name, sel, 0, owner.__dict__["_atlas_shard"][name])
            unit = self._one[key] = _Unit(self, "", owner, [e], reshard=False)
        return ShardedCompose.apply(unit, (dtype,), *unit.coefs)[0]

    @torch.no_grad()
    def merged(self, owner: nn.Module, name: str) -> torch.Tensor:
        """``theta0 + sum_i lam_i tau_i`` of the whole block in float32 (float64 for float64 blocks),
        cast to theta0's dtype: composed from the local rows, all-gathered (a collective)."""
        theta0 = owner._buffers[name]
        wide = torch.float64 if theta0.dtype == torch.float64 else torch.float32
        return self._gather_one(owner, name, wide).to(theta0.dtype)

    def prepare_unpatch(self) -> None:
        """Before ``unpatch`` detaches the plan: every block's merged whole value, left where
        ``_atlas_merged`` finds it (one all-gather per block, every rank alike)."""
        for u in self.units:
            for e in u.entries:
                e.owner.__dict__.setdefault("_atlas_merged_override", {})[e.name] = self.merged(e.owner, e.name)

    def summary(self) -> str:
        n = sum(len(u) for u in self.units)
        ran = ", ".join(f"{d}: {b}" for d, b in sorted(self.backends.items())) or "none"
        return (f"sharded over {self.world} processes (rank {self.rank}); backend {self.backend!r} -> {ran}; "
                f"{n} block(s) in {len(self.units)} unit(s)" + (", released after each unit's forward"
                                                                 if self.reshard else ""))

    def local_bytes(self) -> Dict[str, int]:
        """Bytes this rank holds, measured from the tensors: ``theta0``, ``slabs`` (dense task
        vectors), ``scales``, ``lora_a``, ``lora_b`` (adapted blocks only)."""
        out = dict(theta0=0, slabs=0, scales=0, lora_a=0, lora_b=0)
        for u in self.units:
            for e in u.entries:
                b = e.owner._buffers
                for key, suffix in (("theta0", ""), ("slabs", "_tau"), ("scales", "_scale"), ("lora_a", "_lora_a"),
                                    ("lora_b", "_lora_b")):
                    t = b.get(e.name + suffix)
                    if t is not None:
                        out[key] += t.numel() * t.element_size()
        return out

    def __deepcopy__(self, memo):
        raise RuntimeError("a sharded module cannot be deep-copied (its process group and shards belong to this "
                           "process); unpatch it first")


def _owner_of(root, path):
    try:
        return root.get_submodule(path) if path else root
    except AttributeError:
        return None


def local_bytes(module: nn.Module) -> Dict[str, int]:
    """:meth:`ShardedPlan.local_bytes` of a sharded module (else of the whole patched module)."""
    plan = plan_of(module)
    if isinstance(plan, ShardedPlan):
        return plan.local_bytes()
    out = dict(theta0=0, slabs=0, scales=0, lora_a=0, lora_b=0)
    for _, m in _owners(module):
        for name in m._atlas_parts:
            for key, suffix in (("theta0", ""), ("slabs", "_tau"), ("scales", "_scale"), ("lora_a", "_lora_a"),
                                ("lora_b", "_lora_b")):
                t = m._buffers.get(name + suffix)
                if t is not None:
                    out[key] += t.numel() * t.element_size()
    return out


PLAN = PLAN_ATTR  # re-exported for tests
