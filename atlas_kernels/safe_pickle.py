"""A restricted reader for torch checkpoint files that never runs code from the file.

The task-vector papers released their checkpoints as pickled whole modules (``torch.save(module)``):
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
- tensor data is read straight from the file's storage records, with sizes checked against the file.

Formats: torch's zip format, the legacy format (``_use_new_zipfile_serialization=False``) and plain
``pickle.dump`` files (tensors pickled on their own, storages as nested legacy files).
:func:`state_dict_from_object` then walks the stand-ins' ``_parameters``, ``_buffers`` and
``_modules`` (skipping non-persistent buffers) into an ordinary state dict.
"""
from __future__ import annotations

import _compat_pickle
import io
import os
import pickle
import struct
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any, Dict, Optional

import torch

__all__ = ["Global", "Inert", "RefusedPickle", "restricted_load", "state_dict_from_object", "describe"]

MAX_PICKLE_BYTES = 1 << 28       # the pickle program of a checkpoint (not its tensor data)
MAX_OBJECTS = 20_000_000         # elements built by container calls, stand-ins and tensors together
MAX_GLOBALS = 10_000             # distinct global names a file may mention
MAX_DEPTH = 256                  # nesting of modules walked for a state dict
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


class RefusedPickle(pickle.UnpicklingError):
    """The file asks for something this reader does not do (named in the message)."""


class Global:
    """Stand-in for a global the file names (a class or function); never imported."""

    __slots__ = ("module", "qualname")

    def __init__(self, module: str, qualname: str):
        self.module, self.qualname = module, qualname

    @property
    def name(self) -> str:
        return f"{self.module}.{self.qualname}"

    def __repr__(self) -> str:
        return f"<global {self.name}>"


class Inert:
    """Stand-in for an object the file builds: ``how`` is ``"call"`` (REDUCE), ``"new"`` (NEWOBJ,
    an object of class ``cls``) with the recorded ``args``, ``kwargs``, ``state`` (BUILD) and any
    list or dict items appended to it."""

    __slots__ = ("cls", "how", "args", "kwargs", "state", "items", "dict_items")

    def __init__(self, cls, how, args=(), kwargs=None):
        self.cls, self.how, self.args, self.kwargs = cls, how, tuple(args), dict(kwargs or {})
        self.state, self.items, self.dict_items = None, [], {}

    # the only methods the pickle machine may reach on a stand-in: record, never act
    def append(self, x):
        self.items.append(x)

    def extend(self, xs):
        self.items.extend(xs)

    def __setitem__(self, k, v):
        self.dict_items[k] = v

    def __repr__(self) -> str:
        return f"<{'call of' if self.how == 'call' else 'object of'} {_name(self.cls)}>"


def _name(x) -> str:
    if isinstance(x, Global):
        return x.name
    if isinstance(x, Inert):
        return f"(result of {_name(x.cls)}(...))"
    return type(x).__name__


class _Storage:
    """A storage read from the file: raw bytes (uint8) and the dtype they hold."""

    __slots__ = ("dtype", "data")

    def __init__(self, dtype: torch.dtype, data: torch.Tensor):
        self.dtype, self.data = dtype, data

    def typed(self) -> torch.Tensor:
        if self.data.numel() == 0:
            return torch.empty(0, dtype=self.dtype)
        return self.data.view(self.dtype)


class _StorageType:
    __slots__ = ("dtype",)

    def __init__(self, dtype):
        self.dtype = dtype


_DTYPES = {n: getattr(torch, n) for n in dir(torch) if isinstance(getattr(torch, n, None), torch.dtype)}
_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool, "ComplexFloatStorage": torch.complex64,
    "ComplexDoubleStorage": torch.complex128, "UntypedStorage": torch.uint8,
}


class _Budget:
    def __init__(self):
        self.n = 0

    def take(self, k: int = 1):
        self.n += int(k)
        if self.n > MAX_OBJECTS:
            raise RefusedPickle(f"the file builds more than {MAX_OBJECTS:,} objects (limit against "
                                f"memory exhaustion)")


def _ints(x, what) -> tuple:
    if not isinstance(x, (tuple, list, torch.Size)) or not all(type(v) is int and v >= 0 for v in x):
        raise RefusedPickle(f"tensor {what} must be a tuple of non-negative ints, got {_name(x)}")
    return tuple(x)


