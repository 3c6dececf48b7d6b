"""The Triton backend's autograd wiring (atlas_kernels.ops.triton_backend) against torch.autograd on
float64 clones of the reference (atlas_kernels.reference).

Both linear dispatch paths are covered (fused GEMMs for small M, compose + matmul for large M: the
threshold is forced per call with ``fused_max_m``), through the ``atlas_kernels::triton_*`` custom ops
(the one wiring: eager calls and compiled graphs run the same ops). Tolerance as in
test_kernels_triton.py:
``|out - ref64| <= 2 * |ref_low - ref64| + rtol * ref_abs``.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from atlas_kernels import kernels, ops
from atlas_kernels import reference as R
from atlas_kernels.blocks import Block
from atlas_kernels.kernels import _common
from atlas_kernels.ops import triton_backend as TB
from atlas_kernels.partitions import Partition

from ._util import assert_close

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
needs_gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (real shapes, inductor)")
ACC_RTOL = 1e-6  # fp32 accumulation: relative to the sum of |terms| (about 16 ulps)
EPS = {torch.float32: ACC_RTOL, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}
FUSED, COMPOSE = 10**9, 0  # fused_max_m forcing each path


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(_common, "POISON_SCRATCH", True)
    yield


def _linear(x, wblock, bblock, fused_max_m=None):
    """``ops.linear`` on the Triton backend with the fused threshold ``fused_max_m``."""
    class Tri(TB.TritonBackend):
        def linear(self, x, w, fused_max_m=fused_max_m):
            return super().linear(x, w, fused_max_m=fused_max_m)

    return ops.linear(x, wblock, bblock, backend=Tri())


def _slab(n, shape, int8):
    if int8:
        tau = torch.randint(-127, 128, (n, *shape), dtype=torch.int8, device=DEV)
        scale = torch.rand(n, shape[0] if len(shape) >= 2 else 1, device=DEV) * 0.002 + 1e-4
        return tau, scale
    return (torch.randn(n, *shape, device=DEV) * 0.05).to(torch.bfloat16), None


# variants: (w adapted, w K/mode, bias: "adapted" | "frozen" | None, int8 storage, coef as [N])
VARIANTS = {
    "full": (True, (3, "hash"), "adapted", False, False),
    "frozen-bias": (True, (1, "contiguous"), "frozen", False, True),
    "no-bias": (True, (3, "contiguous"), None, False, False),
    "frozen-weight": (False, (1, "contiguous"), "adapted", False, False),
    "int8": (True, (3, "contiguous"), "adapted", True, False),
}


def _check_linear(variant, path, cdtype, lead=(2, 5), o=77, i=123, n=3, autocast=False):
    w_adapt, (k, mode), bias, int8, vec = VARIANTS[variant]
    pw = Partition.for_block("w", k, mode, seed=7)
    pb = Partition(2)
    w0 = torch.randn(o, i, device=DEV) * 0.1
    w_tau, w_scale = _slab(n, (o, i), int8) if w_adapt else (None, None)
    w_coef = (torch.randn(n, device=DEV) if vec else torch.randn(n, k, device=DEV)).requires_grad_(w_adapt)
    b0 = torch.randn(o, device=DEV) if bias else None
    b_tau, b_scale = _slab(n, (o,), int8) if bias == "adapted" else (None, None)
    b_coef = torch.randn(n, 2, device=DEV).requires_grad_(bias == "adapted")
    x_dtype = torch.float32 if autocast else cdtype
    x = torch.randn(*lead, i, device=DEV).to(x_dtype).requires_grad_()

    args = (Block(w0, w_tau, w_coef if w_adapt else None, pw, w_scale),
            Block(b0, b_tau, b_coef if bias == "adapted" else None, pb, b_scale))
    if autocast:
        with torch.autocast(DEV, dtype=cdtype):
            y = _linear(x, *args, fused_max_m=path)
    else:
        y = _linear(x, *args, fused_max_m=path)
    assert y.dtype == cdtype and y.shape == (*lead, o)
    dy = torch.randn_like(y)
    wrt = [x] + ([w_coef] if w_adapt else []) + ([b_coef] if bias == "adapted" else [])
    grads = torch.autograd.grad(y, wrt, dy)

    # float64 reference through torch.autograd (x as the kernel sees it: rounded to cdtype)
    x64 = x.detach().to(cdtype).double().requires_grad_()
    wc64 = w_coef.detach().double().requires_grad_()
    bc64 = b_coef.detach().double().requires_grad_()
    wt64 = None if w_tau is None else R.dequantize(w_tau, w_scale)
    bt64 = None if b_tau is None else R.dequantize(b_tau, b_scale)
    y64 = R.linear(x64, w0, wt64, wc64, b0, bt64, bc64, pw, pb)
    wrt64 = [x64] + ([wc64] if w_adapt else []) + ([bc64] if bias == "adapted" else [])
    g64 = torch.autograd.grad(y64, wrt64, dy.double())

    # precision of the kernel path: W and c rounded to cdtype, products accumulated in fp32
    def comp(t0, t, c, p, dtype, absval=False):
        if t is None:
            return t0.abs().double() if absval else t0.to(dtype).double()
        if absval:
            return R.compose(t0.abs(), t.abs(), c.detach().abs(), p)
        return R.compose(t0, t, c.detach(), p, dtype=torch.float32).to(dtype).double()

    w_low = comp(w0, wt64, w_coef, pw, cdtype)
    w_abs = comp(w0, wt64, w_coef, pw, cdtype, absval=True)
    b_low = None if b0 is None else comp(b0, bt64, b_coef, pb, cdtype)
    b_abs = None if b0 is None else comp(b0, bt64, b_coef, pb, cdtype, absval=True)
    xd, dyd = x64.detach(), dy.double()
    assert_close(y, y64, F.linear(xd, w_low, b_low).to(cdtype), F.linear(xd.abs(), w_abs, b_abs), EPS[cdtype], "y")
    assert grads[0].dtype == x.dtype
    dx_low = (dyd.reshape(-1, o) @ w_low).reshape(g64[0].shape).to(cdtype)
    dx_abs = (dyd.abs().reshape(-1, o) @ w_abs).reshape(g64[0].shape)
    assert_close(grads[0], g64[0], dx_low, dx_abs, EPS[cdtype], "dx")
    j = 1
    if w_adapt:
        assert grads[j].shape == w_coef.shape and grads[j].dtype == w_coef.dtype
        g_abs = dyd.abs().reshape(-1, o).t() @ xd.abs().reshape(-1, i)
        ref_abs = R.coef_grad(g_abs, wt64.abs(), k, pw).reshape(w_coef.shape)
        assert_close(grads[j], g64[j], None, ref_abs, ACC_RTOL, "dcoef_W")
        j += 1
    if bias == "adapted":
        # the bias is a block of its own, added after the product: its gradient sum_rows(dy) comes
        # from autograd in the compute dtype (as the plain model's bias gradient does)
        ref_abs = R.coef_grad(dyd.abs().reshape(-1, o).sum(0), bt64.abs(), 2, pb)
        assert_close(grads[j], g64[j], None, ref_abs, max(ACC_RTOL, 2 * EPS[cdtype]), "dcoef_b")
    return grads


@pytest.mark.parametrize("path", [FUSED, COMPOSE], ids=["fused", "compose"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_linear_variants(variant, path):
    _check_linear(variant, path, torch.float32)


@pytest.mark.parametrize("path", [FUSED, COMPOSE], ids=["fused", "compose"])
@pytest.mark.parametrize("cdtype", [torch.float16, torch.bfloat16])
def test_linear_low_precision(cdtype, path):
    _check_linear("full", path, cdtype, lead=(9,))


@pytest.mark.parametrize("path", [FUSED, COMPOSE], ids=["fused", "compose"])
def test_linear_autocast(path):
    """Under autocast the op runs (and returns) in the autocast dtype; dx comes back in x's dtype."""
    _check_linear("full", path, torch.bfloat16, lead=(3, 3), autocast=True)


