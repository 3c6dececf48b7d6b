"""The specification itself, and the torch backend's ops against it."""
import numpy as np
import pytest
import torch

from atlas_kernels import ops, reference
from atlas_kernels.blocks import Block
from atlas_kernels.ops import torch_backend
from atlas_kernels.partitions import Partition, mix32, partition_key
from atlas_kernels.task_vectors import quantize

from ._util import assert_close


def _mix32_numpy(x):
    x = np.asarray(x, dtype=np.uint32)
    with np.errstate(over="ignore"):
        x = x ^ (x >> np.uint32(16))
        x = x * np.uint32(0x7FEB352D)
        x = x ^ (x >> np.uint32(15))
        x = x * np.uint32(0x846CA68B)
        x = x ^ (x >> np.uint32(16))
    return x


def test_mix32_matches_uint32_arithmetic():
    x = torch.randint(0, 2**32, (10000,), dtype=torch.int64)
    x[:3] = torch.tensor([0, 1, 2**32 - 1])
    assert mix32(x).tolist() == _mix32_numpy(x.numpy()).astype(np.int64).tolist()


@pytest.mark.parametrize("numel,k", [(10, 3), (123, 4), (5, 5), (7, 1)])
def test_contiguous_partition_is_balanced_and_ordered(numel, k):
    part = Partition(k).index(numel)
    counts = torch.bincount(part, minlength=k)
    assert counts.max() - counts.min() <= 1 and counts.sum() == numel
    assert (part[1:] >= part[:-1]).all()


def test_hash_partition_reproducible_and_depends_on_block_and_seed():
    a = Partition.for_block("x.weight", 4, "hash", 7).index(5000)
    b = Partition.for_block("x.weight", 4, "hash", 7).index(5000)
    c = Partition.for_block("y.weight", 4, "hash", 7).index(5000)
    d = Partition.for_block("x.weight", 4, "hash", 8).index(5000)
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, d)
    counts = torch.bincount(a, minlength=4)
    assert counts.min() > 1100  # roughly uniform
    assert partition_key("x.weight", 7) == partition_key("x.weight", 7)


def test_reference_compose_matches_naive_loop():
    n, shape, k = 3, (5, 7), 2
    theta0 = torch.randn(shape, dtype=torch.float64)
    tau = torch.randn((n, *shape), dtype=torch.float64)
    coef = torch.randn(n, k, dtype=torch.float64)
    part = Partition.for_block("b", k, "hash", 1)
    idx = part.index(theta0.numel()).reshape(shape)
    expect = theta0.clone()
    for i in range(n):
        for r in range(shape[0]):
            for c in range(shape[1]):
                expect[r, c] += coef[i, idx[r, c]] * tau[i, r, c]
    assert torch.allclose(reference.compose(theta0, tau, coef, part), expect)
    # and the gradient is the derivative of the composition
    g = torch.randn(shape, dtype=torch.float64)
    c2 = coef.clone().requires_grad_(True)
    (reference.compose(theta0, tau, c2, part) * g).sum().backward()
    assert torch.allclose(reference.coef_grad(g, tau, k, part), c2.grad)


def _case(shape, n, k, mode, storage, seed=0):
    theta0 = torch.randn(shape)
    tau64 = torch.randn((n, *shape), dtype=torch.float64) * 0.1
    if storage in ("int8", "float8_e4m3fn"):
        qs = [quantize(tau64[i].float(), storage) for i in range(n)]
        tau = torch.stack([q for q, _ in qs])
        scale = torch.stack([s for _, s in qs])
    else:
        tau, scale = tau64.to(getattr(torch, storage)), None
    coef = torch.randn(n, k) if k > 1 else torch.randn(n)
    return theta0, tau, scale, coef, Partition.for_block("blk", k, mode, seed)


@pytest.mark.parametrize("shape", [(77, 123), (31,), (4, 3, 5, 5)])
@pytest.mark.parametrize("n,k,mode",
                         [(1, 1, "contiguous"), (3, 3, "contiguous"), (21, 1, "contiguous"), (3, 4, "hash")])
@pytest.mark.parametrize("storage", ["float32", "bfloat16", "int8"])
def test_torch_compose_and_grad_match_reference(shape, n, k, mode, storage, monkeypatch):
    # Small chunks so the chunked widening path runs over several chunks.
    monkeypatch.setattr(torch_backend, "_CHUNK_ELEMS", 2048)
    monkeypatch.setattr(torch_backend, "_CHUNK_ELEMS_CPU", 2048)
    theta0, tau, scale, coef, part = _case(shape, n, k, mode, storage)
    ref = reference.compose(theta0, tau, coef, part, scale)
    c = coef.clone().requires_grad_(True)
    out = torch_backend.BACKEND.compose(Block(theta0, tau, c, part, scale), torch.float32)
    assert out.dtype == torch.float32
    assert_close(out, ref, rtol=1e-5, atol=1e-5, what="compose")
    g = torch.randn(shape)
    (out * g).sum().backward()
    ref_g = reference.coef_grad(g, tau, k, part, scale).reshape(coef.shape)
    assert_close(c.grad, ref_g, rtol=1e-4, atol=1e-4 * ref_g.abs().max().item(), what="dcoef")


@pytest.mark.parametrize("k,mode", [(1, "contiguous"), (3, "hash")])
def test_torch_linear_matches_reference(k, mode):
    n, o, i, m = 3, 77, 123, 9
    w0, w_tau = torch.randn(o, i), torch.randn(n, o, i) * 0.1
    b0, b_tau = torch.randn(o), torch.randn(n, o) * 0.1
    shape = (n, k) if k > 1 else (n,)
    wc = torch.randn(shape, requires_grad=True)
    bc = torch.randn(shape, requires_grad=True)
    wp, bp = Partition.for_block("w", k, mode, 3), Partition.for_block("b", k, mode, 3)
    x = torch.randn(2, m, i, requires_grad=True)
    y = ops.linear(x, Block(w0, w_tau, wc, wp), Block(b0, b_tau, bc, bp), backend="torch")
    ref = reference.linear(x.double(), w0, w_tau, wc.detach(), b0, b_tau, bc.detach(), wp, bp)
    assert_close(y, ref, rtol=1e-4, atol=1e-4, what="y")
    dy = torch.randn_like(y)
    y.backward(dy)
    gw, gb = reference.linear_coef_grads(x.detach(), dy, w_tau, k, wp, b_tau, k, bp)
    assert_close(wc.grad, gw.reshape(shape), rtol=1e-4, atol=1e-3, what="dcoef_W")
    assert_close(bc.grad, gb.reshape(shape), rtol=1e-4, atol=1e-4, what="dcoef_b")
    w = reference.compose(w0, w_tau, wc.detach(), wp)
    assert_close(x.grad, dy.double() @ w, rtol=1e-4, atol=1e-4, what="dx")


def test_torch_compose_under_autocast_keeps_coefficients_in_fp32():
    # bf16 autocast: the block comes out in bf16, but the math is fp32 (no bf16-rounded coefficients).
    theta0, tau, _, coef, part = _case((64, 64), 4, 1, "contiguous", "float32")
    coef = coef + 1.0001  # a value that bf16 would round
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = torch_backend.BACKEND.compose(Block(theta0, tau, coef, part), torch.bfloat16)
    ref = reference.compose(theta0, tau, coef, part)
    assert out.dtype == torch.bfloat16
    assert_close(out, ref, rtol=2 ** -8, atol=1e-2, what="bf16 compose")
