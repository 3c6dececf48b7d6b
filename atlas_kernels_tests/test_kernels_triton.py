"""Triton launchers (atlas_kernels.kernels) against the float64 specification (atlas_kernels.reference).

On a machine without a GPU the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1)
at small odd shapes; the real-shape tests at the end need CUDA and skip without it.

Tolerance (flash-attention's rule, made elementwise-safe): with ``ref64`` the float64 reference,
``ref_low`` the same computation in the kernel's precisions (fp32 accumulation, rounding to the
storage / compute dtype where the kernel rounds), and ``ref_abs`` the reference on absolute values
(the natural scale of rounding errors),

    |out - ref64| <= 2 * |ref_low - ref64| + rtol * ref_abs

where ``rtol`` is the unit roundoff of the lowest precision involved (fp32 accumulation: ``ACC_RTOL``).
"""
from __future__ import annotations

import pytest
import torch

from atlas_kernels import kernels
from atlas_kernels import reference as R
from atlas_kernels.kernels import _common
from atlas_kernels.partitions import Partition

from ._util import assert_close

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
needs_gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (kernels at real shapes)")

ACC_RTOL = 1e-6  # fp32 accumulation: relative to the sum of |terms| (about 16 ulps)
EPS = {torch.float32: ACC_RTOL, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}
F8 = getattr(torch, "float8_e4m3fn", None)


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    """Scratch buffers (partials) start as NaN: an element a kernel forgets poisons the result."""
    monkeypatch.setattr(_common, "POISON_SCRATCH", True)
    yield


def nan_like(shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype, device=DEV)


def make_tau(n, shape, storage):
    """(tau, scale): a slab in the storage dtype; int8 / fp8 come with a per-row fp32 scale."""
    if storage == torch.int8:
        tau = torch.randint(-127, 128, (n, *shape), dtype=torch.int8)
    elif storage == F8:
        tau = (torch.randn(n, *shape) * 8).to(F8)
    else:
        return (torch.randn(n, *shape) * 0.5).to(storage).to(DEV), None
    rows = shape[0] if len(shape) >= 2 else 1
    scale = torch.rand(n, rows) * 0.02 + 0.001
    return tau.to(DEV), scale.to(DEV)


def make_part(k, mode, name="blk", seed=3):
    return Partition.for_block(name, k, mode, seed)


PARTS = [(1, "contiguous"), (3, "contiguous"), (3, "hash")]
PART_IDS = ["k1", "k3-contig", "k3-hash"]


# ------------------------------------------------------------------------------------------------
# partition index
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("numel", [1, 7, 1000, 4097])
@pytest.mark.parametrize("k,mode,key", [(2, "contiguous", 0), (3, "contiguous", 0), (5, "hash", 0),
                                        (3, "hash", 12345), (4, "hash", 2**31 + 11), (7, "hash", 2**32 - 1),
                                        (3, "hash", 1)])
def test_partition_index_matches(numel, k, mode, key):
    """compose with theta0 = 0, tau_0 = 1, coef[0, j] = j writes part(e): bit-exact to Partition.index."""
    p = Partition(k, mode, key)
    theta0 = torch.zeros(numel, device=DEV)
    tau = torch.ones(1, numel, device=DEV)
    coef = torch.arange(k, dtype=torch.float32, device=DEV)[None]
    out = kernels.compose(theta0, tau, coef, p, out=nan_like((numel,), torch.float32))
    ref = p.index(numel).to(torch.float32)
    mism = torch.nonzero(out.cpu() != ref)
    assert mism.numel() == 0, (f"part index differs at e={int(mism[0])}: "
                               f"kernel {out[int(mism[0])]} ref {ref[int(mism[0])]}")


# ------------------------------------------------------------------------------------------------
# compose
# ------------------------------------------------------------------------------------------------
def _check_compose(theta0, tau, coef, p, scale, out_dtype):
    out = kernels.compose(theta0, tau, coef, p, scale=scale, out_dtype=out_dtype, out=nan_like(theta0.shape, out_dtype))
    ref64 = R.compose(theta0, tau, coef, p, scale=scale)
    ref_low = R.compose(theta0, tau, coef, p, scale=scale, dtype=torch.float32).to(out_dtype)
    tau_abs = R.dequantize(tau, scale).abs()
    ref_abs = R.compose(theta0.abs(), tau_abs, coef.abs(), p)
    assert out.dtype == out_dtype
    assert_close(out, ref64, ref_low, ref_abs, rtol=ACC_RTOL, name="compose")


