"""PEFT LoRA adapters as LoRA task vectors: read, write, and check against a module.

A PEFT LoRA adapter is a directory holding ``adapter_config.json`` and ``adapter_model.safetensors``
(older ones: ``adapter_model.bin``, a torch file read without running code). For every adapted
module at path ``P`` the weights file holds

- ``base_model.model.P.lora_A.weight``: ``A`` of shape ``[r, in]``;
- ``base_model.model.P.lora_B.weight``: ``B`` of shape ``[out, r]``

(``.lora_A.<adapter name>.weight`` in files saved from a live model), and PEFT's update is
``delta W = scaling * B @ A`` with ``scaling = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with
``use_rslora``), where ``r`` and ``lora_alpha`` may be overridden per module by ``rank_pattern`` and
``alpha_pattern`` (matched like PEFT's ``get_pattern_key``: the first pattern ``p``, in the config's
order, for which ``re.match(rf"(.*\\.)?({p})$", P)`` holds; decided without unbounded
backtracking, see :mod:`atlas_kernels._peft_config`).

:func:`read_peft_adapter` folds ``scaling`` into ``B`` (in float32) and names each update by the
block it changes, ``P.weight``, so ``tau = B @ A`` is exactly PEFT's delta. Two layouts are mapped
to the parameter they really change:

- PEFT's LoRA for ``nn.MultiheadAttention`` (open_clip's ``attn``) stores the in-projection update
  at ``P.lora_*`` and the out-projection's at ``P.base_layer.out_proj.lora_*``: these become
  ``P.in_proj_weight`` and ``P.out_proj.weight`` (``.base_layer`` segments are PEFT wrappers, not
  modules of the original model);
- ``fan_in_fan_out`` (GPT-2 style ``Conv1D`` weights stored ``[in, out]``): the update is
  ``(B @ A)^T``, returned as the factors ``(B^T, A^T)``.

Anything that is not a pure additive low-rank update is refused with the file and key named:
DoRA (``use_dora``), convolution or embedding LoRA, trained biases and ``modules_to_save`` copies.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Mapping
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn

from ._checks import all_finite, deeper_name, prefix_matches_nothing, require_finite, stripped_prefix
from ._peft_config import check_values, pattern_value, read_config

__all__ = ["read_peft_adapter", "write_peft_adapter", "match_blocks", "lora_scaling"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
PEFT_PREFIX = "base_model.model."
# safetensors metadata key: sha256 of the adapter_config.json written together with the weights
_CONFIG_HASH = "atlas_kernels.config_sha256"

# <path>.lora_A.weight or <path>.lora_A.<adapter>.weight
_KEY = re.compile(r"^(?P<path>.+)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")
# PEFT wrapper segments (``.base_layer``), which are not modules of the original model.
_BASE_LAYER = re.compile(r"\.base_layer(?=\.|$)")

Factors = Dict[str, Tuple[torch.Tensor, torch.Tensor]]


# ----------------------------------------------------------------------------------------- reading
def _locate(path) -> Tuple[str, str, str]:
    """``(directory, weights file, config file)`` of an adapter given as a directory or a file in it."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"PEFT adapter {path!r} does not exist")
    if os.path.isdir(path):
        directory = path
        # lexists, not isfile: a weights "file" that is a named pipe, a device or a folder is named as such by
        # check_file below, rather than reported missing
        weights = next((os.path.join(path, n) for n in WEIGHTS_NAMES if os.path.lexists(os.path.join(path, n))), None)
        if weights is None:
            raise ValueError(f"PEFT adapter directory {path!r} holds neither {WEIGHTS_NAMES[0]} nor {WEIGHTS_NAMES[1]}")
    else:
        directory, weights = os.path.dirname(os.path.abspath(path)), path
    from .checkpoints import check_file

    check_file(weights, "PEFT adapter weights")
    config = os.path.join(directory, CONFIG_NAME)
    if os.path.lexists(config):
        check_file(config, "PEFT adapter config")
    if not os.path.isfile(config):
        raise ValueError(f"{config!r} not found: a PEFT adapter directory holds {CONFIG_NAME} next to its weights "
                         f"({os.path.basename(weights)}); without it the LoRA scaling (lora_alpha / r) is unknown")
    return directory, weights, config


_read_config = read_config
_pattern_value = pattern_value


