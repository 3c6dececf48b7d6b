"""The opcode-level half of the restricted reader (see :mod:`atlas_kernels.safe_pickle`): the
stand-ins for globals and objects, the checked implementations of the allowlisted callables, and
the standard library's pure-Python unpickler with every opcode that finds a global, calls
something or sets state replaced. Nothing here imports or calls anything a file names."""
from __future__ import annotations

import _compat_pickle
import io
import pickle
import struct
from collections import OrderedDict
from typing import Any, Optional, Protocol

import torch

MAX_PICKLE_BYTES = 1 << 28       # the pickle program of a checkpoint (not its tensor data)
# Every opcode run and every item put into a container counts once (a list of 120 M small ints is
# 120 M appends, not one object). Measured: open_clip's ViT-L/14 CLIP pickled whole counts 71 k, its
# state dict 19 k (about 40 per tensor). At the limit the reader has run about 1.5 s and holds
# about 0.3 GiB beyond the pickle program itself.
MAX_OBJECTS = 5_000_000
MAX_GLOBALS = 10_000             # distinct global names a file may mention
MAX_DEPTH = 256                  # nesting of modules walked for a state dict
# What a file's tensors may view against the tensor data it carries: tied and sliced tensors
# view each byte once or twice; a stride-0 or overlapping view repeats it, and 3000 (1024, 1024)
# views of one 6-element storage (a 190 KB file) are 12 GiB once copied. Refused past
# MAX_EXPANSION x the storage bytes plus EXPANSION_SLACK (broadcast buffers saved as views).
MAX_EXPANSION = 2
EXPANSION_SLACK = 64 << 20
# A zip record inflating more than this many times its compressed size (and past 1 MiB) is refused
# before it is inflated: torch writes its records uncompressed, and deflate reaches ~1000:1 only
# on repetitive, made-up content (a compression bomb).
MAX_INFLATE_RATIO = 100
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


_META = "torch._utils._rebuild_meta_tensor_no_storage"
_SPARSE = ("torch._utils._rebuild_sparse_tensor", "torch._utils._rebuild_sparse_csr_tensor")


def tensor_kind(x) -> Optional[str]:
    """What a recorded call that would have built an unsupported tensor builds, in words (a meta
    tensor, a sparse tensor), or None."""
    if not (isinstance(x, Inert) and x.how == "call" and isinstance(x.cls, Global)):
        return None
    if x.cls.name == _META:
        shape = x.args[1] if len(x.args) > 1 and isinstance(x.args[1], tuple) else "?"
        return f"a meta tensor of shape {shape} (it holds no values)"
    if x.cls.name in _SPARSE:
        return "a sparse tensor"
    return None


UNSUPPORTED_ADVICE = ("this library reads dense tensors with values; save the real weights (a meta tensor comes "
                      "from a model built on the meta device, or saved before its weights were loaded), and a "
                      "sparse one with .to_dense()")


def _name(x) -> str:
    if isinstance(x, Global):
        return x.name
    if isinstance(x, Inert):
        return tensor_kind(x) or f"(result of {_name(x.cls)}(...))"
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


def _size(n: int) -> str:
    """A byte count for messages: ``12.0 GiB (12,884,901,888 bytes)``, or ``24 bytes``."""
    if n < 1 << 10:
        return f"{n:,} bytes"
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.1f} {unit} ({n:,} bytes)"
    return f"{n:,} bytes"  # pragma: no cover


class _Budget:
    """What one file may build, shared by its nested readers: objects (opcodes run and container
    items), and tensor bytes viewed against the storage bytes the file carries."""

    def __init__(self):
        self.n = 0
        self.carried = self.viewed = self.storages = self.tensors = 0

    def take(self, k: int = 1):
        self.n += int(k)
        if self.n > MAX_OBJECTS:
            raise RefusedPickle(f"its pickle builds more than {MAX_OBJECTS:,} objects and items (a checkpoint "
                                f"needs far fewer; refused before it exhausts memory)")

    def carry(self, nbytes: int) -> None:
        """A storage of ``nbytes`` read from the file."""
        self.carried += int(nbytes)
        self.storages += 1

    def view(self, nbytes: int) -> None:
        """A tensor of ``nbytes`` built over the file's storages: refused when the tensors together
        would expand past MAX_EXPANSION x the storage bytes plus EXPANSION_SLACK."""
        self.viewed += int(nbytes)
        self.tensors += 1
        if self.viewed > MAX_EXPANSION * self.carried + EXPANSION_SLACK:
            raise RefusedPickle(
                f"its tensors would expand to {_size(self.viewed)} (after {self.tensors:,} tensors) from "
                f"{_size(self.carried)} of tensor data in {self.storages:,} storage(s); a checkpoint's tensors "
                f"may view at most {MAX_EXPANSION}x the data it carries plus {EXPANSION_SLACK >> 20} MiB. "
                f"Views that repeat elements (stride 0) or overlap are refused before anything is copied "
                f"(an expansion bomb?)")