@pytest.mark.parametrize("shape", [(77, 123), (301,), (4, 3, 5, 7)], ids=["2d", "1d", "4d"])
@pytest.mark.parametrize("n", [1, 3, 21])
@pytest.mark.parametrize("k,mode", PARTS, ids=PART_IDS)
def test_compose_partitions(shape, n, k, mode):
    theta0 = torch.randn(shape, device=DEV)
    tau, _ = make_tau(n, shape, torch.float32)
    coef = torch.randn(n, k, device=DEV)
    _check_compose(theta0, tau, coef, make_part(k, mode), None, torch.float32)


@pytest.mark.parametrize("storage", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_compose_dtypes(storage, out_dtype):
    shape = (77, 123)
    theta0 = torch.randn(shape, device=DEV).to(out_dtype)
    tau, _ = make_tau(3, shape, storage)
    coef = torch.randn(3, 3, device=DEV)
    _check_compose(theta0, tau, coef, make_part(3, "hash"), None, out_dtype)


@pytest.mark.parametrize("storage", [torch.int8, F8], ids=["int8", "fp8e4m3"])
@pytest.mark.parametrize("shape", [(77, 123), (301,), (4, 3, 5, 7)], ids=["2d", "1d", "4d"])
@pytest.mark.parametrize("k,mode", PARTS[:2], ids=PART_IDS[:2])
def test_compose_scaled(storage, shape, k, mode):
    if storage is None:
        pytest.skip("this torch has no float8_e4m3fn")
    theta0 = torch.randn(shape, device=DEV)
    tau, scale = make_tau(3, shape, storage)
    coef = torch.randn(3, k, device=DEV)
    _check_compose(theta0, tau, coef, make_part(k, mode), scale, torch.bfloat16)


def test_compose_coef_vector_and_default_dtype():
    theta0 = torch.randn(5, 9, device=DEV, dtype=torch.float16)
    tau, _ = make_tau(4, (5, 9), torch.float16)
    coef = torch.randn(4, device=DEV)
    out = kernels.compose(theta0, tau, coef)
    assert out.dtype == torch.float16 and out.shape == theta0.shape
    assert_close(out, R.compose(theta0, tau, coef), R.compose(theta0, tau, coef, dtype=torch.float32).half(),
                 R.compose(theta0.abs(), tau.abs(), coef.abs()), name="compose [N] coef")


# ------------------------------------------------------------------------------------------------
# coef_grad
# ------------------------------------------------------------------------------------------------
def _check_coef_grad(grad, tau, k, p, scale):
    out1 = kernels.coef_grad(grad, tau, k, p, scale=scale)
    out2 = kernels.coef_grad(grad, tau, k, p, scale=scale)
    assert out1.dtype == torch.float32 and out1.shape == (tau.shape[0], k)
    ref64 = R.coef_grad(grad, tau, k, p, scale=scale)
    ref_abs = R.coef_grad(grad.abs(), R.dequantize(tau, scale).abs(), k, p)
    assert_close(out1, ref64, None, ref_abs, rtol=ACC_RTOL, name="coef_grad")
    assert torch.equal(out1, out2), "coef_grad is not bitwise reproducible"


@pytest.mark.parametrize("shape", [(77, 123), (301,), (4, 3, 5, 7)], ids=["2d", "1d", "4d"])
@pytest.mark.parametrize("n", [1, 3, 21])
@pytest.mark.parametrize("k,mode", PARTS, ids=PART_IDS)
def test_coef_grad_partitions(shape, n, k, mode):
    grad = torch.randn(shape, device=DEV)
    tau, _ = make_tau(n, shape, torch.float32)
    _check_coef_grad(grad, tau, k, make_part(k, mode), None)


@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("gdtype", [torch.float32, torch.bfloat16, torch.float16])
def test_coef_grad_dtypes(storage, gdtype):
    shape = (77, 123)
    grad = torch.randn(shape, device=DEV).to(gdtype)
    tau, _ = make_tau(3, shape, storage)
    _check_coef_grad(grad, tau, 3, make_part(3, "hash"), None)


@pytest.mark.parametrize("storage", [torch.int8, F8], ids=["int8", "fp8e4m3"])
@pytest.mark.parametrize("shape", [(77, 123), (301,), (4, 3, 5, 7)], ids=["2d", "1d", "4d"])
@pytest.mark.parametrize("k,mode", [PARTS[0], PARTS[2]], ids=[PART_IDS[0], PART_IDS[2]])
def test_coef_grad_scaled(storage, shape, k, mode):
    if storage is None:
        pytest.skip("this torch has no float8_e4m3fn")
    grad = torch.randn(shape, device=DEV)
    tau, scale = make_tau(3, shape, storage)
    _check_coef_grad(grad, tau, k, make_part(k, mode), scale)


def test_coef_grad_many_programs_deterministic():
    """More than one program (numel > COEF_GRAD_BLOCK) and a fixed-order reduction."""
    from atlas_kernels.kernels._coef_grad import COEF_GRAD_BLOCK

    numel = 3 * COEF_GRAD_BLOCK + 17
    grad = torch.randn(numel, device=DEV)
    tau, _ = make_tau(2, (numel,), torch.float32)
    _check_coef_grad(grad, tau, 3, make_part(3, "contiguous"), None)


# ------------------------------------------------------------------------------------------------
# fused linear (forward) and fused dx
# ------------------------------------------------------------------------------------------------
def _abs_w(w0, tau, coef, p, scale):
    return R.compose(w0.abs(), R.dequantize(tau, scale).abs(), coef.abs(), p)


def _check_fused_linear(m, o, i, n, k, mode, cdtype, storage, bias, scaled=False, split_k=None, strided=False):
    p = make_part(k, mode)
    xs = torch.randn(m, 2 * i if strided else i, device=DEV).to(cdtype)
    x = xs[:, ::2] if strided else xs
    w0 = torch.randn(o, i, device=DEV) * 0.1
    tau, scale = make_tau(n, (o, i), torch.int8 if scaled else storage)
    if scaled:
        scale = scale * 0.1
    else:
        tau = (tau.float() * 0.1).to(storage)
    coef = torch.randn(n, k, device=DEV)
    b = (torch.randn(o, device=DEV)).to(cdtype) if bias else None
    y = kernels.fused_linear(x, w0, tau, coef, p, bias=b, w_scale=scale, out=nan_like((m, o), cdtype), split_k=split_k)
    assert y.dtype == cdtype
    w64 = R.compose(w0, tau, coef, p, scale=scale)
    w_low = R.compose(w0, tau, coef, p, scale=scale, dtype=torch.float32).to(cdtype).double()
    b64 = None if b is None else b.double()
    ref64 = torch.nn.functional.linear(x.double(), w64, b64)
    ref_low = torch.nn.functional.linear(x.double(), w_low, b64).to(cdtype)
    ref_abs = torch.nn.functional.linear(x.double().abs(), _abs_w(w0, tau, coef, p, scale),
                                         None if b is None else b64.abs())
    assert_close(y, ref64, ref_low, ref_abs, rtol=EPS[cdtype], name="fused_linear")

    dy = torch.randn(m, o, device=DEV).to(cdtype)
    dx = kernels.fused_linear_dx(dy, w0, tau, coef, p, w_scale=scale, out=nan_like((m, i), cdtype), split_k=split_k)
    assert dx.dtype == cdtype
    ref64 = dy.double() @ w64
    ref_low = (dy.double() @ w_low).to(cdtype)
    ref_abs = dy.double().abs() @ _abs_w(w0, tau, coef, p, scale)
    assert_close(dx, ref64, ref_low, ref_abs, rtol=EPS[cdtype], name="fused_linear_dx")


@pytest.mark.parametrize("n", [1, 3, 21])
@pytest.mark.parametrize("k,mode", PARTS, ids=PART_IDS)
def test_fused_linear_partitions(n, k, mode):
    _check_fused_linear(9, 77, 123, n, k, mode, torch.float32, torch.float32, bias=True)


@pytest.mark.parametrize("cdtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("storage", [torch.float32, torch.bfloat16, torch.float16])
def test_fused_linear_dtypes(cdtype, storage):
    _check_fused_linear(9, 77, 123, 3, 3, "hash", cdtype, storage, bias=cdtype != torch.float16)


@pytest.mark.parametrize("m", [1, 70])
def test_fused_linear_scaled_int8(m):
    _check_fused_linear(m, 77, 123, 3, 3, "contiguous", torch.bfloat16, None, bias=False, scaled=True)


@pytest.mark.parametrize("split_k", [2, 3])
def test_fused_linear_split_k(split_k):
    """Split over the reduction dim (fp32 partials summed in order); the chunks are uneven."""
    _check_fused_linear(9, 300, 300, 3, 3, "hash", torch.float16, torch.bfloat16, bias=True, split_k=split_k)


def test_fused_linear_strided_x():
    _check_fused_linear(9, 77, 123, 3, 1, "contiguous", torch.float32, torch.float32, bias=True, strided=True)


# ------------------------------------------------------------------------------------------------
# linear coefficient gradient (G = dy^T x never stored)
# ------------------------------------------------------------------------------------------------
def _check_lcg(m, o, i, n, k, mode, cdtype, storage, scaled=False, strided=False):
    p = make_part(k, mode)
    xs = torch.randn(m, 2 * i if strided else i, device=DEV).to(cdtype)
    x = xs[:, ::2] if strided else xs
    dy = torch.randn(m, o, device=DEV).to(cdtype)
    tau, scale = make_tau(n, (o, i), torch.int8 if scaled else storage)
    g1 = kernels.linear_coef_grad(x, dy, tau, k, p, w_scale=scale)
    g2 = kernels.linear_coef_grad(x, dy, tau, k, p, w_scale=scale)
    assert g1.dtype == torch.float32 and g1.shape == (n, k)
    t64 = R.dequantize(tau, scale)
    ref64, _ = R.linear_coef_grads(x, dy, t64, k, p)
    g_abs = dy.double().abs().t() @ x.double().abs()
    ref_abs = R.coef_grad(g_abs, t64.abs(), k, p)
    assert_close(g1, ref64, None, ref_abs, rtol=ACC_RTOL, name="linear_coef_grad")
    assert torch.equal(g1, g2), "linear_coef_grad is not bitwise reproducible"


@pytest.mark.parametrize("m", [1, 9, 130])
@pytest.mark.parametrize("n", [1, 3, 21])
@pytest.mark.parametrize("k,mode", PARTS, ids=PART_IDS)
def test_linear_coef_grad_partitions(m, n, k, mode):
    _check_lcg(m, 77, 123, n, k, mode, torch.float32, torch.float32)


@pytest.mark.parametrize("cdtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("storage", [torch.float32, torch.bfloat16, torch.float16])
def test_linear_coef_grad_dtypes(cdtype, storage):
    _check_lcg(9, 77, 123, 3, 3, "hash", cdtype, storage)


@pytest.mark.parametrize("k,mode", [PARTS[0], PARTS[2]], ids=[PART_IDS[0], PART_IDS[2]])
def test_linear_coef_grad_scaled_int8(k, mode):
    _check_lcg(9, 77, 123, 3, k, mode, torch.bfloat16, None, scaled=True)


def test_linear_coef_grad_strided():
    _check_lcg(9, 77, 123, 3, 3, "contiguous", torch.float32, torch.float32, strided=True)


# ------------------------------------------------------------------------------------------------
# every block of a group: compose_group / coef_grad_group, from a table of the blocks' addresses
# ------------------------------------------------------------------------------------------------
GROUP_SHAPES = [(7,), (33,), (5, 13), (50, 3), (0,), (130,), (2, 3, 4)]


def _group_parts():
    return [Partition(1), make_part(3, "hash", "a"), Partition(2, "contiguous"), make_part(4, "hash", "b"),
            Partition(1), Partition(3, "contiguous"), Partition(1)]


def _group_segments(n, storage, ragged=True, k1=False):
    """One segment per shape: both output classes, a ragged block (slabs 0 and 2 of N held); with
    ``k1`` every block has K = 1 (the kernels' scalar-coefficient path)."""
    segs, out_off = [], [0, 0]
    coef_off = 0
    parts = [Partition(1)] * len(GROUP_SHAPES) if k1 else _group_parts()
    for j, (shape, p) in enumerate(zip(GROUP_SHAPES, parts)):
        held = torch.tensor([0, 2], device=DEV) if (ragged and n > 2 and j == 3) else torch.arange(n, device=DEV)
        tau, scale = make_tau(len(held), shape, storage)
        if storage == torch.int8:
            r = shape[0] if len(shape) >= 2 else 1
            scale = torch.rand(len(held), r, device=DEV) * 0.02 + 1e-3
        coef = torch.randn(n, p.k, device=DEV) if p.k > 1 else torch.randn(n, device=DEV)
        k, code, key = p.encoding()
        sel = j % 2
        theta0 = torch.randn(shape, device=DEV)
        segs.append(dict(theta0=theta0, tau=tau, scale=scale, coef=coef, index=held, k=k, mode=code, key=key,
                         sel=sel, out_off=out_off[sel], coef_off=coef_off, part=p))
        out_off[sel] += theta0.numel()
        coef_off += coef.numel()
    return segs, out_off, coef_off


@pytest.mark.parametrize("storage", [torch.float32, torch.bfloat16, torch.int8], ids=["fp32", "bf16", "int8"])
@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("k1", [False, True], ids=["k-mixed", "k1"])
def test_group_kernels(storage, n, k1):
    from atlas_kernels.kernels import coef_grad_group, compose_group, group_table

    segs, sizes, coef_total = _group_segments(n, storage, k1=k1)
    launch = group_table(segs, DEV, block=64)
    scaled = storage == torch.int8
    outs = [nan_like((sizes[0],), torch.bfloat16), nan_like((sizes[1],), torch.float32)]
    compose_group(launch, outs, scaled)
    grads = [torch.randn(sizes[0], device=DEV).bfloat16(), torch.randn(sizes[1], device=DEV)]
    g1 = coef_grad_group(launch, grads, scaled)
    g2 = coef_grad_group(launch, grads, scaled)
    assert g1.shape == (coef_total,)
    for j, s in enumerate(segs):
        p, shape, held = s["part"], s["theta0"].shape, s["index"]
        numel = s["theta0"].numel()
        out = outs[s["sel"]][s["out_off"]:s["out_off"] + numel].view(shape)
        c = s["coef"].reshape(n, p.k).index_select(0, held)
        if numel:
            ref64 = R.compose(s["theta0"], s["tau"], c, p, scale=s["scale"])
            ref_low = R.compose(s["theta0"], s["tau"], c, p, scale=s["scale"], dtype=torch.float32).to(out.dtype)
            ref_abs = R.compose(s["theta0"].abs(), R.dequantize(s["tau"], s["scale"]).abs(), c.abs(), p)
            assert_close(out, ref64, ref_low, ref_abs, name=f"compose_group block {j} {tuple(shape)}")
        g = grads[s["sel"]][s["out_off"]:s["out_off"] + numel].view(shape).float()
        got = g1[s["coef_off"]:s["coef_off"] + s["coef"].numel()].view(n, p.k)
        gref = torch.zeros(n, p.k, dtype=torch.float64, device=DEV)
        gabs = torch.zeros_like(gref)
        if numel:
            gref[held] = R.coef_grad(g, s["tau"], p.k, p, scale=s["scale"])
            gabs[held] = R.coef_grad(g.abs(), R.dequantize(s["tau"], s["scale"]).abs(), p.k, p)
        assert_close(got, gref, None, gabs, name=f"coef_grad_group block {j} {tuple(shape)}")
    assert torch.equal(g1, g2), "coef_grad_group is not bitwise reproducible"


def test_group_table_layout():
    from atlas_kernels.kernels import group_table
    from atlas_kernels.kernels._group import GROUP_COLUMNS

    segs, _, coef_total = _group_segments(3, torch.float32)
    launch = group_table(segs, DEV, block=64)
    t = launch.table.cpu()
    col = {name: i for i, name in enumerate(GROUP_COLUMNS)}
    assert launch.table.dtype == torch.int64 and launch.tile_map.dtype == torch.int32
    assert t[:, col["numel"]].tolist() == [s["theta0"].numel() for s in segs]
    assert t[:, col["ntiles"]].tolist() == [-(-s["theta0"].numel() // 64) for s in segs]
    assert t[3, col["held"]] == 2 and t[0, col["held"]] == 3  # the ragged block holds 2 of N = 3
    assert launch.tile_map.numel() == int(t[:, col["ntiles"]].sum()) and launch.coef_total == coef_total
    assert t[:, col["theta0"]].tolist() == [s["theta0"].data_ptr() for s in segs]  # the blocks' own tensors


# ------------------------------------------------------------------------------------------------
# GPU: real shapes (skipped without CUDA)
# ------------------------------------------------------------------------------------------------
REAL = [(768, 3072, 21), (3072, 768, 21), (1024, 4096, 21)]
REAL_IDS = ["vitb32-fc", "vitb32-proj", "vitl14-fc"]


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("o,i,n", REAL, ids=REAL_IDS)
@pytest.mark.parametrize("k,mode", [PARTS[0], PARTS[2]], ids=[PART_IDS[0], PART_IDS[2]])
def test_gpu_real_shapes(o, i, n, k, mode):
    torch.backends.cuda.matmul.allow_tf32 = False
    p = make_part(k, mode)
    w0 = torch.randn(o, i, device=DEV) * 0.02
    tau = (torch.randn(n, o, i, device=DEV) * 0.002).to(torch.bfloat16)
    coef = torch.randn(n, k, device=DEV) * 0.3
    _check_compose(w0, tau, coef, p, None, torch.bfloat16)
    _check_coef_grad(torch.randn(o, i, device=DEV), tau, k, p, None)
    for m in (16, 48):
        x = torch.randn(m, i, device=DEV).to(torch.bfloat16)
        y = kernels.fused_linear(x, w0, tau, coef, p)
        w64 = R.compose(w0, tau, coef, p)
        w_low = kernels.compose(w0, tau, coef, p, out_dtype=torch.bfloat16).double()
        assert_close(y, x.double() @ w64.t(), (x.double() @ w_low.t()).to(torch.bfloat16),
                     x.double().abs() @ _abs_w(w0, tau, coef, p, None).t(), rtol=EPS[torch.bfloat16],
                     name="gpu fused_linear")
        dy = torch.randn(m, o, device=DEV).to(torch.bfloat16)
        dx = kernels.fused_linear_dx(dy, w0, tau, coef, p)
        assert_close(dx, dy.double() @ w64, (dy.double() @ w_low).to(torch.bfloat16),
                     dy.double().abs() @ _abs_w(w0, tau, coef, p, None), rtol=EPS[torch.bfloat16],
                     name="gpu fused_linear_dx")
    for m in (16, 1600):
        x = torch.randn(m, i, device=DEV).to(torch.bfloat16)
        dy = torch.randn(m, o, device=DEV).to(torch.bfloat16)
        g1 = kernels.linear_coef_grad(x, dy, tau, k, p)
        assert torch.equal(g1, kernels.linear_coef_grad(x, dy, tau, k, p))
        ref64, _ = R.linear_coef_grads(x, dy, tau, k, p)
        ref_abs = R.coef_grad(dy.double().abs().t() @ x.double().abs(), tau.abs(), k, p)
        assert_close(g1, ref64, None, ref_abs, rtol=ACC_RTOL, name="gpu linear_coef_grad")


@needs_gpu
@pytest.mark.gpu
def test_gpu_int64_offsets():
    """N * numel > 2**31: only the last slab is non-zero, so a wrapped offset shows at once."""
    n, o, i = 520, 2048, 2048
    assert n * o * i > 2**31
    tau = torch.zeros(n, o, i, dtype=torch.int8, device=DEV)
    tau[-1] = torch.randint(-127, 128, (o, i), dtype=torch.int8, device=DEV)
    scale = torch.full((n, o), 0.01, device=DEV)
    coef = torch.randn(n, 1, device=DEV)
    theta0 = torch.randn(o, i, device=DEV)
    out = kernels.compose(theta0, tau, coef, scale=scale, out=nan_like((o, i), torch.float32))
    ref = theta0.double() + coef[-1, 0].double() * tau[-1].double() * 0.01
    assert_close(out, ref, None, ref.abs() + 1, rtol=1e-6, name="compose int64 offsets")
    g = kernels.coef_grad(torch.ones(o, i, device=DEV), tau, 1, scale=scale)
    assert torch.all(g[:-1] == 0)
    assert_close(g[-1:], (tau[-1].double() * 0.01).sum().reshape(1, 1), None,
                 (tau[-1].double().abs() * 0.01).sum().reshape(1, 1), name="coef_grad int64 offsets")


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("storage", [torch.float16, torch.int8], ids=["fp16", "int8"])
def test_gpu_group_kernels_real_shapes(storage):
    """compose_group / coef_grad_group at ViT-B/32 block shapes, N = 21, against float64: an MLP and
    an attention matrix, a LayerNorm weight, the patch convolution (hash K = 4), both output classes."""
    from atlas_kernels.kernels import coef_grad_group, compose_group, group_table

    n = 21
    shapes = [(3072, 768), (2304, 768), (768,), (768, 3, 32, 32)]
    parts = [Partition(1), Partition(1), Partition(1), make_part(4, "hash", "conv1")]
    segs, sizes, coef_off = [], [0, 0], 0
    for j, (shape, p) in enumerate(zip(shapes, parts)):
        tau, scale = make_tau(n, shape, storage)
        if storage == torch.float16:
            tau = (tau.float() * 0.01).half()
        coef = torch.randn(n, p.k, device=DEV) * 0.3
        sel = 0 if j < 2 else 1
        k, code, key = p.encoding()
        segs.append(dict(theta0=torch.randn(shape, device=DEV) * 0.02, tau=tau, scale=scale, coef=coef,
                         index=torch.arange(n, device=DEV), k=k, mode=code, key=key, sel=sel, out_off=sizes[sel],
                         coef_off=coef_off, part=p))
        sizes[sel] += int(torch.Size(shape).numel())
        coef_off += coef.numel()
    launch = group_table(segs, DEV)
    outs = [nan_like((sizes[0],), torch.bfloat16), nan_like((sizes[1],), torch.float32)]
    compose_group(launch, outs, storage == torch.int8)
    grads = [torch.randn(sizes[0], device=DEV).bfloat16(), torch.randn(sizes[1], device=DEV)]
    g = coef_grad_group(launch, grads, storage == torch.int8)
    for j, s in enumerate(segs):
        p, shape = s["part"], s["theta0"].shape
        numel = s["theta0"].numel()
        out = outs[s["sel"]][s["out_off"]:s["out_off"] + numel].view(shape)
        ref64 = R.compose(s["theta0"], s["tau"], s["coef"], p, scale=s["scale"])
        ref_low = R.compose(s["theta0"], s["tau"], s["coef"], p, scale=s["scale"], dtype=torch.float32).to(out.dtype)
        ref_abs = R.compose(s["theta0"].abs(), R.dequantize(s["tau"], s["scale"]).abs(), s["coef"].abs(), p)
        assert_close(out, ref64, ref_low, ref_abs, name=f"compose_group {tuple(shape)}")
        gr = grads[s["sel"]][s["out_off"]:s["out_off"] + numel].view(shape).float()
        got = g[s["coef_off"]:s["coef_off"] + s["coef"].numel()].view(n, p.k)
        assert_close(got, R.coef_grad(gr, s["tau"], p.k, p, scale=s["scale"]), None,
                     R.coef_grad(gr.abs(), R.dequantize(s["tau"], s["scale"]).abs(), p.k, p),
                     name=f"coef_grad_group {tuple(shape)}")
