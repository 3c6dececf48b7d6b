"""Small generic blocks composed together: one compose_packed launch per forward (SmallBlockGroup).

A whole tiny open_clip ViT patched with backend="triton" (Triton interpreter on CPU) against the
float64 reference, as in test_triton_whole_model.py, with the LayerNorms, embeddings, patch
convolution and projection grouped.
"""
import copy

import pytest
import torch

import atlas_kernels as ak
from atlas_kernels import modules
from atlas_kernels.grouping import SmallBlockGroup
from atlas_kernels.ops import triton_backend

from ._util import (
    DEV,
    coefficient_gradient_errors,
    float64_reference,
    make_tiny_vit,
    random_task_vectors,
    randomize_coefficients,
    rel_err,
)

open_clip = pytest.importorskip("open_clip")

N = 3


@pytest.fixture(scope="module")
def tvs(tiny_vit):
    return random_task_vectors(tiny_vit, N, torch.Generator().manual_seed(0))


def _patched(vit, tvs, partitions=1, mode="contiguous", **kw):
    patched = ak.patch(copy.deepcopy(vit), tvs, partitions=partitions, partition_mode=mode, seed=3,
                       backend="triton", **kw)
    randomize_coefficients(patched, torch.Generator().manual_seed(1))
    return patched


def _reference(vit, tvs, coefs, x, partitions, mode):
    return float64_reference(vit, tvs, coefs, x, partitions, mode, 3)


class _Count:
    def __init__(self, monkeypatch):
        self.packed = self.block = 0
        packed, block = triton_backend.compose_packed, modules._block_compose

        def count_packed(*a, **k):
            self.packed += 1
            return packed(*a, **k)

        def count_block(*a, **k):
            self.block += 1
            return block(*a, **k)

        monkeypatch.setattr(triton_backend, "compose_packed", count_packed)
        monkeypatch.setattr(modules, "_block_compose", count_block)


@pytest.mark.parametrize("partitions,mode", [(1, "contiguous"), (2, "hash")])
def test_grouped_matches_float64_reference(tiny_vit, tvs, partitions, mode):
    patched = _patched(tiny_vit, tvs, partitions, mode)
    group = patched._atlas_small_blocks
    assert isinstance(group, SmallBlockGroup)
    coefs = ak.coefficients(patched)
    assert set(coefs) == set(tvs.blocks)  # user-visible names unchanged, the group adds none
    assert not any("_atlas_small_blocks" in k for k in patched.state_dict())
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 32, 32, generator=g).to(DEV)
    out = patched(x)
    ref, c64 = _reference(tiny_vit, tvs, coefs, x, partitions, mode)
    assert rel_err(out, ref) < 1e-5, rel_err(out, ref)
    errs = coefficient_gradient_errors(out, ref, coefs, c64, g)
    worst = max(errs, key=errs.get)
    assert errs[worst] < 1e-4, (worst, errs[worst])


def test_one_packed_launch_per_forward(tiny_vit, tvs, monkeypatch):
    patched = _patched(tiny_vit, tvs)
    n_members = len(patched._atlas_small_blocks._members)
    assert n_members >= 10  # conv1, embeddings, LayerNorms, proj
    count = _Count(monkeypatch)
    x = torch.randn(1, 3, 32, 32).to(DEV)
    for _ in range(2):
        count.packed = count.block = 0
        patched(x).sum().backward()
        assert count.packed == 1
        assert count.block == 0  # no grouped block composed on its own
    # After a forward, reading a block by hand is served the last forward's view while its
    # coefficients are unchanged (this is what activation-checkpoint recomputation relies on) ...
    count.packed = count.block = 0
    torch.testing.assert_close(patched.ln_post.weight.detach(), patched.ln_post.weight.detach())
    assert count.packed == 0 and count.block == 0
    # ... and once they change (an optimizer step), outside a forward it composes on its own.
    with torch.no_grad():
        ak.coefficients(patched)["ln_post.weight"].add_(0.1)
    torch.testing.assert_close(patched.ln_post.weight.detach(), patched.ln_post.weight.detach())
    assert count.packed == 0 and count.block == 2


def test_no_stale_cache_and_unpatch(tiny_vit, tvs):
    partitions, mode = 2, "hash"
    patched = _patched(tiny_vit, tvs, partitions, mode)
    coefs = ak.coefficients(patched)
    opt = torch.optim.SGD(list(coefs.values()), lr=0.5)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4)).to(DEV)
    first = patched(x)
    first.square().mean().backward()
    opt.step()
    opt.zero_grad()
    with torch.no_grad():  # also an in-place change outside the optimizer
        coefs["ln_pre.weight"].add_(0.25)
        coefs["class_embedding"].mul_(-1.0)
    second = patched(x)
    ref, _ = _reference(tiny_vit, tvs, coefs, x, partitions, mode)
    assert rel_err(second, ref) < 1e-5
    assert rel_err(first, ref) > 1e-3
    with torch.no_grad():  # a grad-mode change between forwards, and a third forward
        third = patched(x)
    assert rel_err(third, ref) < 1e-5
    ak.unpatch(patched)
    assert not hasattr(patched, "_atlas_small_blocks")
    assert not patched._forward_pre_hooks and not patched._forward_hooks
    assert not any(isinstance(m, SmallBlockGroup) for m in patched.modules())
    with torch.no_grad():
        merged = patched(x)
    assert rel_err(merged, ref) < 1e-5