class _Reader(Protocol):
    """What this half needs of the file-level reader (``safe_pickle._Reader``, which imports this
    module; the dependency runs that way only): the shared object budget, the nesting depth, the
    global lookup, the allowlist, and a constructor for a nested (pickled-storage) file."""

    budget: _Budget
    nested: int
    size: int

    def __init__(self, fh, size: int, *, budget: Optional[_Budget] = None, nested: int = 0): ...

    def find_class(self, module: str, name: str) -> Any: ...

    def callable_of(self, func) -> Any: ...

    def load_legacy_or_plain(self) -> Any: ...


def _ints(x, what) -> tuple:
    if not isinstance(x, (tuple, list, torch.Size)) or not all(type(v) is int and v >= 0 for v in x):
        raise RefusedPickle(f"tensor {what} must be a tuple of non-negative ints, got {_name(x)}")
    return tuple(x)


class _Rebuilders:
    """The allowlisted callables, each a checked implementation (never torch's own via the file)."""

    def __init__(self, reader: _Reader):
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
        self.reader.budget.view(numel * flat.element_size())
        return flat.as_strided(size, stride, flat.storage_offset() + offset)  # offsets count from the storage

    def tensor_v1(self, storage, offset, size, stride):
        return self.tensor(storage, offset, size, stride)

    def tensor_v3(self, storage, offset, size, stride, requires_grad=False, hooks=None, dtype=None, *_ignored):
        """torch's rebuild for dtypes without a typed storage class (float8, uint16, ...): an
        untyped (byte) storage read as ``dtype``."""
        if not isinstance(dtype, torch.dtype):
            raise RefusedPickle(f"a tensor's dtype must be a torch dtype, got {_name(dtype)}")
        if not isinstance(storage, _Storage):
            raise RefusedPickle(f"a tensor's storage must come from the file's storage records, got {_name(storage)}")
        size_of = torch.empty(0, dtype=dtype).element_size()
        if storage.data.numel() % size_of:
            raise RefusedPickle(f"a storage of {storage.data.numel()} bytes does not hold whole {dtype} elements")
        return self.tensor(_Storage(dtype, storage.data), offset, size, stride)

    def parameter(self, data, *_ignored):
        if tensor_kind(data):
            raise RefusedPickle(f"a parameter is {tensor_kind(data)}: {UNSUPPORTED_ADVICE}")
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
        inner = type(self.reader)(io.BytesIO(bytes(b)), len(b), budget=self.reader.budget,
                                  nested=self.reader.nested + 1)
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

    def __init__(self, fh, reader: _Reader, persistent_load):
        super().__init__(fh, encoding="utf-8")
        self.reader = reader
        self._pload = persistent_load

    def load(self):
        """The standard library's loop, with every opcode counted against the file's budget (in
        steps of 1024, so the count costs next to nothing per opcode)."""
        self._unframer = pickle._Unframer(self._file_read, self._file_readline)
        self.read = self._unframer.read
        self.readinto = self._unframer.readinto
        self.readline = self._unframer.readline
        self.metastack = []
        self.stack = []
        self.append = self.stack.append
        self.proto = 0
        read, dispatch, take = self.read, self.dispatch, self.reader.budget.take
        ops = 0
        try:
            while True:
                key = read(1)
                if not key:
                    raise EOFError
                dispatch[key[0]](self)
                ops += 1
                if not ops & 1023:
                    take(1024)
        except pickle._Stop as stop:
            take(ops & 1023)
            return stop.value

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

    def load_bytearray8(self):
        # the standard loader allocates the declared length before reading: bound it by the file
        (n,) = struct.unpack("<Q", self.read(8))
        if n > self.reader.size:
            raise RefusedPickle(f"its pickle declares a bytearray of {n:,} bytes, more than the "
                                f"{self.reader.size:,}-byte file holds")
        b = bytearray(n)
        if n and self.readinto(b) != n:
            raise pickle.UnpicklingError("pickle data was truncated")
        self.append(b)
    dispatch[pickle.BYTEARRAY8[0]] = load_bytearray8

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
        self.reader.budget.take()
    dispatch[pickle.APPEND[0]] = load_append

    def load_appends(self):
        items = self.pop_mark()
        self.reader.budget.take(len(items))
        self._target(self.stack[-1], (list, Inert), "APPENDS").extend(items)
    dispatch[pickle.APPENDS[0]] = load_appends

    def load_setitem(self):
        value = self.stack.pop()
        key = self.stack.pop()
        self._target(self.stack[-1], (dict, Inert), "SETITEM")[key] = value
        self.reader.budget.take()
    dispatch[pickle.SETITEM[0]] = load_setitem

    def load_setitems(self):
        items = self.pop_mark()
        d = self._target(self.stack[-1], (dict, Inert), "SETITEMS")
        self.reader.budget.take(len(items) // 2)
        for i in range(0, len(items), 2):
            d[items[i]] = items[i + 1]
    dispatch[pickle.SETITEMS[0]] = load_setitems

    def load_additems(self):
        items = self.pop_mark()
        self.reader.budget.take(len(items))
        self._target(self.stack[-1], (set,), "ADDITEMS").update(items)
    dispatch[pickle.ADDITEMS[0]] = load_additems
