"""Learn aTLAS coefficients: ``python -m atlas_kernels.train`` (see ``README.md`` here).

The pieces are importable for use in notebooks and tests::

    from atlas_kernels.train import TrainConfig, run
    result = run(TrainConfig(task_vectors="tvs.safetensors", out="runs/x", objective="fewshot",
                             model="ViT-B-32", weights="pretrained.safetensors",
                             train=["data/train"], val=["data/val"], shots=16))
"""
from .config import ConfigError, TrainConfig, validate_config
from .loop import evaluate, run, setup, train, write_outputs
from .objectives import OBJECTIVES, make_objective
from .data import DataError
from .heatmap import save_heatmap

__all__ = ["TrainConfig", "run", "setup", "train", "evaluate", "write_outputs", "validate_config",
           "ConfigError", "DataError", "OBJECTIVES", "make_objective", "save_heatmap", "main"]


def main(argv=None) -> int:
    from .cli import main as _main

    return _main(argv)
