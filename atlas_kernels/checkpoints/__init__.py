"""Reading checkpoints without running code.

State dicts come from safetensors files, from ``torch.load(weights_only=True)``, or, for the pickled
whole modules the task-vector papers released (``src.modeling.ImageEncoder`` holding open_clip
classes of the version that wrote them), from the restricted reader in
:mod:`atlas_kernels.safe_pickle`: it needs none of those classes importable and calls nothing from
the file. A file from which no state dict can be recovered is refused, naming what it holds.

Image towers: :func:`select_tower` keeps the keys under a prefix (``"model.visual."`` for an
``ImageEncoder``, ``"visual."`` for an open_clip CLIP); ``prefix="auto"`` finds it. The names of the
tensors of open_clip's image towers (ViT and ModifiedResNet) are the same in open_clip 0.2.1, 1.3.0,
2.0.2, 2.10.1, 2.20.0 and 3.3.0 (checked in its history: only activation and dropout modules,
which hold no tensors, were renamed, e.g. ``relu`` -> ``act1``), so no key mapping is needed; the
task-vector import checks every name and shape against the open_clip model it targets, so a
future rename fails loudly instead of mismatching.
"""
from __future__ import annotations

import errno
import importlib
import logging
import os
from collections.abc import Mapping
from typing import Dict, NamedTuple, Optional, Tuple

import torch

from .. import safe_pickle
from .._checks import prefix_cut_problem, prefix_matches_nothing

__all__ = ["load_state_dict_file", "convert_checkpoint", "load_head", "Head", "select_tower",
           "find_tower_prefix"]

log = logging.getLogger("atlas_kernels")


# Torch files go through the restricted reader only; torch.load never sees them. Both read the
# same pickle opcodes in pure Python, so torch first bought nothing but exposure:
# torch.load(weights_only=True) accepts a 190 KB file of 12 GiB of stride-0 views and inflates a
# 245 KB zip's 251 MB pickle (over 4 GiB and a minute before it gives up), and its refusals advise
# weights_only=False. The restricted reader vets the archive before inflating anything, counts
# every object it builds and bounds what the tensors may view against the bytes the file carries
# (see safe_pickle / _unpickler), reads the same formats (zip, legacy, plain pickle) and the same
# tensors (v2 and v3 rebuilds: every dtype), and runs nothing from the file.
_PICKLE_START = (b"PK\x03\x04", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


def not_a_pickle(label: str, head: bytes) -> Optional[str]:
    """Why a file (``label``: its name in messages) that does not start as a torch file (a zip
    archive, or a pickle of protocol 2 to 5, as torch and pickle.dump write them) is not one, or
    None when it does."""
    if head.startswith(_PICKLE_START):
        return None
    text = head.decode("utf-8", "ignore")  # a character cut at the 16th byte is dropped
    looks_text = len(text) >= len(head) - 3 and all(c.isprintable() or c in "\t\r\n" for c in text)
    return (f"{label} is not a checkpoint: it starts with {head[:12]!r}"
            + (" (a text file?)" if looks_text else "")
            + "; a torch checkpoint starts with a zip header (b'PK') or a pickle protocol marker "
              "(b'\\x80'), a safetensors file with an 8-byte header length and '{'")


def out_of_memory(exc: BaseException) -> bool:
    """True for the allocation failures of Python and of torch's CPU allocator."""
    return isinstance(exc, MemoryError) or (
        isinstance(exc, RuntimeError) and ("can't allocate memory" in str(exc) or "not enough memory" in str(exc)))


def read_torch_file(path: str, what: str = "checkpoint"):
    """The object a torch file holds, through the restricted reader only (see above); refusals
    name the file and why, and running out of memory is said as such."""
    label = repr(path) if what == "checkpoint" else f"{what} {path!r}"
    with open(path, "rb") as fh:
        head = fh.read(16)
    why = not_a_pickle(label, head)
    if why:
        raise ValueError(why)
    try:
        return safe_pickle.restricted_load(path)
    except safe_pickle.RefusedPickle as exc:
        raise ValueError(f"{label} could not be read: it is not a checkpoint this library can read safely "
                         f"(nothing in it was run): {exc}") from None
    except Exception as exc:  # a malformed pickle program: the standard unpickler's own errors
        if out_of_memory(exc):
            raise MemoryError(f"ran out of memory while reading {label} ({os.path.getsize(path):,} bytes on "
                              f"disk); the file itself may be fine: free memory, or read it on a machine with "
                              f"more, and try again") from None
        raise ValueError(f"{label} could not be read: it is not a checkpoint this library can read (truncated or "
                         f"corrupted? nothing in it was run): {type(exc).__name__}: {str(exc)[:200]}") from None


def _read_object(path: str):
    return read_torch_file(path)


def check_file(path, what: str = "checkpoint") -> None:
    """A clear error for a path that is not a readable, non-empty file: missing, a directory, a
    broken symlink or a symlink loop, or empty."""
    if os.path.islink(path) and not os.path.exists(path):
        try:
            os.stat(path)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise ValueError(f"{what} {path!r} is a symbolic link loop (it points back to itself)") from None
        raise FileNotFoundError(f"{what} {path!r} is a broken symbolic link (to {os.readlink(path)!r}, "
                                f"which does not exist)")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} {path!r} does not exist")
    if os.path.isdir(path):
        raise ValueError(f"{what} {path!r} is a directory, not a file")
    if not os.path.isfile(path):
        raise ValueError(f"{what} {path!r} is {special_file(path)}, not a regular file: reading it could block "
                         f"or never end; pass the file itself")
    if os.path.getsize(path) == 0:
        raise ValueError(f"{what} {path!r} is empty (0 bytes): an interrupted download or copy?")


