"""torch.compile of a patched module gives the eager coefficient gradients, for every block kind.

This catches a class of silent wrong answers that depends on the torch version: torch 2.11's
tracer turned the forward of the torch backend's autograd Function (then: an in-place-updated
clone of theta0, cast with a same-dtype ``.to()``) into a graph whose coefficient gradients were
exactly zero, while eager gave the right ones. The comparison below runs on whichever torch is
installed (CI runs it on the oldest supported torch too), for each block kind separately, so a
regression in any one wiring (linear, attention in-/out-projection, LayerNorm, convolution, raw
parameter, embedding) names the kind that broke.
"""
import copy

import pytest
import torch
from torch import nn

import atlas_kernels as ak

from ._util import DEV, rel_err


class _AllKinds(nn.Module):
    """One block of every kind: convolution, embedding, raw parameters, LayerNorm, attention, linear."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 4, stride=4)        # 8 x 8 image -> 4 tokens of width 16
        self.emb = nn.Embedding(11, 16)
        self.raw = nn.Parameter(torch.randn(16) * 0.1)   # added to every token, like a class embedding
        self.ln = nn.LayerNorm(16)
        self.attn = nn.MultiheadAttention(16, 2)
        self.fc = nn.Linear(16, 8)
        self.proj = nn.Parameter(torch.randn(8, 4) * 0.3)  # used as x @ proj, like open_clip's

    def forward(self, img, ids):
        x = self.conv(img).flatten(2).permute(2, 0, 1)   # [tokens, batch, width]
        x = x + self.emb(ids).transpose(0, 1) + self.raw
        h = self.ln(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return torch.tanh(self.fc(x)) @ self.proj


KINDS = {  # block name -> kind
    "conv.weight": "conv", "conv.bias": "conv", "emb.weight": "embedding", "raw": "raw parameter",
    "ln.weight": "layernorm", "ln.bias": "layernorm",
    "attn.in_proj_weight": "mha in-proj", "attn.in_proj_bias": "mha in-proj",
    "attn.out_proj.weight": "mha out-proj", "attn.out_proj.bias": "mha out-proj",
    "fc.weight": "linear", "fc.bias": "linear", "proj": "raw parameter",
}


def _grads(fn, coefs, *args):
    for c in coefs.values():
        c.grad = None
    out = fn(*args)
    w = torch.linspace(-1.0, 1.5, out.numel(), device=out.device).reshape(out.shape)
    (out.float() * w).sum().backward()
    return out.detach(), {k: c.grad.clone() for k, c in coefs.items()}


def _check(model, args, backend, partitions, kinds):
    g = torch.Generator().manual_seed(1)
    tvs = ak.TaskVectors({k: torch.randn((3, *p.shape), generator=g) * 0.05
                          for k, p in model.named_parameters()}).to(DEV)
    m = ak.patch(copy.deepcopy(model), tvs, partitions=partitions, partition_mode="hash", backend=backend)
    coefs = ak.coefficients(m)
    with torch.no_grad():
        for c in coefs.values():
            c.copy_(torch.randn(c.shape, generator=g))
    y, eager = _grads(m, coefs, *args)
    torch._dynamo.reset()
    try:
        yc, compiled = _grads(torch.compile(m, fullgraph=True, backend="aot_eager"), coefs, *args)
    finally:
        torch._dynamo.reset()
    assert rel_err(yc, y) < 1e-5, f"compiled output differs from eager: rel err {rel_err(yc, y):.3g}"
    bad = {}
    for name, e in eager.items():
        assert e.abs().sum() > 0, f"eager coefficient gradient of {name!r} is zero: the check would be vacuous"
        err = rel_err(compiled[name], e)
        if err > 1e-5:
            bad[name] = (kinds(name), err, compiled[name].abs().max().item())
    assert not bad, ("torch.compile changed coefficient gradients (block: (kind, rel err, max |compiled|)) "
                     f"on torch {torch.__version__}: {bad}")


@pytest.mark.parametrize("backend,partitions", [("auto", 1), ("torch", 1), ("torch", 2), ("triton", 1)])
def test_compiled_coef_grads_match_eager_every_block_kind(backend, partitions):
    model = _AllKinds().to(DEV)
    tvs_names = {k for k, _ in model.named_parameters()}
    assert tvs_names == set(KINDS), "the kinds table must name every block of the module"
    assert set(KINDS.values()) >= {"conv", "embedding", "raw parameter", "layernorm", "mha in-proj",
                                   "mha out-proj", "linear"}
    g = torch.Generator().manual_seed(2)
    img = torch.randn(2, 3, 8, 8, generator=g).to(DEV)
    ids = torch.randint(0, 11, (2, 4), generator=g).to(DEV)
    _check(model, (img, ids), backend, partitions, KINDS.get)

# The whole tiny open_clip tower (class/positional embeddings, ln_pre/ln_post, proj) compiled against
# eager: test_triton_whole_model.py::test_patched_vit_compiles_fullgraph.


def test_a_vit_b32_layout_compiles_to_one_graph_without_recompiles():
    """The ViT-B/32 image tower's layout (12 layers, 152 blocks: 26 LayerNorms) at width 16, patched
    with the defaults: ``torch.compile`` without ``fullgraph`` traces one graph, with no graph break
    and no recompilation (a class per block once made every LayerNorm its own class, and the tower hit
    dynamo's recompile limit after 8), and matches eager; ``fullgraph=True`` compiles it too."""
    import warnings

    from torch._dynamo.utils import counters

    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vis = open_clip.model._build_vision_tower(
            16, {"image_size": 64, "layers": 12, "width": 16, "patch_size": 32, "head_width": 8}).train().to(DEV)
    assert len(list(vis.named_parameters())) == 152
    g = torch.Generator().manual_seed(3)
    tvs = ak.TaskVectors({k: torch.randn((2, *p.shape), generator=g) * 0.02 for k, p in vis.named_parameters()})
    m = ak.patch(vis, tvs.to(DEV))
    assert len({type(x) for x in m.modules() if isinstance(x, nn.LayerNorm)}) == 1  # one AtlasLayerNorm class
    coefs = ak.coefficients(m)
    with torch.no_grad():
        for c in coefs.values():
            c.copy_(torch.randn(c.shape, generator=g) * 0.5)
    x = torch.randn(2, 3, 64, 64, generator=g).to(DEV)
    y, eager = _grads(m, coefs, x)
    torch._dynamo.reset()
    counters.clear()
    try:
        yc, compiled = _grads(torch.compile(m, backend="aot_eager"), coefs, x)
        stats = dict(counters["stats"])
        breaks = dict(counters["graph_break"])
        recompiles = {k: dict(v) for k, v in counters.items() if "recompil" in k}
        torch._dynamo.reset()
        yf, _ = _grads(torch.compile(m, fullgraph=True, backend="aot_eager"), coefs, x)
    finally:
        torch._dynamo.reset()
    assert stats.get("unique_graphs") == 1 and not breaks and not any(recompiles.values()), (stats, breaks, recompiles)
    assert rel_err(yc, y) < 1e-5 and rel_err(yf, y) < 1e-5
    worst = max(coefs, key=lambda k: rel_err(compiled[k], eager[k]))
    assert rel_err(compiled[worst], eager[worst]) < 1e-4, worst
