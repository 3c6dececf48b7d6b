"""Every atlas module against the float64 reference: outputs and coefficient gradients."""
import copy

import pytest
import torch
import torch.nn as nn
from torch.func import functional_call

import atlas_kernels as ak
from atlas_kernels import reference

from ._util import assert_close, rel_err

BACKEND = "torch"


def _tvs_for(module, n, names=None, scale=0.05):
    params = dict(module.named_parameters())
    names = names or list(params)
    return ak.TaskVectors({k: torch.randn((n, *params[k].shape)) * scale for k in names})


def _randomize(coefs):
    with torch.no_grad():
        for c in coefs.values():
            c.normal_(0, 1.0)


def _reference_call(plain, tvs, coefs, partitions, mode, seed, inputs, kwargs=None):
    """float64 reference: compose every block with reference.compose, run the plain module
    functionally, and differentiate with torch autograd."""
    m64 = copy.deepcopy(plain).double()
    c64 = {k: v.detach().double().clone().requires_grad_(True) for k, v in coefs.items()}
    params = dict(m64.named_parameters())
    for name, c in c64.items():
        part = ak.Partition.for_block(name, partitions, mode, seed)
        params[name] = reference.compose(params[name].detach(), tvs[name], c, part)
    kw64 = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in (kwargs or {}).items()}
    inputs64 = tuple(t.double() if t.is_floating_point() else t for t in inputs)
    out = functional_call(m64, params, inputs64, kw64)
    return out, c64


def _check(plain, patched, tvs, inputs, partitions=1, mode="contiguous", seed=0, kwargs=None, pick=lambda o: o):
    coefs = ak.coefficients(patched)
    _randomize(coefs)
    out = pick(patched(*inputs, **(kwargs or {})))
    ref, c64 = _reference_call(plain, tvs, coefs, partitions, mode, seed, inputs, kwargs)
    ref = pick(ref)
    assert out.dtype == torch.float32
    assert rel_err(out, ref) < 1e-5, rel_err(out, ref)
    assert_close(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item(), what="output")
    g = torch.randn(ref.shape, dtype=torch.float64)
    (out * g.float()).sum().backward()
    (ref * g).sum().backward()
    for name, c in coefs.items():
        r = c64[name].grad
        assert c.grad is not None, f"{name}: no coefficient gradient"
        assert rel_err(c.grad, r) < 1e-4, (name, rel_err(c.grad, r))
        assert_close(c.grad, r, rtol=1e-3, atol=1e-4 * r.abs().max().item(), what=f"dcoef[{name}]")


@pytest.mark.parametrize("partitions,mode", [(1, "contiguous"), (3, "contiguous"), (3, "hash")])
def test_linear(partitions, mode):
    lin = nn.Linear(123, 77)
    tvs = _tvs_for(lin, 3)
    patched = ak.patch(copy.deepcopy(lin), tvs, partitions=partitions, partition_mode=mode, seed=5, backend=BACKEND)
    assert isinstance(patched, nn.Linear) and ak.is_patched(patched)  # a root Linear is parametrized in place
    _check(lin, patched, tvs, (torch.randn(2, 9, 123),), partitions, mode, seed=5)


@pytest.mark.parametrize("partitions,mode", [(1, "contiguous"), (2, "hash")])
def test_atlas_linear_inside_a_model(partitions, mode):
    model = nn.Sequential(nn.Linear(40, 33), nn.GELU(), nn.Linear(33, 21, bias=False))
    tvs = _tvs_for(model, 4)
    patched = ak.patch(copy.deepcopy(model), tvs, partitions=partitions, partition_mode=mode, backend=BACKEND)
    assert isinstance(patched[0], ak.AtlasLinear) and isinstance(patched[2], ak.AtlasLinear)
    _check(model, patched, tvs, (torch.randn(5, 40),), partitions, mode)


def test_linear_only_weight_adapted_bias_frozen():
    model = nn.Sequential(nn.Linear(16, 8))
    tvs = _tvs_for(model, 2, names=["0.weight"])
    patched = ak.patch(copy.deepcopy(model), tvs, backend=BACKEND)
    assert list(ak.coefficients(patched)) == ["0.weight"]
    _check(model, patched, tvs, (torch.randn(3, 16),))