def lora_scaling(config: Mapping, module_path: str) -> Tuple[int, float]:
    """``(r, scaling)`` PEFT uses for the module at ``module_path`` (the path in the base model, e.g.
    ``"visual.transformer.resblocks.0.mlp.c_fc"``): ``rank_pattern`` / ``alpha_pattern`` override
    ``r`` / ``lora_alpha``; ``scaling = alpha / r``, or ``alpha / sqrt(r)`` with ``use_rslora``."""
    r = _pattern_value(config.get("rank_pattern"), module_path, config["r"])
    alpha = _pattern_value(config.get("alpha_pattern"), module_path, config["lora_alpha"])
    scaling = alpha / math.sqrt(r) if config.get("use_rslora") is True else alpha / r
    return int(r), float(scaling)


def _load_weights(weights: str) -> Dict[str, torch.Tensor]:
    from .checkpoints import load_state_dict_file

    try:
        return load_state_dict_file(weights)
    except FileNotFoundError:
        raise
    except ValueError as exc:
        raise ValueError(f"PEFT adapter weights {weights!r} could not be read as a safetensors file or a plain "
                         f"state dict (nothing in it was run). Details: {exc}") from None


def _check_pair(weights: str, config_path: str) -> None:
    """Weights written by :func:`write_peft_adapter` name the config written with them; warn about
    a pair that does not belong together (a hand-edited config is legitimate, but so is the
    warning: new factors under an old lora_alpha load with the wrong scaling)."""
    if not weights.endswith(".safetensors"):
        return
    try:
        from safetensors import safe_open

        with safe_open(weights, framework="pt", device="cpu") as f:
            want = (f.metadata() or {}).get(_CONFIG_HASH)
    except Exception:  # unreadable headers were reported by _load_weights already
        return
    if want is None:
        return
    with open(config_path, "rb") as fh:
        got = hashlib.sha256(fh.read()).hexdigest()
    if got != want:
        import warnings

        warnings.warn(f"{weights!r} was written together with another {CONFIG_NAME} than the one beside it "
                      f"(config sha256 {got[:12]}..., the weights expect {want[:12]}...): if the config was not "
                      f"edited on purpose, the folder mixes two versions and lora_alpha / r may not belong to "
                      f"these factors", stacklevel=3)


def _bad_key(weights: str, key: str) -> ValueError:
    if ".lora_embedding_" in key:
        why = "LoRA on an embedding layer (lora_embedding_A/B) is not supported"
    elif "lora_magnitude_vector" in key:
        why = "it is a DoRA magnitude vector (DoRA updates are not B @ A)"
    elif "modules_to_save" in key or not re.search(r"lora_", key):
        why = ("it is not a LoRA factor (a trained bias or a modules_to_save copy holds absolute values, not an "
               "update; retrain with bias='none' and no modules_to_save, or drop those keys)")
    else:
        why = "it is not a LoRA factor named <module>.lora_A[.<adapter>].weight / .lora_B[...].weight"
    return ValueError(f"{weights!r}: key {key!r}: {why}")


