"""One parametrised set of op tests run against every available backend (torch, triton, ext).

``"ext"`` is the compiled extension (csrc/): its CPU kernels run here, its CUDA kernels on a GPU.
Without the built extension its cases skip with a reason (build: ``python setup.py build_ext
--inplace`` with ``ATLAS_KERNELS_BUILD_EXT=1``). References are float64 (atlas_kernels.reference);
tolerance ``|out - ref64| <= 2 * |ref_low - ref64| + rtol * ref_abs`` (ref_abs: the same sum over
absolute values); outputs and scratch buffers are NaN-poisoned before the kernels run.
"""
from __future__ import annotations

import pytest
import torch

from atlas_kernels import ops
from atlas_kernels import reference as R
from atlas_kernels.blocks import Block
from atlas_kernels.partitions import Partition
from atlas_kernels.task_vectors import quantize

from ._util import assert_close as check  # the tolerance rule of the module docstring
from ._util import assert_compiles_like_eager, float64_reference, random_task_vectors, randomize_coefficients

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
STORAGES = ["float32", "bfloat16", "float16", "int8", "float8_e4m3fn"]
PARTS = [(1, "contiguous"), (3, "contiguous"), (3, "hash")]
EPS = {torch.float32: 1e-6, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}
ACC_RTOL = 1e-6


def _ext_error():
    try:
        ops.get("ext")
        return None
    except RuntimeError as exc:
        return str(exc)


EXT_MISSING = _ext_error()
needs_ext = pytest.mark.skipif(EXT_MISSING is not None, reason=f"compiled extension not built: {EXT_MISSING}")
needs_gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


def _backend_param(name):
    if name == "ext":
        return pytest.param(name, marks=needs_ext)
    return name


BACKENDS = [_backend_param(b) for b in ("torch", "triton", "ext")]
# the extension's linear on CPU takes its fused op; "ext:compose" is its compose + matmul path (the
# one CUDA tensors take), and "triton:fused" the tile-fused GEMMs (small M)
LINEAR_BACKENDS = BACKENDS + [pytest.param("ext:compose", marks=needs_ext), "triton:fused"]


def _linear_backend(backend):
    """The backend object a linear test runs."""
    if backend == "ext:compose":
        ext = ops.get("ext")

        class Compose(type(ext)):
            def fused_applies(self, x_dtype, wblock, device):
                return False

        return Compose()
    if backend == "triton:fused":
        tri = ops.get("triton")

        class Fused(type(tri)):
            def linear(self, x, wblock, fused_max_m=None):
                return super().linear(x, wblock, fused_max_m=1 << 20)

        return Fused()
    return ops.get(backend)


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    from atlas_kernels.kernels import _common

    monkeypatch.setattr(_common, "POISON_SCRATCH", True)
    monkeypatch.setenv("ATLAS_KERNELS_EXT_POISON", "1")
    yield


def make_slab(n, shape, storage, device=DEV):
    tau64 = torch.randn((n, *shape), dtype=torch.float64) * 0.1
    if storage in ("int8", "float8_e4m3fn"):
        qs = [quantize(tau64[i].float(), storage) for i in range(n)]
        return torch.stack([q for q, _ in qs]).to(device), torch.stack([s for _, s in qs]).to(device)
    return tau64.to(getattr(torch, storage)).to(device), None


def _coef(n, k, device=DEV):
    return torch.randn(n, k, device=device) if k > 1 else torch.randn(n, device=device)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("k,mode", PARTS, ids=["k1", "k3-contig", "k3-hash"])