def test_linear_many_rows_and_tasks():
    """M = 130 rows (several M tiles), N = 21, on both paths."""
    for path in (FUSED, COMPOSE):
        _check_linear("full", path, torch.float32, lead=(130,), n=21, o=33, i=40)


def test_linear_grads_deterministic():
    for path in (FUSED, COMPOSE):
        torch.manual_seed(1)
        g1 = _check_linear("full", path, torch.float32)
        torch.manual_seed(1)
        g2 = _check_linear("full", path, torch.float32)
        for a, b in zip(g1, g2):
            assert torch.equal(a, b), "gradients differ between two identical runs"


def test_dispatch_threshold(monkeypatch):
    calls = []
    real_f, real_c = kernels.fused_linear, kernels.compose
    monkeypatch.setattr(kernels, "fused_linear", lambda *a, **kw: calls.append("fused") or real_f(*a, **kw))
    monkeypatch.setattr(kernels, "compose", lambda *a, **kw: calls.append("compose") or real_c(*a, **kw))
    w0, tau, coef = torch.randn(8, 16, device=DEV), torch.randn(2, 8, 16, device=DEV), torch.randn(2, device=DEV)
    for m, thr, want in [(9, None, "fused"), (TB.FUSED_MAX_M + 1, None, "compose"), (9, 4, "compose")]:
        calls.clear()
        TB.BACKEND.linear(torch.randn(m, 16, device=DEV), Block(w0, tau, coef, Partition(1)), fused_max_m=thr)
        assert calls == [want], (m, thr, calls)


