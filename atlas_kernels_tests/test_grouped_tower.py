"""The plan's grouped compose: every dense block of a patched tower composed in one pass before each
eager forward, every coefficient gradient reduced in one pass in backward (atlas_kernels.plan).

A whole tiny open_clip ViT patched with backend="triton" (Triton's interpreter on the CPU) and
"torch", against the float64 reference; when values are served and when a module composes a block
itself; when the plan is redone (.to(), load_state_dict, replaced tensors, deepcopy).
"""
import copy

import pytest
import torch

import atlas_kernels as ak
from atlas_kernels import ops
from atlas_kernels.ops.backend import Backend
from atlas_kernels.plan import plan_of

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
BACKENDS = ["triton", "torch"]


@pytest.fixture(scope="module")
def tvs(tiny_vit):
    return random_task_vectors(tiny_vit, N, torch.Generator().manual_seed(0))


def _patched(vit, tvs, partitions=1, mode="contiguous", backend="triton", **kw):
    patched = ak.patch(copy.deepcopy(vit), tvs, partitions=partitions, partition_mode=mode, seed=3,
                       backend=backend, **kw)
    randomize_coefficients(patched, torch.Generator().manual_seed(1))
    return patched


def _reference(vit, tvs, coefs, x, partitions, mode):
    return float64_reference(vit, tvs, coefs, x, partitions, mode, 3)


class _Count:
    """Counts grouped composes (one per group per forward) and blocks composed on their own."""

    def __init__(self, monkeypatch):
        self.group = self.block = 0
        group, block = Backend.compose_group, ops.compose
        tri_group = ops.get("triton").__class__.compose_group
        torch_group = ops.get("torch").__class__.compose_group

        def counted(fn):
            def wrapper(*a, **k):
                self.group += 1
                return fn(*a, **k)
            return wrapper

        def count_block(*a, **k):
            self.block += 1
            return block(*a, **k)

        monkeypatch.setattr(Backend, "compose_group", counted(group))
        monkeypatch.setattr(ops.get("triton").__class__, "compose_group", counted(tri_group))
        monkeypatch.setattr(ops.get("torch").__class__, "compose_group", counted(torch_group))
        monkeypatch.setattr(ops, "compose", count_block)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("partitions,mode", [(1, "contiguous"), (2, "hash")])
def test_grouped_matches_float64_reference(tiny_vit, tvs, partitions, mode, backend):
    patched = _patched(tiny_vit, tvs, partitions, mode, backend)
    plan = plan_of(patched)
    assert len(plan.groups) == 1 and len(plan.groups[0]) == len(tvs.blocks) and not plan.own, plan.summary()
    coefs = ak.coefficients(patched)
    assert set(coefs) == set(tvs.blocks)  # user-visible names unchanged, the plan adds none
    assert not any("plan" in k for k in patched.state_dict())
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 32, 32, generator=g).to(DEV)
    out = patched(x)
    ref, c64 = _reference(tiny_vit, tvs, coefs, x, partitions, mode)
    assert rel_err(out, ref) < 1e-5, rel_err(out, ref)
    errs = coefficient_gradient_errors(out, ref, coefs, c64, g)
    worst = max(errs, key=errs.get)
    assert errs[worst] < 1e-4, (worst, errs[worst])


def test_one_grouped_compose_per_forward(tiny_vit, tvs, monkeypatch):
    patched = _patched(tiny_vit, tvs)
    count = _Count(monkeypatch)
    x = torch.randn(1, 3, 32, 32).to(DEV)
    for _ in range(2):
        count.group = count.block = 0
        patched(x).sum().backward()
        assert count.group == 1
        assert count.block == 0  # no grouped block composed on its own
    # After a forward, reading a block by hand is served the last forward's view while its
    # coefficients are unchanged (this is what activation-checkpoint recomputation relies on) ...
    count.group = count.block = 0
    torch.testing.assert_close(patched.ln_post.weight.detach(), patched.ln_post.weight.detach())
    assert count.group == 0 and count.block == 0
    # ... and once they change (an optimizer step), outside a forward it composes on its own.
    with torch.no_grad():
        ak.coefficients(patched)["ln_post.weight"].add_(0.1)
    torch.testing.assert_close(patched.ln_post.weight.detach(), patched.ln_post.weight.detach())
    assert count.group == 0 and count.block == 2
    # a read in another grad mode than the forward's is never served a value without a graph
    with torch.no_grad():
        patched(x)
    w = patched.ln_post.weight
    assert w.requires_grad and w.grad_fn is not None


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_stale_cache_and_unpatch(tiny_vit, tvs, backend):
    partitions, mode = 2, "hash"
    patched = _patched(tiny_vit, tvs, partitions, mode, backend)
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
    assert plan_of(patched) is None
    assert not patched._forward_pre_hooks and not patched._forward_hooks
    assert type(patched.ln_pre) is torch.nn.LayerNorm or type(patched.ln_pre).__name__ == "LayerNorm"
    with torch.no_grad():
        merged = patched(x)
    assert rel_err(merged, ref) < 1e-5