def read_peft_adapter(path, *, module_prefix: Optional[str] = None) -> Factors:
    """LoRA factors of a PEFT adapter, keyed by the block they change.

    Args:
        path: the adapter directory, or its ``adapter_model.safetensors`` (or ``.bin``) file;
            ``adapter_config.json`` must sit in the same directory.
        module_prefix: a prefix of the module paths (after ``base_model.model.``) to keep and strip,
            e.g. ``"visual."`` to read an adapter trained on a whole CLIP for patching
            ``model.visual``. Modules outside it (e.g. the text tower) are skipped.

    Returns:
        ``{block: (A, B)}`` in float32 with ``A [r, in]`` and ``B [out, r]`` where ``B`` already
        carries PEFT's scaling, so ``B @ A`` is the adapter's update of parameter ``block`` (e.g.
        ``"transformer.resblocks.0.mlp.c_fc.weight"``).

    Raises:
        ValueError naming the file and key for: a missing or non-LoRA ``adapter_config.json``,
        DoRA, a ``lora_A`` without its ``lora_B`` (or the reverse), ranks that disagree between A
        and B or with the config, factors that are not matrices, NaN/inf, keys that are not LoRA
        factors, several adapters in one file, and weights that are not safetensors or a plain
        state dict.
    """
    _, weights, config_path = _locate(path)
    cfg = _read_config(config_path)
    sd = _load_weights(weights)
    _check_pair(weights, config_path)

    pairs: Dict[str, Dict[str, Tuple[str, torch.Tensor]]] = {}
    adapters = set()
    for key, t in sd.items():
        m = _KEY.match(key)
        if m is None or ".lora_embedding_" in key:
            raise _bad_key(weights, key)
        if m.group("adapter") is not None:
            adapters.add(m.group("adapter"))
        path_ = m.group("path")
        if path_.startswith(PEFT_PREFIX):
            path_ = path_[len(PEFT_PREFIX):]
        slot = pairs.setdefault(path_, {})
        if m.group("ab") in slot:
            raise ValueError(f"{weights!r}: key {key!r}: module {path_!r} has two lora_{m.group('ab')} tensors "
                             f"({slot[m.group('ab')][0]!r} too); one adapter per file, please")
        slot[m.group("ab")] = (key, t)
    if len(adapters) > 1:
        raise ValueError(f"{weights!r} holds several adapters {sorted(adapters)}; save or pass one adapter at a time")
    if not pairs:
        raise ValueError(f"{weights!r} holds no LoRA factors (no key ends in .lora_A.weight / .lora_B.weight)")

    for path_, slot in pairs.items():
        for ab, other in (("A", "B"), ("B", "A")):
            if ab in slot and other not in slot:
                key = slot[ab][0]
                raise ValueError(f"{weights!r}: key {key!r} has no matching lora_{other} "
                                 f"({key.replace('lora_' + ab, 'lora_' + other)!r} is missing)")

    # PEFT's nn.MultiheadAttention LoRA: P.lora_* is the in-projection, P.base_layer.out_proj.lora_* the out one.
    mha_paths = {p[: -len(".base_layer.out_proj")] for p in pairs if p.endswith(".base_layer.out_proj")}
    mha_paths &= set(pairs)
    fan_in_fan_out = cfg.get("fan_in_fan_out") is True

    out: Factors = {}
    for path_, slot in pairs.items():
        (ka, a), (kb, b) = slot["A"], slot["B"]
        for key, t in ((ka, a), (kb, b)):
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                raise ValueError(f"{weights!r}: key {key!r} is not a floating tensor")
            if t.dim() != 2:
                raise ValueError(f"{weights!r}: key {key!r} has shape {tuple(t.shape)}; only LoRA on linear layers "
                                 f"(2-D factors) is supported, not convolution LoRA")
            require_finite(t, f"{weights!r}: key {key!r}")
        if a.shape[0] != b.shape[1]:
            raise ValueError(f"{weights!r}: ranks disagree: {ka!r} has shape {tuple(a.shape)} (rank {a.shape[0]}), "
                             f"{kb!r} has shape {tuple(b.shape)} (rank {b.shape[1]})")
        # Scaling follows the module PEFT wrapped: a nested out_proj takes its MHA's pattern.
        config_path_ = _BASE_LAYER.split(path_, 1)[0]
        r, scaling = lora_scaling(cfg, config_path_)
        if a.shape[0] != r:
            raise ValueError(f"{weights!r}: key {ka!r} has rank {a.shape[0]}, but {os.path.basename(config_path)} "
                             f"gives module {config_path_!r} r={r} (r / rank_pattern); the scaling "
                             f"lora_alpha / r would be wrong")
        module_path = _BASE_LAYER.sub("", path_)
        is_mha = path_ in mha_paths
        if module_prefix:
            if not module_path.startswith(module_prefix):
                continue
            module_path = module_path[len(module_prefix):]
        a32 = a.detach().to(torch.float32)
        b32 = b.detach().to(torch.float32) * scaling
        if not all_finite(b32):
            raise ValueError(f"{config_path!r}: the scaling lora_alpha / r = {scaling:.6g} of module {config_path_!r} "
                             f"makes {kb!r} overflow float32 (its factor B is finite; check 'lora_alpha' / "
                             f"'alpha_pattern' and 'r')")
        if fan_in_fan_out:
            a32, b32 = b32.t().contiguous(), a32.t().contiguous()
        block = module_path + (".in_proj_weight" if is_mha else ".weight")
        if block in out:
            raise ValueError(f"{weights!r}: two modules map to block {block!r}")
        out[block] = (a32.contiguous(), b32.contiguous())
    if not out:
        why = prefix_matches_nothing("module_prefix", module_prefix, "none of its modules", sorted(pairs), their="they")
        raise ValueError(f"{weights!r}: {why}")
    return out