def test_group_off_and_torch_backend(tiny_vit, tvs, monkeypatch):
    patched = _patched(tiny_vit, tvs, group_small_blocks=False)
    assert not any(isinstance(m, SmallBlockGroup) for m in patched.modules())
    count = _Count(monkeypatch)
    x = torch.randn(1, 3, 32, 32).to(DEV)
    out = patched(x)
    assert count.packed == 0 and count.block > 0
    ref, _ = _reference(tiny_vit, tvs, ak.coefficients(patched), x, 1, "contiguous")
    assert rel_err(out, ref) < 1e-5
    # backend="auto" groups only where it resolves to a backend with a packed op (triton on CUDA, the
    # compiled extension where it is built); on a plain CPU install it resolves to torch: no group.
    auto = ak.patch(copy.deepcopy(tiny_vit), tvs, backend="auto")
    grouped = ak.ops.resolve("auto", torch.device(DEV)) in ("triton", "cuda")
    assert any(isinstance(m, SmallBlockGroup) for m in auto.modules()) == grouped
    with torch.no_grad():
        for k, c in ak.coefficients(auto).items():
            c.copy_(ak.coefficients(patched)[k])
    count.packed = count.block = 0
    assert rel_err(auto(x), ref) < 1e-5
    resolved = ak.ops.resolve("auto", torch.device(DEV))
    if resolved == "torch":
        assert count.packed == 0 and count.block > 0
    elif resolved == "triton":  # on CUDA tensors "auto" is Triton, grouped
        assert count.packed == 1


def test_grouping_with_open_clip_non_reentrant_checkpointing():
    """open_clip's set_grad_checkpointing uses checkpoint(use_reentrant=False): the recomputation
    must see the same saved tensors, and the coefficient gradients must match a run without it."""
    vit = make_tiny_vit()
    g = torch.Generator().manual_seed(0)
    tvs = ak.TaskVectors({k: torch.randn((2, *p.shape), generator=g) * 0.05 for k, p in vit.named_parameters()}).to(DEV)
    x = torch.randn(2, 3, 32, 32, generator=g).to(DEV)
    grads = []
    for ckpt in (False, True):
        m = ak.patch(copy.deepcopy(vit), tvs, backend="triton")
        m.set_grad_checkpointing(ckpt)
        m.train()
        with torch.no_grad():
            for c in ak.coefficients(m).values():
                c.fill_(0.3)
        m(x).square().sum().backward()
        grads.append({k: c.grad.clone() for k, c in ak.coefficients(m).items()})
    for k in grads[0]:
        assert torch.allclose(grads[0][k], grads[1][k], rtol=1e-4, atol=1e-6), k


def test_unpatching_a_deepcopy_leaves_the_original_working(tiny_vit, tvs):
    # parametrize's generated class is shared by deepcopy; unpatch must not strip it from the original.
    m = _patched(tiny_vit, tvs)
    with torch.no_grad():
        for c in ak.coefficients(m).values():
            c.fill_(0.2)
    twin = copy.deepcopy(m)
    x = torch.randn(1, 3, 32, 32).to(DEV)
    with torch.no_grad():
        y = m(x)
        ak.unpatch(twin)
        assert rel_err(m(x), y) == 0
        assert rel_err(twin(x), y) < 1e-5


def test_float64_model_on_the_triton_backend_falls_back_to_float64_math(tiny_vit, tvs):
    m = _patched(tiny_vit, tvs)
    with torch.no_grad():
        for c in ak.coefficients(m).values():
            c.fill_(0.2)
    x = torch.randn(1, 3, 32, 32).to(DEV)
    with torch.no_grad():
        y32 = m(x)
        m.double()
        y64 = m(x.double())
    assert y64.dtype == torch.float64
    assert rel_err(y32, y64) < 1e-5


def test_theta0_is_packed_once_and_repacked_when_loaded(tiny_vit, tvs):
    m = _patched(tiny_vit, tvs)
    group = m._atlas_small_blocks
    x = torch.randn(1, 3, 32, 32).to(DEV)
    with torch.no_grad():
        m(x)
        packed = group._theta0[1]
        m(x)
        assert group._theta0[1] is packed  # frozen theta0: not copied again on the next step
        before = m(x)
        m.ln_post.parametrizations.weight.original.mul_(2.0)  # what load_state_dict does: in place
        after = m(x)
    assert group._theta0[1] is not packed
    assert not torch.allclose(before, after)
