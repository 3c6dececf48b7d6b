"""A whole small open_clip ViT patched with backend="triton" against the float64 reference.

On a machine without a GPU the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET),
so this proves the Triton path end to end: patch-embedding convolution, LayerNorms, embeddings and
the final projection through the compose kernel; attention and MLP linears through the fused and the
compose-then-matmul linear paths; coefficient gradients through the tile-wise kernels.
"""
import copy

import pytest
import torch
from torch.func import functional_call

import atlas_kernels as ak
from atlas_kernels import reference
from atlas_kernels.ops import triton_backend

from ._util import DEV, rel_err

open_clip = pytest.importorskip("open_clip")


@pytest.mark.parametrize("partitions,mode,fused_max_m", [(1, "contiguous", 64), (2, "hash", 0)])
def test_tiny_vit_triton_matches_float64_reference(tiny_vit, partitions, mode, fused_max_m, monkeypatch):
    # fused_max_m=64: every linear (M = 2 images x 17 tokens = 34 rows) takes the fused path;
    # 0: every linear composes its weight once and uses matmuls.
    monkeypatch.setattr(triton_backend, "FUSED_MAX_M", fused_max_m)
    vit = tiny_vit
    n = 3
    g = torch.Generator().manual_seed(0)
    tvs = ak.TaskVectors({k: torch.randn((n, *p.shape), generator=g) * 0.05 for k, p in vit.named_parameters()}).to(DEV)
    patched = ak.patch(copy.deepcopy(vit), tvs, partitions=partitions, partition_mode=mode, seed=3, backend="triton")
    coefs = ak.coefficients(patched)
    with torch.no_grad():
        for c in coefs.values():
            c.copy_(torch.randn(c.shape, generator=g))
    x = torch.randn(2, 3, 32, 32, generator=g).to(DEV)
    out = patched(x)

    m64 = copy.deepcopy(vit).double()
    c64 = {k: c.detach().double().requires_grad_(True) for k, c in coefs.items()}
    params = {k: reference.compose(p.detach(), tvs[k], c64[k], ak.Partition.for_block(k, partitions, mode, 3))
              for k, p in m64.named_parameters()}
    ref = functional_call(m64, params, (x.double(),))
    assert rel_err(out, ref) < 1e-5, rel_err(out, ref)
    w = torch.randn(ref.shape, generator=g, dtype=torch.float64).to(ref.device)
    (out * w.float()).sum().backward()
    (ref * w).sum().backward()
    errs = {k: rel_err(coefs[k].grad, c64[k].grad) for k in coefs}
    worst = max(errs, key=errs.get)
    assert errs[worst] < 1e-4, (worst, errs[worst])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_patched_vit_compiles_fullgraph(tiny_vit, backend):
    """torch.compile(patched, fullgraph=True) traces the whole patched tower without graph breaks
    (aot_eager here; inductor on a GPU) and gives the eager outputs and coefficient gradients."""
    g = torch.Generator().manual_seed(0)
    tvs = ak.TaskVectors({k: torch.randn((2, *p.shape), generator=g) * 0.05
                          for k, p in tiny_vit.named_parameters()}).to(DEV)
    m = ak.patch(copy.deepcopy(tiny_vit), tvs, partitions=2, partition_mode="hash", backend=backend)
    coefs = ak.coefficients(m)
    with torch.no_grad():
        for c in coefs.values():
            c.copy_(torch.randn(c.shape, generator=g))
    x = torch.randn(2, 3, 32, 32, generator=g).to(DEV)
    y = m(x)
    y.sum().backward()
    eager = {k: c.grad.clone() for k, c in coefs.items()}
    for c in coefs.values():
        c.grad = None
    torch._dynamo.reset()
    yc = torch.compile(m, fullgraph=True, backend="aot_eager")(x)
    yc.sum().backward()
    assert rel_err(yc, y) < 1e-6
    for k, c in coefs.items():
        assert rel_err(c.grad, eager[k]) < 1e-5, k
