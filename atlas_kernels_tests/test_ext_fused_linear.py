"""The compiled extension's fused CPU linear (``atlas_kernels_ext::fused_linear`` and
``fused_linear_backward``, wired in ``ops.ext_backend`` ``ExtBackend.linear`` for CPU tensors) against the float64
reference: every storage, N = 1, 3, 21, K = 1, 3 (contiguous and hash), fp32/bf16/fp16 compute,
odd shapes cut into many odd chunks (``ATLAS_KERNELS_EXT_FUSED_CHUNK``), NaN-poisoned outputs and
scratch, gradients bitwise equal over two runs, and the coefficient reduction bitwise equal over 1
and 2 threads. Skips without the extension (build:
``ATLAS_KERNELS_BUILD_EXT=1 python setup.py build_ext --inplace``).
"""
from __future__ import annotations

import pytest
import torch

from atlas_kernels import ops
from atlas_kernels import reference as R
from atlas_kernels.blocks import Block
from atlas_kernels.partitions import Partition
from atlas_kernels_tests.test_backends import EPS, EXT_MISSING, STORAGES, check, make_slab

pytestmark = pytest.mark.skipif(EXT_MISSING is not None, reason=f"compiled extension not built: {EXT_MISSING}")

# chunks of 27 elements: with in = 37, runs cut by chunk edges and by row ends, 8 vector lanes + a tail
SMALL_CHUNK = "27"


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setenv("ATLAS_KERNELS_EXT_POISON", "1")
    monkeypatch.setenv("ATLAS_KERNELS_EXT_FUSED_CHUNK", SMALL_CHUNK)
    yield


def _cb():
    return ops.get("ext")