@pytest.mark.parametrize("n,shape", [(1, (5, 37, 41)), (3, (131,)), (21, (3, 2, 301))], ids=["n1", "n3", "n21"])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_compose_and_grad(backend, storage, k, mode, n, shape, out_dtype):
    theta0 = torch.randn(shape, device=DEV)
    tau, scale = make_slab(n, shape, storage)
    part = Partition.for_block("blk", k, mode, seed=5)
    coef = _coef(n, k).requires_grad_()
    out = ops.compose(Block(theta0, tau, coef, part, scale), out_dtype, backend=backend)
    assert out.dtype == out_dtype and out.shape == theta0.shape
    tau64 = R.dequantize(tau, scale)
    ref = R.compose(theta0, tau64, coef.detach(), part)
    low = R.compose(theta0, tau64, coef.detach(), part, dtype=torch.float32).to(out_dtype)
    absref = R.compose(theta0.abs(), tau64.abs(), coef.detach().abs(), part)
    check(out, ref, low, absref, EPS[out_dtype], "compose")
    g = torch.randn(shape, device=DEV).to(out_dtype)
    (d1,) = torch.autograd.grad(out, coef, g)
    ref_g = R.coef_grad(g, tau64, k, part).reshape(coef.shape)
    abs_g = R.coef_grad(g.abs(), tau64.abs(), k, part).reshape(coef.shape)
    check(d1, ref_g, None, abs_g, ACC_RTOL, "dcoef")
    out2 = ops.compose(Block(theta0, tau, coef, part, scale), out_dtype, backend=backend)
    (d2,) = torch.autograd.grad(out2, coef, g)
    assert torch.equal(out, out2) and torch.equal(d1, d2), "not deterministic over two runs"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("storage", ["float16", "float8_e4m3fn"])
def test_compose_low_precision_model(backend, dtype, storage):
    """A half-precision model (theta0 and the composed block in fp16/bf16), gradients in that dtype."""
    shape, n, part = (33, 65), 3, Partition.for_block("b", 3, "contiguous")
    theta0 = torch.randn(shape, device=DEV).to(dtype)
    tau, scale = make_slab(n, shape, storage)
    coef = torch.randn(n, 3, device=DEV, requires_grad=True)
    out = ops.compose(Block(theta0, tau, coef, part, scale), dtype, backend=backend)
    tau64 = R.dequantize(tau, scale)
    check(out, R.compose(theta0, tau64, coef.detach(), part),
          R.compose(theta0, tau64, coef.detach(), part, dtype=torch.float32).to(dtype),
          R.compose(theta0.abs(), tau64.abs(), coef.detach().abs(), part), EPS[dtype], "compose")
    g = torch.randn(shape, device=DEV).to(dtype)
    (d,) = torch.autograd.grad(out, coef, g)
    check(d, R.coef_grad(g, tau64, 3, part), None, R.coef_grad(g.abs(), tau64.abs(), 3, part), name="dcoef")


@needs_ext
@pytest.mark.parametrize("storage", ["float16", "int8"])
def test_ext_cpu_coef_grad_independent_of_threads(storage):
    """Fixed tiles, fixed-order final sum: bitwise the same with 1 and 2 threads."""
    shape, n = (97, 301), 5
    tau, scale = make_slab(n, shape, storage, "cpu")
    g = torch.randn(shape)
    ext = torch.ops.atlas_kernels_ext
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = ext.coef_grad(g, tau, scale, 3, 2, 1234)
        torch.set_num_threads(max(2, threads))
        b = ext.coef_grad(g, tau, scale, 3, 2, 1234)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(a, b)
    check(a, R.coef_grad(g, R.dequantize(tau, scale), 3, Partition(3, "hash", 1234)), None,
          R.coef_grad(g.abs(), R.dequantize(tau, scale).abs(), 3, Partition(3, "hash", 1234)), name="dcoef")