# ----------------------------------------------------------------------------------------- writing
def lora_pair(ab, where: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` checked as LoRA factors: two 2-D tensors, ``A (r, in)`` and ``B (out, r)``.
    ``where`` names them in the error (e.g. ``factors[0]['c_fc.weight']``)."""
    if not (isinstance(ab, (tuple, list)) and len(ab) == 2 and all(isinstance(t, torch.Tensor) for t in ab)):
        raise TypeError(f"{where} must be a pair of tensors (A, B)")
    a, b = ab
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
        raise ValueError(f"{where}: need A (r, in) and B (out, r), got A {tuple(a.shape)}, B {tuple(b.shape)}")
    return a, b


def write_peft_adapter(directory, factors: Mapping, *, r: int, lora_alpha: float, target_modules,
                       prefix: str = PEFT_PREFIX, use_rslora: bool = False,
                       rank_pattern: Optional[Mapping] = None, alpha_pattern: Optional[Mapping] = None,
                       dtype: Optional[torch.dtype] = None) -> str:
    """Write ``adapter_model.safetensors`` and ``adapter_config.json`` in PEFT's layout; returns the
    directory.

    ``factors`` maps block names (``"<module path>.weight"``; or bare module paths) to ``(A, B)``
    with ``A [r, in]`` and ``B [out, r]`` as PEFT stores them, i.e. *without* the scaling (PEFT
    multiplies by ``lora_alpha / r`` when it applies them; :func:`read_peft_adapter` folds it in).
    A block ``P.in_proj_weight`` is written in PEFT's ``nn.MultiheadAttention`` layout (``P.lora_*``;
    its ``P.out_proj.weight`` then goes to ``P.base_layer.out_proj.lora_*``). ``dtype`` casts the
    factors (default: kept as given).
    """
    from safetensors.torch import save

    from ._io import atomic_replace_dir

    if not isinstance(factors, Mapping) or not factors:
        raise ValueError("factors must be a non-empty mapping from block names to (A, B)")
    if isinstance(target_modules, str):
        target = target_modules
    else:
        target = sorted(set(target_modules))
    if isinstance(r, bool) or not isinstance(r, int):
        raise TypeError(f"r must be an integer, got {r!r}")
    cfg = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": None, "revision": None,
        "inference_mode": True, "r": int(r), "lora_alpha": lora_alpha, "lora_dropout": 0.0,
        "target_modules": target, "fan_in_fan_out": False, "bias": "none", "use_rslora": bool(use_rslora),
        "use_dora": False, "modules_to_save": None, "init_lora_weights": True, "layers_to_transform": None,
        "layers_pattern": None, "rank_pattern": dict(rank_pattern or {}), "alpha_pattern": dict(alpha_pattern or {}),
    }
    check_values(cfg, "write_peft_adapter")
    mha = {b[: -len(".in_proj_weight")] for b in factors if b.endswith(".in_proj_weight")}
    tensors = {}
    for block, ab in factors.items():
        a, b = lora_pair(ab, f"factors[{block!r}]")
        if block.endswith(".in_proj_weight"):
            module = block[: -len(".in_proj_weight")]
        elif block.endswith(".weight"):
            module = block[: -len(".weight")]
        else:
            module = block
        parent, _, last = module.rpartition(".")
        if last == "out_proj" and parent in mha:
            module = parent + ".base_layer.out_proj"
        want_r, _ = lora_scaling(cfg, _BASE_LAYER.split(module, 1)[0])
        if a.shape[0] != want_r:
            raise ValueError(f"factors[{block!r}] has rank {a.shape[0]}, the config gives r={want_r} "
                             f"(pass rank_pattern for per-module ranks)")
        for ab_name, t in (("A", a), ("B", b)):
            t = t.detach().cpu()
            tensors[f"{prefix}{module}.lora_{ab_name}.weight"] = (t if dtype is None else t.to(dtype)).contiguous()
    config_bytes = (json.dumps(cfg, indent=2) + "\n").encode("utf-8")
    # The weights name the config they were written with, so a pair mixed by another tool (or a
    # copy interrupted half-way) is detected by read_peft_adapter rather than loaded silently.
    weights = save(tensors, metadata={"format": "pt", _CONFIG_HASH: hashlib.sha256(config_bytes).hexdigest()})
    # Both files are swapped in together: a reader sees the old pair or the new one, never new
    # factors under the old lora_alpha.
    atomic_replace_dir(directory, {WEIGHTS_NAMES[0]: weights, CONFIG_NAME: config_bytes})
    return os.fspath(directory)


# ---------------------------------------------------------------------------------------- matching
def match_blocks(factors: Mapping, module: nn.Module) -> Factors:
    """Check LoRA factors against ``module`` and return them keyed by its parameter names.

    Every block must name a parameter of ``module`` (``module.named_parameters()``) of shape
    ``(out, in) = (B.shape[0], A.shape[1])``. A block ``P.weight`` where ``P`` is an
    ``nn.MultiheadAttention`` is mapped to ``P.in_proj_weight`` (the in-projection PEFT adapts).
    Returns a new dict in the module's parameter order.

    Raises ValueError naming the block, the expected shape and what arrived, with a hint when a
    prefix (e.g. ``"visual."``) separates the adapter's names from the module's.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    params = dict(module.named_parameters())
    modules = dict(module.named_modules())
    matched: Factors = {}
    for block, ab in factors.items():
        if not (isinstance(ab, (tuple, list)) and len(ab) == 2 and all(isinstance(t, torch.Tensor) for t in ab)):
            raise TypeError(f"block {block!r}: expected a pair of tensors (A, B), got {type(ab).__name__}")
        a, b = ab
        name = block
        if name not in params and name.endswith(".weight"):
            owner = modules.get(name[: -len(".weight")])
            if isinstance(owner, nn.MultiheadAttention) and name[: -len(".weight")] + ".in_proj_weight" in params:
                name = name[: -len(".weight")] + ".in_proj_weight"
        if name not in params:
            raise ValueError(f"block {block!r}: the module has no parameter of that name{_prefix_hint(block, params)}")
        p = params[name]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(f"block {block!r}: need A (r, in) and B (out, r), got A {tuple(a.shape)}, "
                             f"B {tuple(b.shape)}")
        got = (b.shape[0], a.shape[1])
        if tuple(p.shape) != got:
            raise ValueError(f"block {block!r}: the module's parameter {name!r} has shape {tuple(p.shape)}, the LoRA "
                             f"factors give a {got} update (B {tuple(b.shape)} @ A {tuple(a.shape)}): an adapter "
                             f"for another model?{_deeper_hint(name, got, params)}"
                             f"{_other_prefix_hint(factors, params)}")
        if name in matched:
            raise ValueError(f"blocks map twice to parameter {name!r}")
        matched[name] = (a, b)
    order = {n: i for i, n in enumerate(params)}
    return dict(sorted(matched.items(), key=lambda kv: order[kv[0]]))


def _deeper_hint(name: str, shape, params: Mapping) -> str:
    """A parameter deeper in the module with the same name suffix and the right shape (a whole CLIP
    passed where its image tower was meant: the text tower has 'transformer.resblocks.*' too)."""
    other = deeper_name(name, params, lambda o: tuple(params[o].shape) == tuple(shape))
    if other is not None:
        sub = other[: -len(name) - 1]
        return f" The module holds {other!r} of that shape: pass the submodule instead (module.{sub})."
    return ""


def _other_prefix_hint(factors: Mapping, params: Mapping) -> str:
    """When other blocks carry a prefix that would make them match (an adapter over a whole CLIP
    names both towers), say so."""
    for other in factors:
        pre = None if other in params else stripped_prefix(other, params)
        if pre is not None:
            return (f" Other blocks carry the prefix {pre!r} (e.g. {other!r}): if the adapter covers several "
                    f"towers, read it with module_prefix={pre!r}")
    return ""


def _prefix_hint(block: str, params: Mapping) -> str:
    # The adapter's names carry a prefix the module lacks: read it with module_prefix=...
    pre = stripped_prefix(block, params)
    if pre is not None:
        return (f"; without the prefix {pre!r} it would match: read the adapter with "
                f"module_prefix={pre!r}")
    # The module holds it deeper: match against a submodule (e.g. model.visual) instead.
    name = deeper_name(block, params)
    if name is not None:
        sub = name[: -len(block) - 1]
        return (f"; the module holds it as {name!r}: pass the submodule instead (module.{sub}, e.g. "
                f"model.{sub} of an open_clip model)")
    sample = list(params)[:3]
    return f" (its parameters look like {sample})"