def _case(n, k, mode, storage, o=45, i=37, lead=(2, 3), cdtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    pw = Partition.for_block("w", k, mode, seed=4) if k > 1 else Partition(1)
    pb = Partition.for_block("b", 2, "hash", seed=6)
    w0, b0 = torch.randn(o, i) * 0.1, torch.randn(o)
    wt, ws = make_slab(n, (o, i), storage, "cpu")
    bt, bs = make_slab(n, (o,), storage, "cpu")
    wc = (torch.randn(n, k) if k > 1 else torch.randn(n)).requires_grad_()
    bc = torch.randn(n, 2).requires_grad_()
    x = torch.randn(*lead, i).to(cdtype).requires_grad_()
    return dict(x=x, w0=w0, wt=wt, ws=ws, wc=wc, pw=pw, b0=b0, bt=bt, bs=bs, bc=bc, pb=pb)


def _run(c, dy=None):
    wblock = Block(c["w0"], c["wt"], c["wc"], c["pw"], c["ws"])
    assert _cb().fused_applies(c["x"].dtype, wblock, c["x"].device)
    y = ops.linear(c["x"], wblock, Block(c["b0"], c["bt"], c["bc"], c["pb"], c["bs"]), backend="ext")
    dy = torch.randn_like(y) if dy is None else dy
    return (y, dy) + torch.autograd.grad(y, (c["x"], c["wc"], c["bc"]), dy)


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("n,k,mode", [(1, 1, "contiguous"), (3, 3, "contiguous"), (3, 3, "hash"),
                                      (21, 1, "contiguous")], ids=["n1k1", "n3k3-contig", "n3k3-hash", "n21k1"])
@pytest.mark.parametrize("cdtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_fused_linear_matches_float64(storage, n, k, mode, cdtype):
    c = _case(n, k, mode, storage, cdtype=cdtype)
    y, dy, dx, dwc, dbc = _run(c)
    o, i = c["w0"].shape
    assert y.dtype == cdtype and y.shape == (2, 3, o) and dx.dtype == cdtype
    x64 = c["x"].detach().double().requires_grad_()
    wc64, bc64 = c["wc"].detach().double().requires_grad_(), c["bc"].detach().double().requires_grad_()
    wt64, bt64 = R.dequantize(c["wt"], c["ws"]), R.dequantize(c["bt"], c["bs"])
    y64 = R.linear(x64, c["w0"], wt64, wc64, c["b0"], bt64, bc64, c["pw"], c["pb"])
    g64 = torch.autograd.grad(y64, (x64, wc64, bc64), dy.double())
    w_abs = R.compose(c["w0"].abs(), wt64.abs(), c["wc"].detach().abs(), c["pw"])
    b_abs = R.compose(c["b0"].abs(), bt64.abs(), c["bc"].detach().abs(), c["pb"])
    dya, xa = dy.double().abs().reshape(-1, o), x64.detach().abs().reshape(-1, i)
    # y and dx round through cdtype twice (W, then the product): 4 cdtype ulps of the absolute sum
    check(y, y64, None, xa.reshape(2, 3, i) @ w_abs.t() + b_abs, 4 * EPS[cdtype], "y")
    check(dx, g64[0], None, (dya @ w_abs).reshape(2, 3, i), 4 * EPS[cdtype], "dx")
    check(dwc, g64[1], None, R.coef_grad(dya.t() @ xa, wt64.abs(), k, c["pw"]).reshape(dwc.shape),
          4 * EPS[cdtype], "dcoef_W")
    check(dbc, g64[2], None, R.coef_grad(dya.sum(0), bt64.abs(), 2, c["pb"]), 4 * EPS[cdtype], "dcoef_b")


@pytest.mark.parametrize("chunk", [SMALL_CHUNK, None], ids=["small-chunks", "default-chunks"])
def test_fused_linear_deterministic_over_runs_and_threads(monkeypatch, chunk):
    """Bitwise the same over two runs. Over 1 and 2 threads: the coefficient gradients (the
    extension's reduction: chunks fixed by the shape, partials summed in chunk order). x and dy
    hold small integers there, so that G = dy^T x is exact whatever order torch's BLAS sums in
    (the GEMMs are torch's, as in every backend; y and dx round as its BLAS does)."""
    if chunk is None:
        monkeypatch.delenv("ATLAS_KERNELS_EXT_FUSED_CHUNK")
    c = _case(3, 3, "hash", "int8", o=301, i=270, lead=(17,))
    first = _run(c)
    again = _run(c, first[1])
    for name, a, b in zip(("y", "dy", "dx", "dcoef_W", "dcoef_b"), first, again):
        assert torch.equal(a, b), f"{name}: differs between two runs"
    with torch.no_grad():
        c["x"].copy_(torch.randint(-3, 4, c["x"].shape))
    dy = torch.randint(-3, 4, first[1].shape).float()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _run(c, dy)
        torch.set_num_threads(2)
        two = _run(c, dy)
    finally:
        torch.set_num_threads(threads)
    for name, s, t in zip(("dcoef_W", "dcoef_b"), one[3:], two[3:]):
        assert torch.equal(s, t), f"{name}: depends on the thread count"


def test_fused_linear_frozen_or_missing_bias_and_plain_x():
    """No bias, a frozen bias (cast, not composed), an x without leading dims and without grad."""
    c = _case(3, 1, "contiguous", "float16", lead=(9,))
    x = c["x"].detach()
    for b0, label in ((None, "no bias"), (c["b0"], "frozen bias")):
        y = ops.linear(x, Block(c["w0"], c["wt"], c["wc"], c["pw"], c["ws"]), Block(b0), backend="ext")
        (dwc,) = torch.autograd.grad(y, c["wc"], torch.ones_like(y))
        w64 = R.compose(c["w0"], R.dequantize(c["wt"], c["ws"]), c["wc"].detach(), c["pw"])
        ref = x.double() @ w64.t() + (0 if b0 is None else b0.double())
        check(y, ref, None, x.double().abs() @ w64.abs().t() + (0 if b0 is None else b0.double().abs()),
              4 * EPS[torch.float32], label)
        gref = R.coef_grad(torch.ones(9, 45, dtype=torch.float64).t() @ x.double(), R.dequantize(c["wt"], c["ws"]),
                           1, c["pw"])
        assert torch.allclose(dwc.double(), gref.reshape(-1), rtol=1e-5, atol=1e-4), label


def test_fused_linear_errors_name_the_argument():
    c = _case(3, 1, "contiguous", "float32")
    ext = torch.ops.atlas_kernels_ext
    bad_x = torch.randn(4, 36)
    with pytest.raises(RuntimeError, match=r"x must be \[M, 37\]"):
        ext.fused_linear(bad_x, c["w0"], c["wt"], c["wc"].detach()[:, None], None, 0, 0, None)
    with pytest.raises(RuntimeError, match="int8 / float8_e4m3fn task vectors need their per-row scale"):
        ext.fused_linear(torch.randn(4, 37), c["w0"], c["wt"].to(torch.int8), c["wc"].detach()[:, None], None, 0, 0,
                         None)
    with pytest.raises(RuntimeError, match=r"bias must be a CPU float32/bfloat16/float16 \[45\]"):
        ext.fused_linear(torch.randn(4, 37), c["w0"], c["wt"], c["wc"].detach()[:, None], None, 0, 0,
                         torch.randn(44))


def test_fused_linear_not_taken_where_it_does_not_apply():
    """Frozen weights, float64 and non-CPU tensors take compose + matmul (the fused op is CPU-only)."""
    cb = _cb()
    w0, tau, x = torch.randn(5, 4), torch.randn(2, 5, 4), torch.randn(3, 4)
    coef = torch.zeros(2)
    cpu, meta = torch.device("cpu"), torch.device("meta")
    assert cb.fused_applies(x.dtype, Block(w0, tau, coef), cpu)
    assert not cb.fused_applies(x.dtype, Block(w0), cpu)
    assert not cb.fused_applies(torch.float64, Block(w0, tau, coef), cpu)
    assert not cb.fused_applies(x.dtype, Block(w0.to("meta"), tau.to("meta"), coef.to("meta")), meta)


@pytest.mark.parametrize("fused_linear,storage", [("auto", "float16"), ("auto", "int8"), (True, "float16"),
                                                  (False, "int8")])
def test_which_linear_weights_take_the_fused_op(tiny_vit, fused_linear, storage):
    """patch(fused_linear=...): True puts every dense linear weight on the fused op, False none, and
    "auto" (the default) the weights of at least FUSED_MIN_NUMEL elements (measured faster there; the
    small ones read their weight from the grouped compose, where one op call per block would cost
    more host time than it saves)."""
    import copy

    import atlas_kernels as ak
    from atlas_kernels.ops.ext_backend import FUSED_MIN_NUMEL
    from atlas_kernels.plan import plan_of

    vit = copy.deepcopy(tiny_vit).cpu()
    g = torch.Generator().manual_seed(0)
    tvs = ak.TaskVectors({k: torch.randn((2, *p.shape), generator=g) * 0.01
                          for k, p in vit.named_parameters()}).to_storage(storage)
    m = ak.patch(vit, tvs, backend="ext", fused_linear=fused_linear)
    own = set(plan_of(m).own)
    weights = {n: p.numel() for n, p in tiny_vit.named_parameters()
               if n.endswith(("in_proj_weight", "out_proj.weight", "c_fc.weight", "c_proj.weight"))}
    want = {n for n, numel in weights.items()
            if fused_linear is True or (fused_linear == "auto" and numel >= FUSED_MIN_NUMEL)}
    assert own == want, (own, want)
    x = torch.randn(2, 3, 32, 32)
    m(x).sum().backward()
    assert all(c.grad is not None for c in ak.coefficients(m).values())
