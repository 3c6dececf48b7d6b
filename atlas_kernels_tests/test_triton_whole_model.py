"""A whole small open_clip ViT patched with backend="triton" against the float64 reference.

On a machine without a GPU the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET),
so this proves the Triton path end to end: patch-embedding convolution, LayerNorms, embeddings and
the final projection through the compose kernel; attention and MLP linears through the fused and the
compose-then-matmul linear paths; coefficient gradients through the tile-wise kernels.
"""
import copy

import pytest
import torch

import atlas_kernels as ak

from ._util import (
    DEV,
    assert_compiles_like_eager,
    coefficient_gradient_errors,
    float64_reference,
    random_task_vectors,
    randomize_coefficients,
    rel_err,
)

open_clip = pytest.importorskip("open_clip")


@pytest.mark.parametrize("partitions,mode,kw", [
    (1, "contiguous", {"fused_linear": True, "fused_max_m": 64}),
    (2, "hash", {"fused_linear": True, "fused_max_m": 0}),
    (2, "hash", {}),
], ids=["fused", "own-compose", "grouped"])
def test_tiny_vit_triton_matches_float64_reference(tiny_vit, partitions, mode, kw):
    # fused_max_m=64: every linear (M = 2 images x 17 tokens = 34 rows) takes the fused path;
    # 0: every linear composes its own weight and uses matmuls; default: every block grouped.
    vit = tiny_vit
    n = 3
    g = torch.Generator().manual_seed(0)
    tvs = random_task_vectors(vit, n, g)
    patched = ak.patch(copy.deepcopy(vit), tvs, partitions=partitions, partition_mode=mode, seed=3, backend="triton",
                       **kw)
    coefs = randomize_coefficients(patched, g)
    x = torch.randn(2, 3, 32, 32, generator=g).to(DEV)
    out = patched(x)

    ref, c64 = float64_reference(vit, tvs, coefs, x, partitions, mode, 3)
    assert rel_err(out, ref) < 1e-5, rel_err(out, ref)
    errs = coefficient_gradient_errors(out, ref, coefs, c64, g)
    worst = max(errs, key=errs.get)
    assert errs[worst] < 1e-4, (worst, errs[worst])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_patched_vit_compiles_fullgraph(tiny_vit, backend):
    """torch.compile(patched, fullgraph=True) traces the whole patched tower without graph breaks
    (aot_eager here; inductor on a GPU) and gives the eager outputs and coefficient gradients."""
    g = torch.Generator().manual_seed(0)
    tvs = random_task_vectors(tiny_vit, 2, g)
    m = ak.patch(copy.deepcopy(tiny_vit), tvs, partitions=2, partition_mode="hash", backend=backend)
    coefs = randomize_coefficients(m, g)
    x = torch.randn(2, 3, 32, 32, generator=g).to(DEV)
    assert_compiles_like_eager(m, coefs, x)