# ------------------------------------------------------------------------------------------------
# compose
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("coef_shape,mode", [("vec", "contiguous"), ("k3", "contiguous"), ("k3", "hash")])
@pytest.mark.parametrize("int8", [False, True], ids=["bf16", "int8"])
def test_compose_autograd(coef_shape, mode, int8):
    n, shape = 3, (21, 37)
    k = 1 if coef_shape == "vec" else 3
    p = Partition.for_block("blk", k, mode, seed=1)
    theta0 = torch.randn(shape, device=DEV)
    tau, scale = _slab(n, shape, int8)
    coef = (torch.randn(n, device=DEV, dtype=torch.float64) if coef_shape == "vec"
            else torch.randn(n, k, device=DEV)).requires_grad_()
    w = TB.BACKEND.compose(Block(theta0, tau, coef, p, scale), torch.float16)
    assert w.dtype == torch.float16 and w.shape == shape
    r = torch.randn(shape, device=DEV).half().float()  # dL/dW, exact in fp16
    (g,) = torch.autograd.grad((w.float() * r).sum(), coef)
    assert g.shape == coef.shape and g.dtype == coef.dtype
    c64 = coef.detach().double().requires_grad_()
    t64 = R.dequantize(tau, scale)
    w64 = R.compose(theta0, t64, c64, p)
    (g64,) = torch.autograd.grad((w64 * r.double()).sum(), c64)
    w_low = R.compose(theta0, t64, coef.detach(), p, dtype=torch.float32).half()
    assert_close(w, w64, w_low, R.compose(theta0.abs(), t64.abs(), coef.detach().abs(), p), ACC_RTOL, "W")
    ref_abs = R.coef_grad(r.abs(), t64.abs(), k, p).reshape(coef.shape)
    assert_close(g, g64, None, ref_abs, ACC_RTOL, "dcoef")