def special_file(path) -> str:
    """What a path that is not a regular file or a folder is, in words (following symlinks, and
    naming the target of one): a named pipe (FIFO), a character device (such as /dev/zero) ..."""
    import stat

    mode = os.stat(path).st_mode
    kind = next((k for test, k in ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISCHR, "a character device"),
                                   (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")) if test(mode)),
                "a special file")
    if os.path.islink(path):
        kind = f"a symbolic link to {os.path.realpath(path)!r}, {kind}"
    return kind


def unreadable_safetensors(path, exc: BaseException) -> ValueError:
    """The error for a file that safetensors cannot parse (the one place that says it), instead of
    safetensors' own error types; the caller raises it ``from exc``."""
    return ValueError(f"{str(path)!r} is not a readable safetensors file (truncated or corrupted?): {exc}")


def read_safetensors(path) -> Tuple[Dict[str, str], Dict[str, torch.Tensor]]:
    """``(metadata, tensors)`` of a whole safetensors file; a file that safetensors cannot parse is
    refused with :func:`unreadable_safetensors` rather than safetensors' own error."""
    from safetensors import safe_open

    path = str(path)
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            return dict(f.metadata() or {}), {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError:
        raise
    except Exception as exc:  # safetensors raises its own error types for broken headers
        raise unreadable_safetensors(path, exc) from exc


def load_state_dict_file(path) -> Dict[str, torch.Tensor]:
    """A state dict from a safetensors file or a torch file, without running code from it.

    Torch files: a saved dict (also under a ``state_dict`` / ``model_state_dict`` / ``model`` key) or
    a pickled whole module (zip, legacy or plain-pickle format), whose parameters and persistent
    buffers are recovered under their ``module.state_dict()`` names. Nothing in the file is imported
    or called; a file holding no tensors (a bare call, a function, an empty module) is refused with a
    message naming what it holds."""
    path = str(path)
    check_file(path)
    with open(path, "rb") as fh:
        head = fh.read(16)
    if path.endswith(".safetensors") or (len(head) >= 9 and head[8:9] == b"{"):
        meta, sd = read_safetensors(path)
        other = _OWN_FORMATS.get(meta.get("format", ""))
        if other:
            raise ValueError(f"{path!r} is {other[0]}, not a state dict (its metadata says format="
                             f"{meta['format']!r}): {other[1]}")
        return sd
    obj = _read_object(path)
    lin = linearised_formats()
    if lin is not None and lin.is_linearised_state_dict(obj):
        # tangent_task_arithmetic's positional format: named, shape-checked
        return lin.to_named_state_dict(obj, what=repr(path))
    return _unwrap(obj, path)


# The library's own safetensors files, which hold tensors but not a model's weights: read as a
# state dict, a coefficient file gave its coefficients back as if they were weights.
_OWN_FORMATS = {
    "atlas_kernels.coefficients": ("an atlas_kernels coefficient file",
                                   "load it with ak.load_coefficients(module, path) after ak.patch(module, ...)"),
    "atlas_kernels.task_vectors": ("an atlas_kernels task-vector file", "load it with ak.TaskVectors.load(path)"),
    "atlas_kernels.linearised": ("an atlas_kernels linearised export",
                                 "load it with ak.load_linearised(path, module) (module: a plain model of the "
                                 "same architecture)"),
}


def linearised_formats():
    """The reader of the published linearised checkpoints (:mod:`atlas_kernels.checkpoints.linearised`),
    or None in an install without the linearised mode (then plain and pickled state dicts only).
    The one place that looks: the task-vector import asks here too."""
    try:
        # import_module, not "from . import linearised": it consults sys.modules every time, so a
        # test (or an install) that takes the reader away is seen even after it was imported once
        return importlib.import_module(__name__ + ".linearised")
    except ImportError:
        return None


def _unwrap(obj, path) -> Dict[str, torch.Tensor]:
    sd = safe_pickle.state_dict_from_object(obj)
    if sd:
        return sd
    if isinstance(obj, Mapping) and obj:
        bad = next(((k, v) for k, v in obj.items() if not isinstance(v, torch.Tensor)), None)
        kind = None if bad is None else safe_pickle.tensor_kind(bad[1])
        if kind:
            raise ValueError(f"{path!r}: tensor {bad[0]!r} is {kind}; {safe_pickle.UNSUPPORTED_ADVICE}")
        if bad is not None:
            raise ValueError(f"{path!r} is not a state dict (a mapping from names to tensors): key {bad[0]!r} "
                             f"holds {safe_pickle.describe(bad[1])}")
    raise ValueError(f"{path!r} is not a state dict and holds none: it holds {safe_pickle.describe(obj)}")


# ------------------------------------------------------------------------------- image towers
_TOWER_MARKERS = ("conv1.weight", "class_embedding", "attnpool.c_proj.weight", "trunk.")


def find_tower_prefix(sd: Mapping) -> str:
    """The prefix of the image tower in a CLIP-shaped state dict: the shortest key part ending in
    ``visual.`` (``visual.``, ``model.visual.``, ``module.model.visual.`` ...), or ``""`` for a bare
    image tower. Raises ValueError when there is none or several."""
    found = set()
    for k in sd:
        i = str(k).find("visual.")
        if i >= 0 and (i == 0 or str(k)[i - 1] == "."):
            found.add(str(k)[: i + len("visual.")])
    if len(found) == 1:
        return found.pop()
    if len(found) > 1:
        raise ValueError(f"prefix='auto': several image towers in the state dict ({sorted(found)}); "
                         f"pass prefix= one of them")
    if any(str(k).startswith(m) for k in sd for m in _TOWER_MARKERS):
        return ""
    raise ValueError(f"prefix='auto': no image tower (no 'visual.' keys, no conv1.weight) in a state dict "
                     f"with keys like {[str(k) for k in list(sd)[:4]]}")


def select_tower(sd: Mapping, prefix: Optional[str], label: str = "checkpoint"
                 ) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor], str]:
    """``(kept, dropped, prefix)``: the keys under ``prefix`` with it stripped, the rest (for an
    ImageEncoder: the text-tower leftovers ``token_embedding``, ``positional_embedding``,
    ``ln_final``, ``text_projection``, ``logit_scale``), and the prefix used (``"auto"`` resolved)."""
    if prefix == "auto":
        prefix = find_tower_prefix(sd)
    prefix = prefix or ""
    kept, dropped = {}, {}
    for k, v in sd.items():
        if str(k).startswith(prefix):
            why = prefix_cut_problem("prefix", prefix, str(k))
            if why:
                raise ValueError(f"{label}: {why}")
            kept[str(k)[len(prefix):]] = v
        else:
            dropped[str(k)] = v
    if not kept:
        raise ValueError(prefix_matches_nothing("prefix", prefix, f"no key of {label}", sd, auto=True))
    return kept, dropped, prefix


