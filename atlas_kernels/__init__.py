"""atlas_kernels: fast, memory-lean aTLAS (task vectors with learned anisotropic scaling).

    import atlas_kernels as ak
    tvs = ak.TaskVectors.from_checkpoints("zeroshot.safetensors", ["cars.safetensors", ...], prefix="visual.")
    ak.patch(model.visual, tvs)                       # only the coefficients train
    opt = torch.optim.AdamW(ak.coefficients(model.visual).values(), lr=1e-3)
    ...
    ak.unpatch(model.visual)                          # a plain model again, task vectors merged

Layout: ``reference`` (the specification), ``kernels/`` (Triton kernels), ``ops/`` (autograd and
backend dispatch), ``modules`` (AtlasLinear and friends), ``storage`` (the storage table: bytes,
per-row scales, quantising), ``task_vectors/`` (building, files, the CLI),
``patching`` (patch / unpatch, with its :class:`PatchConfig` in ``patch_config``),
``coefficient_files`` (save / load coefficients).
"""
import importlib as _importlib

__version__ = "0.1.0"

# Public name -> the module that defines it. Imported on first use (PEP 562), so that
# `python -m atlas_kernels.train --help` and `python -m atlas_kernels.task_vectors --help` answer
# without importing torch.
_EXPORTS = {
    "TaskVectors": "task_vectors", "STORAGES": "task_vectors",
    "convert_checkpoint": "checkpoints", "load_state_dict_file": "checkpoints", "load_head": "checkpoints",
    "Head": "checkpoints",
    "patch": "patching", "unpatch": "patching", "is_patched": "patching", "coefficients": "patching",
    "shard": "sharding",
    "overflowing_blocks": "_adapted",
    "save_coefficients": "coefficient_files", "load_coefficients": "coefficient_files", "PatchConfig": "patch_config",
    "AtlasLinear": "modules", "AtlasMultiheadAttention": "modules", "AtlasParameter": "modules",
    "Partition": "partitions",
    "select_task_vectors": "budget", "budget_report": "budget",
    "estimate_memory": "planner", "MemoryEstimate": "planner",
    "read_peft_adapter": "peft", "write_peft_adapter": "peft", "match_blocks": "peft",
    "load_plain_state_dict": "state_dicts",
    "export_linearised": "linearised.export", "load_linearised": "patching",
    "GraphedStep": "graphs",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name):
    where = _EXPORTS.get(name)
    if where is not None:
        value = getattr(_importlib.import_module(f".{where}", __name__), name)
    else:
        try:  # a submodule: ak.ops, ak.reference, ak.kernels, ...
            value = _importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
