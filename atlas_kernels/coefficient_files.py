"""Coefficient files: :func:`save_coefficients` and :func:`load_coefficients`.

A coefficient file is a safetensors file: one float32 tensor per adapted block, named as
:func:`~atlas_kernels.coefficients` names it, and string metadata:

- ``format`` (``"atlas_kernels.coefficients"``), ``version`` (``"1"``);
- what a load checks against the patched module: ``n``, ``partitions``, ``partition_mode``,
  ``seed``, ``names`` (JSON list: the task vectors in coefficient order), ``blocks`` (JSON list of
  the tensor names), ``linearised`` (``"1"``/``"0"``);
- ``patch_config``: the module's whole :class:`~atlas_kernels.patch_config.PatchConfig` as JSON
  (backend, BatchNorm and grouping choices too), a record of how the coefficients were trained.
  Files written before it existed lack it; nothing reads it back, so they load as before;
- what the coefficients were trained *on*, so that a load onto another model is refused rather than
  silently wrong (coefficients saved from a ViT-B/32 once loaded into a ViT-B/16 patched with task
  vectors of the same names): ``shapes`` (JSON: block -> its shape), ``theta0_norms`` (block -> the
  L2 norm of its pre-trained value) and ``tv_norms`` (block -> the L2 norm of each task vector, 0 for
  one a ragged block does not hold). A load compares the shapes exactly and the norms to 1%
  (enough to tell other task vectors or another base model apart; loose enough for another storage
  dtype of the same ones). Files written before these keys existed load without the check.
"""
from __future__ import annotations

import json
import warnings

import torch
import torch.nn as nn

from ._adapted import coefficients
from ._checks import all_finite
from .patch_config import PatchConfig, unwrap

__all__ = ["save_coefficients", "load_coefficients"]

FORMAT = "atlas_kernels.coefficients"


def _identity(config: PatchConfig) -> dict:
    """The metadata values a load compares, as this module's config writes them."""
    return {"n": str(config.n), "partitions": str(config.partitions), "partition_mode": config.partition_mode,
            "seed": str(config.seed), "names": json.dumps(list(config.names)),
            "linearised": "1" if config.linearised else "0"}


# Norms agree when within this relative distance (int8 or fp16 storage of the same task vectors moves a
# norm by far less; other task vectors or another base model by far more).
NORM_RTOL = 1e-2


@torch.no_grad()
def fingerprint(module: nn.Module) -> dict:
    """``{"shapes", "theta0_norms", "tv_norms"}`` of a patched module's adapted blocks (see the module
    docstring): one read of theta0 and of each task vector, one block at a time."""
    from ._adapted import join
    from .modules import _BlockHolder
    from .plan import plan_of
    from .storage import scale_rows

    plan = plan_of(unwrap(module))
    if getattr(plan, "sharded", False):
        return plan.fingerprint  # of the whole blocks, reduced over the ranks when the module was sharded
    shapes, t_norms, tv_norms = {}, {}, {}
    for path, m in unwrap(module).named_modules():
        if not isinstance(m, _BlockHolder):
            continue
        for name in m._atlas_parts:
            b = m._atlas_block(name)
            key = join(path, name)
            shapes[key] = list(b.theta0.shape)
            t_norms[key] = float(torch.linalg.vector_norm(b.theta0.float()))
            n = b.coef.shape[0] if b.index is None else m._parameters[name + "_coef"].shape[0]
            held = list(range(n)) if b.index is None else [int(i) for i in b.index]
            norms = [0.0] * n
            for j, i in enumerate(held):
                if b.lora is not None:
                    a, bb = b.lora[0][j].float(), b.lora[1][j].float()
                    norms[i] = float(((a @ a.t()) * (bb.t() @ bb)).sum().clamp_min(0).sqrt())
                    continue
                t = b.tau[j].float()
                if b.scale is not None:
                    t = t.reshape(scale_rows(t.shape), -1) * b.scale[j].float()[:, None]
                norms[i] = float(torch.linalg.vector_norm(t))
            tv_norms[key] = norms
    return {"shapes": shapes, "theta0_norms": t_norms, "tv_norms": tv_norms}