@pytest.mark.parametrize("backend", LINEAR_BACKENDS)
@pytest.mark.parametrize("storage", ["bfloat16", "int8"])
@pytest.mark.parametrize("cdtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_linear(backend, storage, cdtype):
    backend = _linear_backend(backend)
    n, o, i = 3, 77, 123
    pw, pb = Partition.for_block("w", 3, "hash", 7), Partition(2)
    w0, b0 = torch.randn(o, i, device=DEV) * 0.1, torch.randn(o, device=DEV)
    wt, ws = make_slab(n, (o, i), storage)
    bt, bs = make_slab(n, (o,), storage)
    wc = torch.randn(n, 3, device=DEV, requires_grad=True)
    bc = torch.randn(n, 2, device=DEV, requires_grad=True)
    x = torch.randn(2, 5, i, device=DEV).to(cdtype).requires_grad_()
    y = ops.linear(x, Block(w0, wt, wc, pw, ws), Block(b0, bt, bc, pb, bs), backend=backend)
    assert y.dtype == cdtype and y.shape == (2, 5, o)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, wc, bc), dy)
    x64 = x.detach().double().requires_grad_()
    wc64, bc64 = wc.detach().double().requires_grad_(), bc.detach().double().requires_grad_()
    wt64, bt64 = R.dequantize(wt, ws), R.dequantize(bt, bs)
    y64 = R.linear(x64, w0, wt64, wc64, b0, bt64, bc64, pw, pb)
    g64 = torch.autograd.grad(y64, (x64, wc64, bc64), dy.double())
    w_abs = R.compose(w0.abs(), wt64.abs(), wc.detach().abs(), pw)
    b_abs = R.compose(b0.abs(), bt64.abs(), bc.detach().abs(), pb)
    y_abs = x64.detach().abs() @ w_abs.t() + b_abs
    # y rounds through cdtype twice (W, then the product): 4 cdtype ulps of the absolute sum
    check(y, y64, None, y_abs, 4 * EPS[cdtype], "y")
    check(grads[0], g64[0], None, dy.double().abs() @ w_abs, 4 * EPS[cdtype], "dx")
    gabs = dy.double().abs().reshape(-1, o).t() @ x64.detach().abs().reshape(-1, i)
    check(grads[1], g64[1], None, R.coef_grad(gabs, wt64.abs(), 3, pw), 4 * EPS[cdtype], "dcoef_W")
    check(grads[2], g64[2], None, R.coef_grad(dy.double().abs().reshape(-1, o).sum(0), bt64.abs(), 2, pb),
          4 * EPS[cdtype], "dcoef_b")


def _holder(theta0, tau, scale, coef, index=None):
    """A module holding one block under the names the modules use (``b``, ``b_tau``, ...)."""
    m = torch.nn.Module()
    for name, t in (("b", theta0), ("b_tau", tau), ("b_scale", scale), ("b_index", index)):
        m.register_buffer(name, t)
    m.register_parameter("b_coef", torch.nn.Parameter(coef))
    return m


def _group_case(storage, device=DEV):
    """Blocks of every kind for one group: 1-D to 3-D, K = 1 to 5, hashed and contiguous, a ragged
    block, and both output classes."""
    shapes = [(7,), (5, 3), (2, 3, 40), (1,), (33, 64), (9, 4)]
    parts = [Partition(1), Partition(2), Partition.for_block("c", 3, "hash", 2), Partition(1),
             Partition.for_block("e", 5, "hash", 9), Partition(1)]
    n = 3
    held = [None, None, None, None, None, torch.tensor([0, 2])]
    cases = []
    for j, (s, p, idx) in enumerate(zip(shapes, parts, held)):
        tau, scale = make_slab(n if idx is None else len(idx), s, storage, device)
        coef = torch.randn(n, p.k, device=device) if p.k > 1 else torch.randn(n, device=device)
        owner = _holder(torch.randn(s, device=device), tau, scale, coef, None if idx is None else idx.to(device))
        cases.append((owner, p, j % 2, idx))
    return cases, n


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_grouped_compose_and_grad(backend, storage, out_dtype):
    """Every block of a group composed in one pass (class 0 in out_dtype, class 1 in theta0's
    dtype) and every coefficient gradient in one backward, against float64; unused outputs get a
    zero gradient; ragged rows not held get 0."""
    from atlas_kernels.grouping import BlockGroup, Entry
    from atlas_kernels.ops.group import GroupCompose

    cases, n = _group_case(storage)
    group = BlockGroup(ops.get(backend), [Entry(o, "b", sel, p) for o, p, sel, _ in cases])
    coefs = group.coefs
    outs = GroupCompose.apply(group, (out_dtype, torch.float32), *coefs)
    assert len(outs) == len(cases)
    grads_in = []
    for e, out in zip(group.entries, outs):
        o = e.owner
        t64 = R.dequantize(o.b_tau, o.b_scale)
        c = o.b_coef.detach()
        c = c if e.index is None else c.index_select(0, e.index)
        dt = out_dtype if e.sel == 0 else torch.float32
        assert out.dtype == dt and out.shape == o.b.shape
        check(out, R.compose(o.b, t64, c, e.partition),
              R.compose(o.b, t64, c, e.partition, dtype=torch.float32).to(dt),
              R.compose(o.b.abs(), t64.abs(), c.abs(), e.partition), EPS[dt], "grouped compose")
        grads_in.append(None if e.theta0.dim() == 1 and e.theta0.numel() == 1 else torch.randn(out.shape, device=DEV))
    used = [(o, g) for o, g in zip(outs, grads_in) if g is not None]
    dcoef = torch.autograd.grad([o for o, _ in used], coefs, [g.to(o.dtype) for o, g in used], allow_unused=True)
    for e, g, dc in zip(group.entries, grads_in, dcoef):
        o = e.owner
        k = e.partition.k
        if g is None:
            assert dc is None or not dc.any()
            continue
        t64 = R.dequantize(o.b_tau, o.b_scale)
        ref = R.coef_grad(g.to(out_dtype if e.sel == 0 else torch.float32), t64, k, e.partition)
        ref_abs = R.coef_grad(g.abs(), t64.abs(), k, e.partition)
        if e.index is not None:
            ref = torch.zeros(n, k, dtype=ref.dtype).index_copy_(0, e.index.cpu(), ref.cpu())
            ref_abs = torch.zeros(n, k, dtype=ref.dtype).index_copy_(0, e.index.cpu(), ref_abs.cpu())
        check(dc, ref.reshape(dc.shape), None, ref_abs.reshape(dc.shape), ACC_RTOL, "grouped dcoef")


