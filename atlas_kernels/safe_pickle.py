"""A restricted reader for torch checkpoint files that never runs code from the file.

The task-vector papers released their checkpoints as pickled whole modules (saved with ``torch.save`` of the module):
the pickle names ``src.modeling.ImageEncoder``, the open_clip classes of the version that wrote it,
torchvision transforms, enums and plain functions. Unpickling such a file the ordinary way imports
all of those and calls whatever the file says, so it needs the original source and runs code.

This reader interprets the pickle itself (a subclass of the standard library's pure-Python
unpickler with every object-building opcode replaced):

- it resolves only an allowlist of globals: torch's tensor and parameter rebuild functions,
  storage types, dtypes, ``torch.Size``, ``collections.OrderedDict`` and plain containers, each
  replaced by a checked implementation here;
- every other global becomes a :class:`Global` stand-in that records its module and qualified name;
  calling it, instantiating it (``NEWOBJ``) or setting its state (``BUILD``) gives an :class:`Inert`
  object that records the arguments and state. Nothing is imported, nothing outside the allowlist
  is called, so a ``__reduce__`` payload (``os.system``, ``exec``, ``getattr`` chains, a nested
  ``torch.load``) is only recorded;
- tensor data is read straight from the file's storage records, with sizes checked against the file;
- what a file may make is bounded before it is made (issue 24's bombs): the zip directory is
  vetted before anything is inflated (records within the file, no record inflating more than
  ``MAX_INFLATE_RATIO`` times), every opcode and container item counts against ``MAX_OBJECTS``,
  reads never ask for more than the file holds, and the tensors together may view at most
  ``MAX_EXPANSION`` times the storage bytes the file carries (plus ``EXPANSION_SLACK``): stride-0
  and overlapping views are refused before anything is copied.

This is the only reader of torch files in the library: torch.load never sees one first (see
:mod:`atlas_kernels.checkpoints` for why).

Formats: torch's zip format, the legacy format (``_use_new_zipfile_serialization=False``) and plain
``pickle.dump`` files (tensors pickled on their own, storages as nested legacy files).
:func:`state_dict_from_object` then walks the stand-ins' ``_parameters``, ``_buffers`` and
``_modules`` (skipping non-persistent buffers) into an ordinary state dict.
"""
from __future__ import annotations

import io
import os
import struct
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any, Dict, Optional

import torch

from ._unpickler import (
    _DTYPES,
    _LEGACY_MAGIC,
    _LEGACY_PROTOCOL,
    _STORAGE_DTYPES,
    MAX_DEPTH,
    MAX_GLOBALS,
    MAX_INFLATE_RATIO,
    MAX_PICKLE_BYTES,
    UNSUPPORTED_ADVICE,
    Global,
    Inert,
    RefusedPickle,
    _Budget,
    _name,
    _Rebuilders,
    _size,
    _Storage,
    _StorageType,
    _Unpickler,
    tensor_kind,
)

__all__ = ["Global", "Inert", "RefusedPickle", "restricted_load", "state_dict_from_object", "describe"]


class _Bounded:
    """A file as the unpickler reads it, with every read capped at what is left of the file: the
    standard loader reads a declared length in one call (``FRAME``, ``BINBYTES8``), and a buffered
    read of 2^60 bytes allocates 2^60 bytes before it reads anything."""

    def __init__(self, fh, size: int):
        self.fh, self.size = fh, size

    def _left(self) -> int:
        return max(self.size - self.fh.tell(), 0)

    def read(self, n: int = -1) -> bytes:
        return self.fh.read(self._left() if n is None or n < 0 else min(n, self._left()))

    def readinto(self, b) -> int:
        return self.fh.readinto(b)  # the caller sized ``b`` (BYTEARRAY8 is bounded in _Unpickler)

    def readline(self, limit: int = -1) -> bytes:
        return self.fh.readline(limit)