class _Attn(nn.Module):
    def __init__(self, batch_first):
        super().__init__()
        self.attn = nn.MultiheadAttention(24, 4, batch_first=batch_first)

    def forward(self, q, k=None, v=None, **kw):
        k = q if k is None else k
        v = q if v is None else v
        return self.attn(q, k, v, **kw)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights", [False, True])
def test_multihead_attention_self(batch_first, need_weights):
    m = _Attn(batch_first).eval()
    tvs = _tvs_for(m, 3)
    patched = ak.patch(copy.deepcopy(m), tvs, partitions=2, backend=BACKEND)
    assert isinstance(patched.attn, ak.AtlasMultiheadAttention)
    assert isinstance(patched.attn.out_proj, ak.AtlasLinear)
    x = torch.randn(2, 7, 24) if batch_first else torch.randn(7, 2, 24)
    mask = torch.zeros(7, 7).masked_fill(torch.ones(7, 7, dtype=torch.bool).triu(1), float("-inf"))
    kw = dict(need_weights=need_weights, attn_mask=mask)
    _check(m, patched, tvs, (x,), 2, kwargs=kw, pick=lambda o: o[0])
    if need_weights:
        out_w = patched(x, **kw)[1]
        ref_w = m(x, **kw)[1]
        assert out_w.shape == ref_w.shape


def test_multihead_attention_cross_and_padding_mask():
    m = _Attn(True).eval()
    tvs = _tvs_for(m, 2)
    patched = ak.patch(copy.deepcopy(m), tvs, backend=BACKEND)
    q, kv = torch.randn(2, 5, 24), torch.randn(2, 6, 24)
    pad = torch.tensor([[False] * 6, [False] * 4 + [True] * 2])
    kw = dict(need_weights=False, key_padding_mask=pad)
    _check(m, patched, tvs, (q, kv, kv), kwargs=kw, pick=lambda o: o[0])


def test_out_proj_only_swaps_the_whole_attention():
    m = _Attn(True).eval()
    tvs = _tvs_for(m, 2, names=["attn.out_proj.weight"])
    patched = ak.patch(copy.deepcopy(m), tvs, backend=BACKEND)
    assert isinstance(patched.attn, ak.AtlasMultiheadAttention)
    assert list(ak.coefficients(patched)) == ["attn.out_proj.weight"]
    _check(m, patched, tvs, (torch.randn(2, 5, 24),), kwargs=dict(need_weights=False), pick=lambda o: o[0])


class _Misc(nn.Module):
    """LayerNorm, a patch-embedding convolution, raw parameters and an embedding."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, kernel_size=4, stride=4, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(16))
        self.positional_embedding = nn.Parameter(torch.randn(5, 16))
        self.ln = nn.LayerNorm(16)
        self.proj = nn.Parameter(torch.randn(16, 6))
        self.emb = nn.Embedding(10, 16)

    def forward(self, img, ids):
        x = self.conv1(img).flatten(2).transpose(1, 2)  # [B, 4, 16]
        cls = self.class_embedding.expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], 1) + self.positional_embedding + self.emb(ids)[:, None]
        return self.ln(x).mean(1) @ self.proj


@pytest.mark.parametrize("partitions,mode", [(1, "contiguous"), (3, "contiguous"), (4, "hash")])
def test_layernorm_conv_raw_parameters_embedding(partitions, mode):
    m = _Misc()
    tvs = _tvs_for(m, 3)
    patched = ak.patch(copy.deepcopy(m), tvs, partitions=partitions, partition_mode=mode, seed=1, backend=BACKEND)
    assert sorted(ak.coefficients(patched)) == sorted(dict(m.named_parameters()))
    _check(m, patched, tvs, (torch.randn(2, 3, 8, 8), torch.tensor([1, 7])), partitions, mode, seed=1)


def test_every_block_gets_a_nonzero_update_with_partitions():
    # The paper's masks give 1-D and 4-D blocks a zero update; ours are defined for every block.
    m = _Misc()
    tvs = _tvs_for(m, 2)
    patched = ak.patch(copy.deepcopy(m), tvs, partitions=4, backend=BACKEND)
    coefs = ak.coefficients(patched)
    (patched(torch.randn(2, 3, 8, 8), torch.tensor([1, 7])).square().sum()).backward()
    for name, c in coefs.items():
        if name != "emb.weight":  # only rows 1 and 7 of the embedding are used
            assert (c.grad != 0).all(), name