@needs_ext
def test_ext_meta_and_opcheck():
    """The C++ Meta kernels give shapes/dtypes without running a kernel; opcheck exercises the
    schema, fake tensors and the registered autograd."""
    ext = torch.ops.atlas_kernels_ext
    theta0, tau = torch.randn(5, 7), torch.randn(2, 5, 7).half()
    coef = torch.randn(2, 3, requires_grad=True)
    m = ext.compose(theta0.to("meta"), tau.to("meta"), coef.detach().to("meta"), None, 2, 9, torch.bfloat16)
    assert m.shape == (5, 7) and m.dtype == torch.bfloat16 and m.device.type == "meta"
    torch.library.opcheck(ext.compose.default, (theta0, tau, coef, None, 2, 9, torch.float32))
    torch.library.opcheck(ext.coef_grad.default, (theta0, tau, None, 3, 1, 0))


@needs_ext
def test_ext_errors_name_the_parameter():
    ext = torch.ops.atlas_kernels_ext
    with pytest.raises(RuntimeError, match="tau must be"):
        ext.compose(torch.randn(5), torch.randn(2, 6), torch.randn(2, 1), None, 0, 0, torch.float32)
    with pytest.raises(RuntimeError, match="need their per-row scale"):
        ext.compose(torch.randn(5), torch.zeros(2, 5, dtype=torch.int8), torch.randn(2, 1), None, 0, 0, torch.float32)
    with pytest.raises(RuntimeError, match="coef must be float32"):
        ext.compose(torch.randn(5), torch.randn(2, 5), torch.randn(3, 1), None, 0, 0, torch.float32)


def test_ext_backend_without_extension_says_how_to_build(monkeypatch, tiny_vit):
    import sys

    import atlas_kernels
    import atlas_kernels as ak

    monkeypatch.setitem(sys.modules, "atlas_kernels._C", None)  # `from .. import _C` now fails
    monkeypatch.delattr(atlas_kernels, "_C", raising=False)
    monkeypatch.delitem(sys.modules, "atlas_kernels.ops.ext_backend", raising=False)
    monkeypatch.setattr(ops, "_loaded", {})
    with pytest.raises(RuntimeError, match="ATLAS_KERNELS_BUILD_EXT=1"):
        ops.compose(Block(torch.randn(3), torch.randn(1, 3), torch.randn(1), None), torch.float32, backend="ext")
    # patch refuses it up front, and "auto" falls back to torch on the CPU
    g = torch.Generator().manual_seed(0)
    tvs = random_task_vectors(tiny_vit.cpu(), 1, g, device="cpu")
    import copy

    with pytest.raises(ValueError, match="backend='ext' cannot run.*ATLAS_KERNELS_BUILD_EXT=1"):
        ak.patch(copy.deepcopy(tiny_vit).cpu(), tvs, backend="ext")
    m = ak.patch(copy.deepcopy(tiny_vit).cpu(), tvs)
    assert ak.PatchConfig.of(m).resolved_backend == "torch"


def test_cuda_is_a_deprecated_alias_of_ext():
    with pytest.warns(DeprecationWarning, match="use backend='ext'"):
        assert ops.check_backend("cuda") == "ext"