class _Reader:
    def __init__(self, fh, size: int, *, budget: Optional[_Budget] = None, nested: int = 0):
        self.fh, self.size, self.nested = fh, size, nested
        self.budget = budget or _Budget()
        self._arena, self._used = None, 0
        self.globals: Dict[tuple, Any] = {}
        rb = _Rebuilders(self)
        self._impl = {
            ("torch._utils", "_rebuild_tensor_v2"): rb.tensor,
            ("torch._utils", "_rebuild_tensor"): rb.tensor_v1,
            ("torch._utils", "_rebuild_tensor_v3"): rb.tensor_v3,
            ("torch._utils", "_rebuild_parameter"): rb.parameter,
            ("torch._utils", "_rebuild_parameter_with_state"): rb.parameter,
            ("torch._tensor", "_rebuild_from_type_v2"): rb.from_type,
            ("torch._tensor", "_rebuild_from_type"): rb.from_type,
            ("torch.storage", "_load_from_bytes"): rb.load_from_bytes,
            ("_codecs", "encode"): rb.codecs_encode,
            ("copyreg", "_reconstructor"): rb.reconstructor,
            ("collections", "OrderedDict"): rb.container(OrderedDict),
            ("builtins", "set"): rb.container(set), ("builtins", "frozenset"): rb.container(frozenset),
            ("builtins", "list"): rb.container(list), ("builtins", "tuple"): rb.container(tuple),
            ("builtins", "dict"): rb.container(dict), ("torch", "Size"): rb.container(torch.Size),
        }

    # ------------------------------------------------------------------ globals
    def find_class(self, module, name):
        key = (str(module), str(name))
        hit = self.globals.get(key)
        if hit is not None:
            return hit
        if len(self.globals) >= MAX_GLOBALS:
            raise RefusedPickle(f"the file names more than {MAX_GLOBALS} globals")
        if key in self._impl:
            obj = Global(*key)  # resolved through callable_of, by identity of this key
        elif key[0] == "torch" and key[1] in _DTYPES:
            obj = _DTYPES[key[1]]
        elif key[0] in ("torch", "torch.cuda", "torch.storage") and key[1] in _STORAGE_DTYPES:
            obj = _StorageType(_STORAGE_DTYPES[key[1]])
        else:
            obj = Global(*key)
        self.globals[key] = obj
        return obj

    def callable_of(self, func):
        if isinstance(func, Global):
            return self._impl.get((func.module, func.qualname))
        return None

    def _alloc(self, nbytes: int) -> torch.Tensor:
        """Storage bytes carved from one buffer sized by the file: one large allocation per file,
        returned to the system when the file's tensors go (many separate storage-sized allocations
        fragment the heap, and a long import then holds several checkpoints' worth of freed memory)."""
        start = -(-self._used // 64) * 64
        if self._arena is None or start + nbytes > self._arena.numel():
            return torch.empty(nbytes, dtype=torch.uint8)  # beyond the file's size: on its own
        self._used = start + nbytes
        return self._arena[start:start + nbytes]

    def _make_arena(self, nbytes: int) -> None:
        self._arena, self._used = torch.empty(nbytes, dtype=torch.uint8), 0

    # ------------------------------------------------------------------ formats
    def _unpickle(self, fh, persistent_load=None):
        return _Unpickler(fh, self, persistent_load).load()

    def _vet_zip(self, zf: zipfile.ZipFile) -> None:
        """Every record of the archive, from its directory, before anything is read or inflated:
        it lies within the file, and a compressed one inflates to less than MAX_INFLATE_RATIO times
        its size (or to at most 1 MiB)."""
        for i in zf.infolist():
            if i.header_offset + i.compress_size > self.size:
                raise RefusedPickle(f"zip record {i.filename!r} claims {_size(i.compress_size)} at offset "
                                    f"{i.header_offset:,}, past the end of the {_size(self.size)} file "
                                    f"(truncated or hostile file)")
            if i.compress_type != zipfile.ZIP_STORED and i.file_size > max(MAX_INFLATE_RATIO * i.compress_size,
                                                                           1 << 20):
                raise RefusedPickle(f"zip record {i.filename!r} would inflate from {_size(i.compress_size)} to "
                                    f"{_size(i.file_size)} ({i.file_size / max(i.compress_size, 1):,.0f}:1; torch "
                                    f"writes its records uncompressed, and more than {MAX_INFLATE_RATIO}:1 is the "
                                    f"mark of a compression bomb); refused before inflating it")

    def load_zip(self, zf: zipfile.ZipFile):
        self._vet_zip(zf)
        names = zf.namelist()
        pkl = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
        if any(n.endswith("constants.pkl") for n in names) and any("/code/" in n for n in names):
            raise RefusedPickle("this is a TorchScript archive (torch.jit.save), not a checkpoint: "
                                "reading it means loading code")
        if len(pkl) != 1:
            raise RefusedPickle(f"a torch zip checkpoint has one '<root>/data.pkl', found {pkl[:3]}")
        root = pkl[0][: -len("data.pkl")]
        if root + "byteorder" in names:
            with zf.open(root + "byteorder") as fh:
                if fh.read(64).strip() not in (b"little", b""):
                    raise RefusedPickle("big-endian checkpoints are not supported")
        info = zf.getinfo(pkl[0])
        if info.file_size > MAX_PICKLE_BYTES:
            raise RefusedPickle(f"its data.pkl is {_size(info.file_size)} (limit {_size(MAX_PICKLE_BYTES)}; a "
                                f"checkpoint's pickle program is a few MiB at most)")
        storages: Dict[str, _Storage] = {}
        self._make_arena(sum(i.file_size + 64 for i in zf.infolist() if i.filename.startswith(root + "data/")))

        def persistent_load(pid):
            if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] in ("storage", b"storage")):
                raise RefusedPickle(f"unknown persistent id in a zip checkpoint: {_name(pid)}")
            _, stype, key, _location, numel = pid
            if not isinstance(stype, _StorageType) or not isinstance(key, str) or type(numel) is not int:
                raise RefusedPickle(f"malformed storage reference ({_name(stype)}, {key!r})")
            if key in storages:
                return _Storage(stype.dtype, storages[key].data)
            rec = f"{root}data/{key}"
            try:
                ri = zf.getinfo(rec)
            except KeyError:
                raise RefusedPickle(f"storage record {rec!r} is missing (truncated file?)") from None
            nbytes = numel * torch.empty(0, dtype=stype.dtype).element_size()
            if ri.compress_type != zipfile.ZIP_STORED or ri.file_size != nbytes:
                raise RefusedPickle(f"storage record {rec!r} holds {ri.file_size} bytes "
                                    f"(compression {ri.compress_type}); its reference says {nbytes}")
            self.budget.carry(nbytes)
            data = self._alloc(nbytes)
            # a stored (uncompressed) record is read in place: past its local header, one copy
            self.fh.seek(ri.header_offset)
            local = self.fh.read(30)
            if len(local) != 30 or local[:4] != b"PK\x03\x04":
                raise RefusedPickle(f"storage record {rec!r} has a broken header (corrupted file?)")
            name_len, extra_len = struct.unpack("<HH", local[26:30])
            self.fh.seek(ri.header_offset + 30 + name_len + extra_len)
            if nbytes and self.fh.readinto(memoryview(data.numpy())) != nbytes:
                raise RefusedPickle(f"storage record {rec!r} is short (truncated file?)")
            storages[key] = _Storage(stype.dtype, data)
            return storages[key]

        with zf.open(info) as fh:  # inflated within the vetted size (zipfile stops at file_size)
            return self._unpickle(io.BytesIO(fh.read(MAX_PICKLE_BYTES + 1)), persistent_load)

    def load_legacy_or_plain(self):
        fh = _Bounded(self.fh, self.size)
        first = self._unpickle(fh)
        if not (type(first) is int and first == _LEGACY_MAGIC):
            return first  # a plain pickle.dump file: that object is the content
        if self._unpickle(fh) != _LEGACY_PROTOCOL:
            raise RefusedPickle("legacy torch file with an unknown protocol version")
        sys_info = self._unpickle(fh)
        if isinstance(sys_info, dict) and sys_info.get("little_endian") is False:
            raise RefusedPickle("big-endian checkpoints are not supported")
        storages: Dict[Any, _Storage] = {}
        declared = [0]
        self._make_arena(self.size + 64 * 1024)

        def persistent_load(pid):
            if not isinstance(pid, tuple) or not pid:
                raise RefusedPickle(f"unknown persistent id in a legacy checkpoint: {_name(pid)}")
            kind = pid[0].decode("ascii") if isinstance(pid[0], bytes) else pid[0]
            if kind == "module" and len(pid) == 4:
                return pid[1]  # a module class (a Global stand-in); its saved source is ignored
            if kind != "storage" or len(pid) != 6:
                raise RefusedPickle(f"unknown persistent id kind {kind!r} in a legacy checkpoint")
            _, stype, key, _location, numel, view = pid
            if not isinstance(stype, _StorageType) or type(numel) is not int or numel < 0:
                raise RefusedPickle(f"malformed storage reference ({_name(stype)}, {key!r})")
            if view is not None:
                raise RefusedPickle("legacy storage views are not supported")
            if key not in storages:
                nbytes = numel * torch.empty(0, dtype=stype.dtype).element_size()
                declared[0] += nbytes
                if declared[0] > self.size:
                    raise RefusedPickle(f"storages declare {declared[0]:,} bytes, more than the file's "
                                        f"{self.size:,} (truncated or hostile file)")
                self.budget.carry(nbytes)
                storages[key] = _Storage(stype.dtype, self._alloc(nbytes))
            return storages[key]

        result = self._unpickle(fh, persistent_load)
        keys = self._unpickle(fh)
        if not isinstance(keys, list) or set(keys) != set(storages):
            raise RefusedPickle("legacy checkpoint: storage key list does not match the storages used")
        for key in keys:
            st = storages[key]
            elsize = torch.empty(0, dtype=st.dtype).element_size()
            head = self.fh.read(8)
            if len(head) != 8 or struct.unpack("<q", head)[0] * elsize != st.data.numel():
                raise RefusedPickle(f"legacy checkpoint: storage {key!r} has the wrong size (truncated file?)")
            n = st.data.numel()
            if n and self.fh.readinto(memoryview(st.data.numpy())) != n:
                raise RefusedPickle(f"legacy checkpoint: storage {key!r} is short (truncated file?)")
        return result