# ------------------------------------------------------------------------------------------------
# custom ops: registration, opcheck, torch.compile
# ------------------------------------------------------------------------------------------------
def test_custom_ops_opcheck():
    ops = torch.ops.atlas_kernels
    n, o, i = 2, 5, 7
    w0, tau = torch.randn(o, i, device=DEV), torch.randn(n, o, i, device=DEV)
    coef = torch.randn(n, 2, device=DEV, requires_grad=True)
    torch.library.opcheck(ops.triton_compose.default, (coef, w0, tau, None, 2, 2, 99, torch.float32))
    x = torch.randn(3, i, device=DEV, requires_grad=True)
    for fused in (True, False):
        torch.library.opcheck(ops.triton_linear.default, (x, coef, w0, tau, None, 2, 1, 0, fused))


def test_torch_compile_fullgraph():
    """Traces the custom ops (fake impls + register_autograd) with fullgraph=True. On the CPU the
    aot_eager backend (no inductor C++ build); on a GPU see test_gpu_compile_inductor."""
    n, o, i = 3, 33, 47
    pw, pb = Partition.for_block("w", 3, "hash", 0), Partition(2)
    w0, tau = torch.randn(o, i, device=DEV), torch.randn(n, o, i, device=DEV)
    b0, btau = torch.randn(o, device=DEV), torch.randn(n, o, device=DEV)
    wc = torch.randn(n, 3, device=DEV, requires_grad=True)
    bc = torch.randn(n, 2, device=DEV, requires_grad=True)
    def f(x, thr):
        y = TB.BACKEND.linear(x, Block(w0, tau, wc, pw), fused_max_m=thr)
        return y.square().sum() + TB.BACKEND.compose(Block(b0, btau, bc, pb), torch.float32).square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    for thr in (FUSED, COMPOSE):
        x = torch.randn(4, i, device=DEV, requires_grad=True)
        got = torch.autograd.grad(compiled(x, thr), (x, wc, bc))
        want = torch.autograd.grad(f(x, thr), (x, wc, bc))
        for name, a, b in zip(("x", "wc", "bc"), got, want):
            assert_close(a, b.double(), None, b.abs().double() + 1e-3, 1e-5, f"compiled d{name}")


# ------------------------------------------------------------------------------------------------
# GPU (skipped without CUDA)
# ------------------------------------------------------------------------------------------------
@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("o,i", [(3072, 768), (768, 3072), (4096, 1024)], ids=["vitb32-fc", "vitb32-proj", "vitl14-fc"])
@pytest.mark.parametrize("m", [16, 1600])
def test_gpu_linear_real_shapes(o, i, m):
    torch.backends.cuda.matmul.allow_tf32 = False
    _check_linear("full", TB.FUSED_MAX_M, torch.bfloat16, lead=(m,), o=o, i=i, n=21)


@needs_gpu
@pytest.mark.gpu
def test_gpu_compile_inductor():
    n, o, i = 21, 768, 3072
    w0, tau = torch.randn(o, i, device=DEV) * 0.02, (torch.randn(n, o, i, device=DEV) * 0.002).bfloat16()
    b0, btau = torch.zeros(o, device=DEV), (torch.randn(n, o, device=DEV) * 0.01).bfloat16()
    wc = torch.full((n, 1), 0.3, device=DEV, requires_grad=True)
    bc = torch.full((n, 1), 0.3, device=DEV, requires_grad=True)

    def f(x):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return ops.linear(x, Block(w0, tau, wc, Partition(1)), Block(b0, btau, bc, Partition(1)),
                              backend="triton").float().square().mean()

    compiled = torch.compile(f, fullgraph=True)
    for m in (16, 256):
        x = torch.randn(m, i, device=DEV, requires_grad=True)
        got = torch.autograd.grad(compiled(x), (x, wc, bc))
        want = torch.autograd.grad(f(x), (x, wc, bc))
        for name, a, b in zip(("x", "wc", "bc"), got, want):
            # inductor may fuse the loss differently (dy rounds differently): compare loosely
            assert_close(a, b.double(), None, b.abs().double() + 1e-2 * b.abs().max().double(), 2e-2,
                         f"inductor d{name}")