def test_group_off(tiny_vit, tvs, monkeypatch):
    patched = _patched(tiny_vit, tvs, grouped=False)
    assert not plan_of(patched).groups
    count = _Count(monkeypatch)
    x = torch.randn(1, 3, 32, 32).to(DEV)
    out = patched(x)
    assert count.group == 0 and count.block > 0
    ref, _ = _reference(tiny_vit, tvs, ak.coefficients(patched), x, 1, "contiguous")
    assert rel_err(out, ref) < 1e-5
    with pytest.warns(DeprecationWarning, match="use grouped="):
        old = _patched(tiny_vit, tvs, group_small_blocks=False)
    assert not plan_of(old).groups


@pytest.mark.parametrize("backend", BACKENDS)
def test_grouping_with_open_clip_non_reentrant_checkpointing(backend):
    """open_clip's set_grad_checkpointing uses checkpoint(use_reentrant=False): the recomputation
    must see the same saved tensors, and the coefficient gradients must match a run without it."""
    vit = make_tiny_vit()
    g = torch.Generator().manual_seed(0)
    tvs = ak.TaskVectors({k: torch.randn((2, *p.shape), generator=g) * 0.05 for k, p in vit.named_parameters()}).to(DEV)
    x = torch.randn(2, 3, 32, 32, generator=g).to(DEV)
    grads = []
    for ckpt in (False, True):
        m = ak.patch(copy.deepcopy(vit), tvs, backend=backend)
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
    m = _patched(tiny_vit, tvs)
    with torch.no_grad():
        for c in ak.coefficients(m).values():
            c.fill_(0.2)
    twin = copy.deepcopy(m)
    assert plan_of(twin) is not plan_of(m) and plan_of(twin).root is twin
    x = torch.randn(1, 3, 32, 32).to(DEV)
    with torch.no_grad():
        y = m(x)
        assert rel_err(twin(x), y) == 0  # the copy composes from its own tensors
        ak.unpatch(twin)
        assert rel_err(m(x), y) == 0
        assert rel_err(twin(x), y) < 1e-5
    # the copy's tensors are its own: changing the original's coefficients leaves it alone
    twin2 = copy.deepcopy(m)
    with torch.no_grad():
        before = twin2(x)
        for c in ak.coefficients(m).values():
            c.fill_(-0.5)
        assert rel_err(twin2(x), before) == 0


def test_float64_model_falls_back_to_float64_math(tiny_vit, tvs):
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
    assert plan_of(m).groups[0].backend.name == "torch"  # float64 blocks take the torch backend


def test_theta0_changed_in_place_or_replaced_is_seen(tiny_vit, tvs):
    m = _patched(tiny_vit, tvs)
    x = torch.randn(1, 3, 32, 32).to(DEV)
    with torch.no_grad():
        before = m(x)
        m.ln_post._buffers["weight"].mul_(2.0)  # what load_state_dict does: in place
        after = m(x)
        assert not torch.allclose(before, after)
        sd = {k: v.clone() for k, v in m.state_dict().items()}
        sd["ln_post.weight"] = sd["ln_post.weight"] * 0.5
        m.load_state_dict(sd, assign=True)  # new tensor objects: the plan is redone
        again = m(x)
        assert rel_err(again, before) < 1e-6
        coef = ak.coefficients(m)["ln_post.weight"]
        coef.data = coef.data + 1.0  # a new storage under the same Parameter
        moved = m(x)
        m2 = copy.deepcopy(m)
        ak.unpatch(m2)
        assert rel_err(moved, m2(x)) < 1e-5


def test_to_redoes_the_plan(tiny_vit, tvs):
    m = _patched(tiny_vit, tvs, backend="torch")
    plan = plan_of(m)
    x = torch.randn(1, 3, 32, 32).to(DEV)
    with torch.no_grad():
        y = m(x)
        m.to(torch.float64)
        assert plan.stale
        y64 = m(x.double())
    assert not plan.stale and rel_err(y, y64) < 1e-5
    assert all(c.dtype == torch.float32 for c in ak.coefficients(m).values())


def test_the_library_issues_at_most_four_launches_per_step(tiny_vit, tvs):
    """The grouped Triton path (its counter, atlas_kernels._launches): one compose launch, one cat of
    the blocks' gradients, two to reduce every coefficient gradient. Under autocast the blocks a
    matmul reads are composed in the compute dtype and the others in theta0's: one more cat."""
    from atlas_kernels import _launches

    m = _patched(tiny_vit, tvs)
    x = torch.randn(2, 3, 32, 32).to(DEV)
    m(x).sum().backward()
    with _launches.count() as c:
        m(x).sum().backward()
    assert c.total <= 4 and c.triton == 3, c.by_op
    with _launches.count() as c, torch.autocast(DEV, dtype=torch.bfloat16):
        m(x).float().sum().backward()
    assert c.total <= 5 and c.triton == 3, c.by_op
    # the torch backend: one product per block to compose, one to reduce
    t = _patched(tiny_vit, tvs, backend="torch")
    t(x).sum().backward()
    with _launches.count() as c:
        t(x).sum().backward()
    assert c.total == 2 * len(tvs.blocks), c.by_op