def restricted_load(path) -> Any:
    """Unpickle a torch checkpoint (zip, legacy or plain pickle) without importing or calling
    anything outside the allowlist, within the bounds above; returns plain containers, tensors
    (views into one buffer per file: copy one before handing it to an API that ignores a
    tensor's storage offset, such as torch.set_rng_state) and stand-ins."""
    path = os.fspath(path)
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        if zipfile.is_zipfile(fh):
            fh.seek(0)
            with zipfile.ZipFile(fh) as zf:
                return _Reader(fh, size).load_zip(zf)
        fh.seek(0)
        if fh.read(4) == b"PK\x03\x04":
            raise RefusedPickle("a zip archive without a readable directory (truncated or corrupted file?)")
        fh.seek(0)
        return _Reader(fh, size).load_legacy_or_plain()


# ---------------------------------------------------------------------------------- state dicts
def _module_state(obj) -> Optional[dict]:
    if isinstance(obj, Inert) and isinstance(obj.state, dict) and isinstance(obj.state.get("_parameters"), Mapping):
        return obj.state
    return None


def _walk(obj, prefix: str, out: Dict[str, torch.Tensor], depth: int, seen: set) -> None:
    if depth > MAX_DEPTH:
        raise RefusedPickle(f"modules nested deeper than {MAX_DEPTH}")
    if id(obj) in seen:
        return  # a module shared or referenced twice: its tensors are already in
    seen.add(id(obj))
    st = _module_state(obj)
    skip = st.get("_non_persistent_buffers_set") or ()
    skip = set(skip) if isinstance(skip, (set, frozenset, list, tuple)) else set()
    for group in ("_parameters", "_buffers"):
        tensors = st.get(group) or {}
        if not isinstance(tensors, Mapping):
            continue
        for name, t in tensors.items():
            if t is None or (group == "_buffers" and name in skip):
                continue
            if isinstance(t, torch.Tensor):
                out[prefix + str(name)] = t
            elif tensor_kind(t):
                raise RefusedPickle(f"{prefix}{name} is {tensor_kind(t)}: {UNSUPPORTED_ADVICE}")
    subs = st.get("_modules") or {}
    if isinstance(subs, Mapping):
        for name, m in subs.items():
            if _module_state(m) is not None:
                _walk(m, f"{prefix}{name}.", out, depth + 1, seen)