@needs_ext
@needs_gpu
@pytest.mark.parametrize("storage", STORAGES)
def test_ext_gpu_vit_shapes(storage):
    """The CUDA kernels at a ViT-B/32 MLP shape (vectorised path) and an odd one (scalar tails)."""
    for shape, n, (k, mode) in [((3072, 768), 21, (1, "contiguous")), ((77, 123), 3, (3, "hash"))]:
        theta0 = torch.randn(shape, device="cuda")
        tau, scale = make_slab(n, shape, storage, "cuda")
        part = Partition.for_block("w", k, mode, 1)
        coef = _coef(n, k, "cuda").requires_grad_()
        out = ops.compose(Block(theta0, tau, coef, part, scale), torch.bfloat16, backend="ext")
        t64 = R.dequantize(tau, scale)
        check(out, R.compose(theta0, t64, coef.detach(), part),
              R.compose(theta0, t64, coef.detach(), part, dtype=torch.float32).to(torch.bfloat16),
              R.compose(theta0.abs(), t64.abs(), coef.detach().abs(), part), EPS[torch.bfloat16], "compose")
        g = torch.randn(shape, device="cuda")
        d1 = torch.autograd.grad(out.float(), coef, g)[0]
        again = ops.compose(Block(theta0, tau, coef, part, scale), torch.bfloat16, backend="ext")
        d2 = torch.autograd.grad(again.float(), coef, g)[0]
        assert torch.equal(d1, d2)
        check(d1, R.coef_grad(g, t64, k, part).reshape(coef.shape), None,
              R.coef_grad(g.abs(), t64.abs(), k, part).reshape(coef.shape), 1e-5, "dcoef")


def _ext_on_dev():
    if EXT_MISSING is not None:
        pytest.skip(f"compiled extension not built: {EXT_MISSING}")
    if not ops.get("ext").has_device_kernels(DEV):
        pytest.skip(f"the extension was built without {DEV} kernels")


def _patched_tiny(tiny_vit, n, partitions, mode, backend, **kw):
    import copy

    import atlas_kernels as ak

    g = torch.Generator().manual_seed(0)
    tvs = random_task_vectors(tiny_vit, n, g, device=DEV)
    m = ak.patch(copy.deepcopy(tiny_vit), tvs, partitions=partitions, partition_mode=mode, seed=3, backend=backend,
                 **kw)
    coefs = randomize_coefficients(m, g)
    return m, coefs, tvs, torch.randn(2, 3, 32, 32, generator=g).to(DEV)


@pytest.mark.parametrize("fused", [True, False], ids=["fused-linear", "grouped"])
def test_tiny_vit_ext_backend_matches_float64_reference(tiny_vit, fused):
    """A whole patched tower on the extension against float64, with every linear weight on the fused
    linear (CPU) and with every block in the grouped compose."""
    from atlas_kernels.plan import plan_of

    _ext_on_dev()
    m, coefs, tvs, x = _patched_tiny(tiny_vit, 3, 2, "hash", "ext", fused_linear=fused)
    plan = plan_of(m)
    assert plan.groups and (bool(plan.own) == (fused and DEV == "cpu")), plan.summary()
    out = m(x)
    ref, c64 = float64_reference(tiny_vit, tvs, coefs, x, 2, "hash", 3)
    rel = ((out.double() - ref).norm() / ref.norm()).item()
    assert rel < 1e-5, rel
    w = torch.randn(ref.shape, dtype=torch.float64, device=ref.device)
    (out * w.float()).sum().backward()
    (ref * w).sum().backward()
    for k in coefs:
        rel = ((coefs[k].grad.double() - c64[k].grad).norm() / c64[k].grad.norm()).item()
        assert rel < 1e-4, (k, rel)


@pytest.mark.parametrize("fused", [False, True], ids=["compose-matmul", "fused-linear"])
def test_patched_tower_ext_backend_compiles_fullgraph(tiny_vit, fused):
    """torch.compile(fullgraph=True) of a tower patched with backend="ext" traces the extension's
    ops (C++ Meta kernels, autograd registered from Python) and matches eager; on CPU both with the
    fused linear and with compose + matmul."""
    _ext_on_dev()
    if fused:
        if DEV != "cpu":
            pytest.skip("the fused linear has CPU kernels only")
    m, coefs, _, x = _patched_tiny(tiny_vit, 2, 2, "hash", "ext", fused_linear=fused)
    assert_compiles_like_eager(m, coefs, x)