def _fingerprint_diffs(meta, module, path: str) -> tuple:
    """``(hard, soft)``: where the file's recorded shapes (hard: always refused) and norms (soft:
    refused unless strict=False) differ from the module's."""
    if "shapes" not in meta:
        return [], []  # a file written before the fingerprint existed
    try:
        f_shapes = json.loads(meta["shapes"])
        f_t = json.loads(meta.get("theta0_norms", "{}"))
        f_tv = json.loads(meta.get("tv_norms", "{}"))
    except ValueError:
        return ["its metadata 'shapes'/'theta0_norms'/'tv_norms' is not JSON (the file was edited)"], []
    ours = fingerprint(module)
    hard = [f"block {b!r} has shape {tuple(ours['shapes'][b])} here, {tuple(f_shapes[b])} in the file"
            for b in ours["shapes"] if b in f_shapes and list(f_shapes[b]) != ours["shapes"][b]]
    if hard:
        hard = [f"these coefficients were trained on another architecture: {len(hard)} block(s) differ in shape, "
                f"e.g. " + "; ".join(hard[:3])]
        return hard, []

    def off(a, b):
        return abs(a - b) > NORM_RTOL * max(abs(a), abs(b)) + 1e-12

    soft = []
    t_bad = [b for b in ours["theta0_norms"] if b in f_t and off(ours["theta0_norms"][b], f_t[b])]
    if t_bad:
        b = t_bad[0]
        soft.append(f"the pre-trained weights differ from those they were trained on ({len(t_bad)} block(s), e.g. "
                    f"{b!r}: |theta0| = {ours['theta0_norms'][b]:.6g} here, {f_t[b]:.6g} in the file)")
    tv_bad = []
    for b, norms in ours["tv_norms"].items():
        theirs = f_tv.get(b)
        if theirs is None or len(theirs) != len(norms):
            continue
        for i, (x, y) in enumerate(zip(norms, theirs)):
            if off(x, y):
                tv_bad.append((b, i, x, y))
    if tv_bad:
        b, i, x, y = tv_bad[0]
        soft.append(f"the task vectors differ from those they were trained with ({len(tv_bad)} of them, e.g. task "
                    f"vector {i} of block {b!r}: |tau| = {x:.6g} here, {y:.6g} in the file)")
    return [], soft


def save_coefficients(module: nn.Module, path) -> None:
    """Write the coefficients to a safetensors file with metadata (N, K, partition layout, block
    list, task-vector names, the patch config). Refuses NaN or inf."""
    from ._io import atomic_save_safetensors

    config = PatchConfig.of(module)
    coefs = coefficients(module)
    if not str(path).endswith(".safetensors"):
        warnings.warn(f"save_coefficients writes a safetensors file; {str(path)!r} does not end in .safetensors "
                      f"(it is not a torch.save/pickle file: read it with load_coefficients or safetensors)",
                      stacklevel=2)
    tensors = {}
    for name, c in coefs.items():
        if not all_finite(c):
            raise ValueError(f"coefficients of block {name!r} hold NaN or inf; not saving them")
        tensors[name] = c.detach().float().cpu().contiguous()
    fp = fingerprint(module)
    meta = {"format": FORMAT, "version": "1", **_identity(config), "blocks": json.dumps(sorted(coefs)),
            "patch_config": config.to_json(), "shapes": json.dumps(fp["shapes"]),
            "theta0_norms": json.dumps(fp["theta0_norms"]), "tv_norms": json.dumps(fp["tv_norms"])}
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


def _layout_diffs(meta, config: PatchConfig) -> list:
    """Where the file's N, K and (for K > 1) partition layout differ from this module's config."""
    ours = _identity(config)
    keys = ("n", "partitions") + (("partition_mode", "seed") if config.partitions > 1 else ())
    return [f"{key}: file {meta.get(key)}, model {ours[key]}" for key in keys if meta.get(key) != ours[key]]


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

    config = PatchConfig.of(module)
    coefs = coefficients(module)
    path = str(path)
    check_file(path, "coefficient file")
    meta, loaded = read_safetensors(path)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path!r} is not an atlas_kernels coefficient file (format={meta.get('format')!r})")
    file_lin, model_lin = meta.get("linearised", "0") == "1", config.linearised
    if file_lin != model_lin:
        mode = {True: "linearised (patch(..., linearised=True))", False: "standard"}
        raise ValueError(f"{path!r} holds coefficients learned by a {mode[file_lin]} model; this module is "
                         f"patched {mode[model_lin]}: the coefficients of one mode mean nothing in the other")
    diffs = _layout_diffs(meta, config)
    missing = sorted(set(coefs) - set(loaded))
    extra = sorted(set(loaded) - set(coefs))
    if missing:
        diffs.append(f"the file lacks {len(missing)} block(s) the model has, e.g. {missing[:3]}")
    if extra:
        diffs.append(f"the file has {len(extra)} block(s) the model lacks, e.g. {extra[:3]}")
    diffs += _names_diff(meta, list(config.names), strict)
    if diffs:
        raise ValueError(f"{path!r} does not match this patched module: " + "; ".join(diffs))
    hard, soft = _fingerprint_diffs(meta, module, path)
    if hard:
        raise ValueError(f"{path!r} does not match this patched module: " + "; ".join(hard))
    if soft and strict:
        raise ValueError(f"{path!r} does not match this patched module: " + "; ".join(soft)
                         + ". Coefficients mean something only with the task vectors and base model they were "
                         "learned with; load_coefficients(..., strict=False) loads them anyway, with a warning")
    if soft:
        warnings.warn(f"{path!r}: " + "; ".join(soft) + " (loaded anyway: strict=False)", stacklevel=2)
    for name, c in coefs.items():
        t = loaded[name]
        if t.shape != c.shape:
            raise ValueError(f"{path!r}: block {name!r} has coefficients of shape {tuple(t.shape)}, "
                             f"the model expects {tuple(c.shape)}")
        if not t.is_floating_point() or not all_finite(t):
            raise ValueError(f"{path!r}: coefficients of block {name!r} are not finite floats")
    for name, c in coefs.items():
        c.copy_(loaded[name].to(c.device, c.dtype))
    return module
