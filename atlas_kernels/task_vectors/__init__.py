"""Task vectors: loading, validation, storage dtypes, files.

A :class:`TaskVectors` holds N task vectors (fine-tuned minus pre-trained weights) over a set of
named blocks, stored per block as one stacked ``[N, *shape]`` slab: the layout kernels want (one
contiguous read of all N task vectors of a block).

Storage dtypes: ``"float32"``, ``"bfloat16"``, ``"float16"``, and the compact ``"int8"`` and
``"float8_e4m3fn"``, which keep a float32 scale per row (per output channel: dim 0 of a block of 2
or more dimensions; one scale for a 1-D block) of every task vector, ``scale = max|row| / qmax``.
Compact slabs are dequantized inside the compose and gradient kernels, never up front.

Files are read without running code: safetensors, and torch files (state dicts, and the pickled
whole modules the task-vector papers released) through the restricted reader of
:mod:`atlas_kernels.safe_pickle`, which imports and calls nothing from the file.

The package: ``core`` (the class and its views), ``validation`` (what the constructor accepts),
``builders`` (from state dicts, checkpoints, LoRA factors, PEFT adapters), ``files`` (the file
format and its checksums), ``cli`` / ``importer`` (``python -m atlas_kernels.task_vectors``);
quantising lives in :mod:`atlas_kernels.storage`. Names are imported on first use (PEP 562), so
that ``python -m atlas_kernels.task_vectors --help`` answers without importing torch.
"""
import importlib as _importlib

# Public name -> (module, name there), relative to this package.
_EXPORTS = {
    "TaskVectors": (".core", "TaskVectors"), "STORAGES": (".core", "STORAGES"),
    "quantize": ("..storage", "quantize"), "dequantize_one": ("..storage", "dequantize_one"),
    "load_state_dict_file": ("..checkpoints", "load_state_dict_file"),
    "convert_checkpoint": ("..checkpoints", "convert_checkpoint"),
    # the file format's metadata checksum (tests and the adversarial files rewrite metadata with it)
    "_META_CRC": (".files", "_META_CRC"), "_meta_crc": (".files", "_meta_crc"),
}

__all__ = ["TaskVectors", "STORAGES", "load_state_dict_file", "convert_checkpoint"]


def __getattr__(name):
    where = _EXPORTS.get(name)
    if where is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(_importlib.import_module(where[0], __name__), where[1])
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