def describe(obj) -> str:
    """What an unpickled object is, in words, for error messages."""
    if tensor_kind(obj):
        return tensor_kind(obj)
    if isinstance(obj, Global):
        return f"a reference to {obj.name} (a class or function; nothing to read)"
    if isinstance(obj, Inert):
        if obj.how == "call":
            return f"a call of {_name(obj.cls)}(...) (recorded, not run)"
        if _module_state(obj) is not None:
            return f"a module {_name(obj.cls)} holding no tensors"
        return f"an object of class {_name(obj.cls)} holding no module state"
    if isinstance(obj, Mapping):
        return f"a {type(obj).__name__} with keys {[str(k) for k in list(obj)[:5]]}"
    return f"a {type(obj).__name__}"


def state_dict_from_object(obj, *, _depth: int = 0) -> Optional[Dict[str, torch.Tensor]]:
    """A state dict from an unpickled checkpoint: a mapping of names to tensors, a pickled module
    (its parameters and persistent buffers, as ``module.state_dict()`` names them), or either of
    those under a ``state_dict`` / ``model_state_dict`` / ``model`` / ``module`` key. None if the
    object holds no tensors."""
    if isinstance(obj, Mapping):
        if obj and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
            return dict(obj)
        if _depth == 0:
            for key in ("state_dict", "model_state_dict", "model", "module"):
                if key in obj:
                    got = state_dict_from_object(obj[key], _depth=1)
                    if got:
                        return got
        return None
    if _module_state(obj) is not None:
        out: Dict[str, torch.Tensor] = {}
        _walk(obj, "", out, 0, set())
        return out or None
    return None