class _Rebuilders:
    """The allowlisted callables, each a checked implementation (never torch's own via the file)."""

    def __init__(self, reader: "_Reader"):
        self.reader = reader

    def tensor(self, storage, offset, size, stride, *_ignored):
        if not isinstance(storage, _Storage):
            raise RefusedPickle(f"a tensor's storage must come from the file's storage records, got {_name(storage)}")
        if type(offset) is not int or offset < 0:
            raise RefusedPickle(f"tensor storage offset must be a non-negative int, got {offset!r}")
        size, stride = _ints(size, "size"), _ints(stride, "stride")
        if len(size) != len(stride):
            raise RefusedPickle(f"tensor size {size} and stride {stride} differ in length")
        flat = storage.typed()
        numel = 1
        for s in size:
            numel *= s
        extent = offset + sum((s - 1) * st for s, st in zip(size, stride)) + 1 if numel else 0
        if extent > flat.numel():
            raise RefusedPickle(f"tensor of size {size}, stride {stride}, offset {offset} reaches past its "
                                f"storage of {flat.numel()} elements")
        if numel > max(flat.numel(), 1 << 20):
            raise RefusedPickle(f"tensor of size {size} views {numel:,} elements of a storage of "
                                f"{flat.numel():,} (refused: it would expand past the file's data)")
        self.reader.budget.take()
        return flat.as_strided(size, stride, flat.storage_offset() + offset)  # offsets count from the storage

    def tensor_v1(self, storage, offset, size, stride):
        return self.tensor(storage, offset, size, stride)

    def parameter(self, data, *_ignored):
        if not isinstance(data, torch.Tensor):
            raise RefusedPickle(f"a parameter must wrap a tensor, got {_name(data)}")
        return data

    def from_type(self, func, new_type, args, *_ignored):
        impl = self.reader.callable_of(func)
        if impl is None:
            return Inert(func, "call", args if isinstance(args, tuple) else (args,))
        return impl(*args)

    def load_from_bytes(self, b):
        if not isinstance(b, (bytes, bytearray)):
            raise RefusedPickle(f"a pickled storage must be bytes, got {_name(b)}")
        if self.reader.nested >= 1:
            raise RefusedPickle("a storage nested in a storage (refused)")
        inner = _Reader(io.BytesIO(bytes(b)), len(b), budget=self.reader.budget, nested=self.reader.nested + 1)
        obj = inner.load_legacy_or_plain()
        if not isinstance(obj, _Storage):
            raise RefusedPickle(f"a pickled storage holds {_name(obj)}, not a storage")
        return obj

    def codecs_encode(self, s, encoding="utf-8", *_ignored):
        # protocol 2 pickles bytes as _codecs.encode(str, "latin1")
        if not isinstance(s, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8", "ascii"):
            raise RefusedPickle(f"_codecs.encode takes a str and a text encoding here, got {_name(s)}, {encoding!r}")
        return s.encode(encoding)

    def reconstructor(self, cls, base, state=None):
        if isinstance(cls, Global):
            return Inert(cls, "new")
        raise RefusedPickle(f"copyreg._reconstructor of {_name(cls)} (refused)")

    def container(self, typ):
        def build(*args):
            if len(args) > 1:
                raise RefusedPickle(f"{typ.__name__}() with {len(args)} arguments (refused)")
            if args and not isinstance(args[0], (list, tuple, set, frozenset, dict, str, bytes, torch.Size)):
                raise RefusedPickle(f"{typ.__name__}() of {_name(args[0])} (refused)")
            out = typ(*args)
            self.reader.budget.take(len(out) + 1)
            return out
        return build


class _Unpickler(pickle._Unpickler):
    """The standard library's pure-Python unpickler with every opcode that finds a global, calls
    something or sets state replaced (see the module docstring)."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, fh, reader: "_Reader", persistent_load):
        super().__init__(fh, encoding="utf-8")
        self.reader = reader
        self._pload = persistent_load

    def persistent_load(self, pid):
        if self._pload is None:
            raise RefusedPickle("the pickle references external storage, but this file format has none")
        return self._pload(pid)

    def find_class(self, module, name):
        if self.proto < 3:  # Python 2 names (``__builtin__.set``, ``copy_reg``): a table lookup only
            if (module, name) in _compat_pickle.NAME_MAPPING:
                module, name = _compat_pickle.NAME_MAPPING[(module, name)]
            else:
                module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        return self.reader.find_class(module, name)

    def _call(self, func, args, kwargs=None):
        impl = self.reader.callable_of(func)
        if impl is not None:
            if kwargs:
                raise RefusedPickle(f"keyword arguments for {_name(func)} (refused)")
            try:
                return impl(*args)
            except RefusedPickle:
                raise
            except Exception as exc:
                raise RefusedPickle(f"{_name(func)}(...) with these arguments fails: {exc}") from None
        if isinstance(func, (Global, Inert)):
            self.reader.budget.take()
            return Inert(func, "call", args, kwargs)
        raise RefusedPickle(f"the pickle calls a {type(func).__name__}, which is not allowed")

    def _new(self, cls, args, kwargs=None):
        if isinstance(cls, Global):
            self.reader.budget.take()
            return Inert(cls, "new", args, kwargs)
        if cls in (OrderedDict, dict, list, set):
            return cls()
        raise RefusedPickle(f"the pickle instantiates {_name(cls)} (refused)")

    def load_reduce(self):
        args = self.stack.pop()
        func = self.stack[-1]
        if not isinstance(args, tuple):
            raise RefusedPickle("REDUCE arguments are not a tuple")
        self.stack[-1] = self._call(func, args)
    dispatch[pickle.REDUCE[0]] = load_reduce

    def load_newobj(self):
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(self._new(cls, args))
    dispatch[pickle.NEWOBJ[0]] = load_newobj

    def load_newobj_ex(self):
        kwargs = self.stack.pop()
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(self._new(cls, args, kwargs))
    dispatch[pickle.NEWOBJ_EX[0]] = load_newobj_ex

    def load_inst(self):
        module = self.readline()[:-1].decode("ascii")
        name = self.readline()[:-1].decode("ascii")
        cls = self.find_class(module, name)
        self.append(self._new(cls, tuple(self.pop_mark())))
    dispatch[pickle.INST[0]] = load_inst

    def load_obj(self):
        args = self.pop_mark()
        cls = args.pop(0)
        self.append(self._new(cls, tuple(args)))
    dispatch[pickle.OBJ[0]] = load_obj

    def load_build(self):
        state = self.stack.pop()
        inst = self.stack[-1]
        if isinstance(inst, Inert):
            inst.state = state
        elif isinstance(inst, OrderedDict) and isinstance(state, dict):
            # a state dict's ``_metadata`` attribute: stored as data, no setattr on arbitrary names
            for k, v in state.items():
                if isinstance(k, str) and not k.startswith("__"):
                    inst.__dict__[k] = v
        elif isinstance(inst, torch.Tensor):
            pass  # tensor attributes (e.g. a parameter's python state) are not needed for weights
        else:
            raise RefusedPickle(f"the pickle sets the state of a {type(inst).__name__} (refused)")
    dispatch[pickle.BUILD[0]] = load_build

    def _target(self, obj, kinds, op):
        if not isinstance(obj, kinds):
            raise RefusedPickle(f"{op} on a {type(obj).__name__} (refused)")
        return obj

    def load_append(self):
        value = self.stack.pop()
        self._target(self.stack[-1], (list, Inert), "APPEND").append(value)
    dispatch[pickle.APPEND[0]] = load_append

    def load_appends(self):
        items = self.pop_mark()
        self._target(self.stack[-1], (list, Inert), "APPENDS").extend(items)
    dispatch[pickle.APPENDS[0]] = load_appends

    def load_setitem(self):
        value = self.stack.pop()
        key = self.stack.pop()
        self._target(self.stack[-1], (dict, Inert), "SETITEM")[key] = value
    dispatch[pickle.SETITEM[0]] = load_setitem

    def load_setitems(self):
        items = self.pop_mark()
        d = self._target(self.stack[-1], (dict, Inert), "SETITEMS")
        for i in range(0, len(items), 2):
            d[items[i]] = items[i + 1]
    dispatch[pickle.SETITEMS[0]] = load_setitems

    def load_additems(self):
        items = self.pop_mark()
        self._target(self.stack[-1], (set,), "ADDITEMS").update(items)
    dispatch[pickle.ADDITEMS[0]] = load_additems


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

    def load_zip(self, zf: zipfile.ZipFile):
        names = zf.namelist()
        pkl = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
        if any(n.endswith("constants.pkl") for n in names) and any("/code/" in n for n in names):
            raise RefusedPickle("this is a TorchScript archive (torch.jit.save), not a checkpoint: "
                                "reading it means loading code")
        if len(pkl) != 1:
            raise RefusedPickle(f"a torch zip checkpoint has one '<root>/data.pkl', found {pkl[:3]}")
        root = pkl[0][: -len("data.pkl")]
        if root + "byteorder" in names and zf.read(root + "byteorder").strip() not in (b"little", b""):
            raise RefusedPickle("big-endian checkpoints are not supported")
        info = zf.getinfo(pkl[0])
        if info.file_size > MAX_PICKLE_BYTES:
            raise RefusedPickle(f"data.pkl is {info.file_size:,} bytes (limit {MAX_PICKLE_BYTES:,})")
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

        with zf.open(info) as fh:
            return self._unpickle(io.BytesIO(fh.read()), persistent_load)

    def load_legacy_or_plain(self):
        first = self._unpickle(self.fh)
        if not (type(first) is int and first == _LEGACY_MAGIC):
            return first  # a plain pickle.dump file: that object is the content
        if self._unpickle(self.fh) != _LEGACY_PROTOCOL:
            raise RefusedPickle("legacy torch file with an unknown protocol version")
        sys_info = self._unpickle(self.fh)
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
                storages[key] = _Storage(stype.dtype, self._alloc(nbytes))
            return storages[key]

        result = self._unpickle(self.fh, persistent_load)
        keys = self._unpickle(self.fh)
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
    anything outside the allowlist; returns plain containers, tensors and stand-ins."""
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
    subs = st.get("_modules") or {}
    if isinstance(subs, Mapping):
        for name, m in subs.items():
            if _module_state(m) is not None:
                _walk(m, f"{prefix}{name}.", out, depth + 1, seen)


def describe(obj) -> str:
    """What an unpickled object is, in words, for error messages."""
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
