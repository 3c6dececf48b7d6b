"""Learn aTLAS coefficients: ``python -m atlas_kernels.train`` (see ``README.md`` here).

The pieces are importable for use in notebooks and tests::

    from atlas_kernels.train import TrainConfig, run
    result = run(TrainConfig(task_vectors="tvs.safetensors", out="runs/x", objective="fewshot",
                             model="ViT-B-32", weights="pretrained.safetensors",
                             train=["data/train"], val=["data/val"], shots=16))
"""
import importlib as _importlib

# Imported on first use (PEP 562): `python -m atlas_kernels.train --help` then needs no torch.
_EXPORTS = {"TrainConfig": "config", "ConfigError": "config", "validate_config": "config",
            "run": "loop", "setup": "prepare", "train": "loop", "evaluate": "evaluation", "write_outputs": "outputs",
            "OBJECTIVES": "config", "make_objective": "objectives", "DataError": "data",
            "save_heatmap": "heatmap"}

__all__ = ["TrainConfig", "run", "setup", "train", "evaluate", "write_outputs", "validate_config",
           "ConfigError", "DataError", "OBJECTIVES", "make_objective", "save_heatmap", "main"]

def __getattr__(name):
    where = _EXPORTS.get(name)
    if where is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(_importlib.import_module(f".{where}", __name__), name)
    globals()[name] = value
    return value

def main(argv=None) -> int:
    from .cli import main as _main

    return _main(argv)