def nbytes(sd: Mapping) -> int:
    return sum(v.numel() * v.element_size() for v in sd.values() if isinstance(v, torch.Tensor))


def dropped_note(dropped: Mapping, prefix: str) -> str:
    names = sorted({k.split(".")[-2] if k.endswith((".weight", ".bias")) else k.split(".")[-1]
                    for k in dropped})
    return (f"dropped {len(dropped)} tensor(s) outside the image tower {prefix!r} "
            f"({', '.join(names[:6])}{', ...' if len(names) > 6 else ''}): {nbytes(dropped) / 2**20:.1f} MiB "
            f"per checkpoint not kept")


# ------------------------------------------------------------------------------------ heads
class Head(NamedTuple):
    """A classification head: ``logits = (normalize(x) if normalize else x) @ weight.T + bias``;
    ``weight`` is ``[classes, features]``, ``bias`` ``[classes]``."""
    weight: torch.Tensor
    bias: torch.Tensor
    normalize: bool


def load_head(path, *, normalize: Optional[bool] = None) -> Head:
    """The weight, bias and normalize flag of a classification head file, read without running code:
    a pickled ``src.modeling.ClassificationHead`` (a ``torch.nn.Linear`` with a ``normalize``
    attribute, as the task-vector papers released them), or a state dict with ``weight`` and
    optionally ``bias`` (safetensors metadata ``normalize`` = ``"true"``/``"false"``). ``normalize``
    overrides the file; where neither says, True (every published head normalizes its input)."""
    path = str(path)
    check_file(path, "head file")  # every reader checks first: a FIFO or /dev/zero would block or never end
    flag = None
    if path.endswith(".safetensors"):
        meta, sd = read_safetensors(path)
        meta = meta.get("normalize")
        flag = None if meta is None else meta.lower() == "true"
    else:
        obj = read_torch_file(path, "head file")
        st = safe_pickle._module_state(obj)
        if st is not None and isinstance(st.get("normalize"), bool):
            flag = st["normalize"]
        sd = _unwrap(obj, path)
    if "weight" not in sd:
        raise ValueError(f"head file {path!r} has no 'weight' (keys: {sorted(sd)[:5]})")
    w = sd["weight"]
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"head file {path!r}: weight must be a floating [classes, features] matrix, "
                         f"got {tuple(w.shape)} {w.dtype}")
    b = sd.get("bias")
    if b is None:
        b = torch.zeros(w.shape[0], dtype=w.dtype)
    if tuple(b.shape) != (w.shape[0],):
        raise ValueError(f"head file {path!r}: bias has shape {tuple(b.shape)}, expected ({w.shape[0]},)")
    if normalize is not None:
        flag = bool(normalize)
    return Head(w.detach().float().contiguous(), b.detach().float().contiguous(), True if flag is None else flag)


def save_head(head: Head, path) -> None:
    """Write a head as safetensors (``weight``, ``bias``; metadata ``normalize``), atomically."""
    from .._io import atomic_save_safetensors

    atomic_save_safetensors({"weight": head.weight.contiguous(), "bias": head.bias.contiguous()}, path,
                            metadata={"normalize": "true" if head.normalize else "false"})


def convert_checkpoint(src, dst, *, prefix: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """Write a checkpoint's state dict (a state dict, or a pickled whole module as the task-vector
    papers released them, read without running code) as a safetensors file at ``dst``. ``prefix``
    keeps only the keys under it, stripped (``"auto"``: the image tower)."""
    sd = load_state_dict_file(src)
    if prefix:
        sd = select_tower(sd, prefix, str(src))[0]
    from .._io import atomic_save_safetensors

    sd = {k: v.detach().clone().contiguous() for k, v in sd.items()}
    atomic_save_safetensors(sd, dst)
    return sd
