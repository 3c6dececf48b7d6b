"""Micro-benchmarks of the library's ops, one block at a time (pytest-benchmark).

    python -m pytest bench/test_micro_ops.py --benchmark-only [--benchmark-json=FILE]

Not part of the CI suite (which collects atlas_kernels_tests/ only). The block is a ViT-B MLP
weight (3072 x 768); N = 8 on CPU, 21 on GPU. Ops, each through ``atlas_kernels.ops`` for the torch
backend (and triton on CUDA):

- ``compose``: ``theta0 + sum_i coef_i tau_i`` written in the compute dtype;
- ``coef_grad``: the coefficient gradients of a composed block from a given ``dL/dW``
  (``dcoef_i = <G, tau_i>``), i.e. compose's backward;
- ``linear``: ``y = x W^T + c`` with composed ``W`` and ``c``, forward and backward (dx and the
  coefficient gradients) at M = 800 rows (batch 16 x 50 tokens).

Each records in ``extra_info`` the bytes it must move at least, the achieved bandwidth
(``achieved_gbps`` = bytes / median time) and its fraction of the measured copy ceiling
(``fraction_of_copy_ceiling``); ``linear`` also records its fraction of the two-pass limit
(two passes over the task vectors at copy bandwidth, docs/PERFORMANCE.md).
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("pytest_benchmark")
ak_ops = pytest.importorskip("atlas_kernels.ops")
from atlas_kernels.blocks import Block  # noqa: E402
from atlas_kernels.partitions import Partition  # noqa: E402
from atlas_kernels.storage import BYTES_PER_ELEMENT  # noqa: E402

from .workload import measure_ceiling  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")
N = 21 if CUDA else 8
OUT_F, IN_F = 3072, 768
M = 16 * 50
BACKENDS = ["torch"] + (["triton"] if CUDA else [])
STORAGES = ["float16", "bfloat16"] if CUDA else ["float32", "float16"]
COMPUTE = torch.bfloat16 if CUDA else torch.float32
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@pytest.fixture(scope="session")
def ceiling():
    return measure_ceiling(DEV)


def _sync():
    if CUDA:
        torch.cuda.synchronize()


def _run(benchmark, fn):
    def call():
        fn()
        _sync()

    fn()  # warm-up (compiles Triton kernels, autotunes)
    _sync()
    benchmark(call)


def _record(benchmark, ceiling, nbytes, extra=None):
    benchmark.extra_info.update(
        device=str(torch.cuda.get_device_name() if CUDA else "cpu"), n_task_vectors=N, shape=[OUT_F, IN_F],
        min_bytes=int(nbytes), copy_gbps=ceiling["copy_gbps"], **(extra or {}),
    )
    stats = getattr(benchmark, "stats", None)
    if stats is None:  # --benchmark-disable
        return
    t = stats.stats.median
    benchmark.extra_info["achieved_gbps"] = nbytes / t / 1e9
    benchmark.extra_info["fraction_of_copy_ceiling"] = nbytes / t / 1e9 / ceiling["copy_gbps"]
    return t


def _block(storage, seed=0):
    g = torch.Generator().manual_seed(seed)
    theta0 = (torch.randn(OUT_F, IN_F, generator=g) * 0.02).to(DEV)
    tau = (torch.randn(N, OUT_F, IN_F, generator=g) * 1e-4).to(DEV, DTYPES[storage])
    return theta0, tau


def _coef(k, **kw):
    return torch.full((N, k) if k > 1 else (N,), 0.1, device=DEV, **kw)


def _per_block(test):
    """compose and coef_grad run over every backend, storage and K = 1, 4."""
    for mark in (pytest.mark.parametrize("backend", BACKENDS), pytest.mark.parametrize("storage", STORAGES),
                 pytest.mark.parametrize("k", [1, 4])):
        test = mark(test)
    return test


@_per_block
def test_compose(benchmark, ceiling, backend, storage, k):
    benchmark.group = f"compose N={N}"
    theta0, tau = _block(storage)
    coef = _coef(k)
    part = Partition(k)
    _run(benchmark, lambda: ak_ops.compose(Block(theta0, tau, coef, part), COMPUTE, backend=backend))
    p = theta0.numel()
    nbytes = N * p * BYTES_PER_ELEMENT[storage] + p * 4 + p * torch.finfo(COMPUTE).bits // 8
    _record(benchmark, ceiling, nbytes, dict(backend=backend, storage=storage, partitions=k))


@_per_block
def test_coef_grad(benchmark, ceiling, backend, storage, k):
    benchmark.group = f"coef_grad N={N}"
    theta0, tau = _block(storage)
    coef = _coef(k, requires_grad=True)
    w = ak_ops.compose(Block(theta0, tau, coef, Partition(k)), COMPUTE, backend=backend)
    grad_w = torch.randn(w.shape, device=DEV, dtype=w.dtype) * 1e-3
    _run(benchmark, lambda: torch.autograd.grad(w, coef, grad_w, retain_graph=True))
    p = theta0.numel()
    nbytes = N * p * BYTES_PER_ELEMENT[storage] + p * grad_w.element_size()
    _record(benchmark, ceiling, nbytes, dict(backend=backend, storage=storage, partitions=k))


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_linear(benchmark, ceiling, backend, storage):
    benchmark.group = f"linear fwd+bwd M={M} N={N}"
    w0, w_tau = _block(storage)
    g = torch.Generator().manual_seed(1)
    b0 = torch.zeros(OUT_F, device=DEV)
    b_tau = (torch.randn(N, OUT_F, generator=g) * 1e-4).to(DEV, DTYPES[storage])
    w_coef = torch.full((N,), 0.1, device=DEV, requires_grad=True)
    b_coef = torch.full((N,), 0.1, device=DEV, requires_grad=True)
    x = torch.randn(M, IN_F, generator=g).to(DEV, COMPUTE).requires_grad_(True)
    dy = (torch.randn(M, OUT_F, generator=g) * 1e-2).to(DEV, COMPUTE)
    part = Partition(1)

    def step():
        y = ak_ops.linear(x, Block(w0, w_tau, w_coef, part), Block(b0, b_tau, b_coef, part), backend=backend)
        torch.autograd.grad(y, (x, w_coef, b_coef), dy)

    _run(benchmark, step)
    p = w0.numel()
    two_pass = 2 * N * p * BYTES_PER_ELEMENT[storage]
    t = _record(benchmark, ceiling, two_pass,
                dict(backend=backend, storage=storage, m=M, matmul_flops=3 * 2 * M * IN_F * OUT_F))
    if t:
        benchmark.extra_info["two_pass_ms"] = two_pass / (ceiling["copy_gbps"] * 1e9) * 1e3
        benchmark.extra_info["fraction_of_two_pass_limit"] = (two_pass / (ceiling["copy_gbps"] * 1e9)) / t
