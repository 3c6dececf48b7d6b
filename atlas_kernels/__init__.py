"""atlas_kernels: fast, memory-lean aTLAS (task vectors with learned anisotropic scaling).

    import atlas_kernels as ak
    tvs = ak.TaskVectors.from_checkpoints("zeroshot.safetensors", ["cars.safetensors", ...], prefix="visual.")
    ak.patch(model.visual, tvs)                       # only the coefficients train
    opt = torch.optim.AdamW(ak.coefficients(model.visual).values(), lr=1e-3)
    ...
    ak.unpatch(model.visual)                          # a plain model again, task vectors merged

Layout: ``reference`` (the specification), ``kernels/`` (Triton kernels), ``ops/`` (autograd and
backend dispatch), ``modules`` (AtlasLinear and friends), ``task_vectors`` (loading and storage),
``patching`` (patch / unpatch / coefficient files).
"""
import warnings as _warnings

# `python -m atlas_kernels.task_vectors` runs a module this package has already imported; runpy's
# warning about that is harmless here.
_warnings.filterwarnings("ignore", message=r".*'atlas_kernels\.task_vectors' found in sys\.modules.*",
                         category=RuntimeWarning)

from .budget import budget_report, select_task_vectors
from .peft import match_blocks, read_peft_adapter, write_peft_adapter
from .planner import MemoryEstimate, estimate_memory
from .modules import AtlasLinear, AtlasMultiheadAttention, AtlasParameter
from .partitions import Partition
from .patching import coefficients, is_patched, load_coefficients, patch, save_coefficients, unpatch
from .checkpoints import Head, convert_checkpoint, load_head, load_state_dict_file
from .state_dicts import load_plain_state_dict
from .task_vectors import STORAGES, TaskVectors
from .linearised.export import export_linearised, load_linearised

__version__ = "0.1.0"

__all__ = [
    "TaskVectors", "STORAGES", "convert_checkpoint", "load_state_dict_file", "load_head", "Head",
    "patch", "unpatch", "is_patched", "coefficients", "save_coefficients", "load_coefficients",
    "AtlasLinear", "AtlasMultiheadAttention", "AtlasParameter", "Partition", "__version__",
    "select_task_vectors", "budget_report", "estimate_memory", "MemoryEstimate",
    "read_peft_adapter", "write_peft_adapter", "match_blocks", "load_plain_state_dict",
    "export_linearised", "load_linearised",
]
