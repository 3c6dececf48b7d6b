"""Test setup: without a GPU, Triton kernels run in its interpreter (must be set before any kernel
is defined, so before atlas_kernels.kernels is imported)."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def tiny_vit():
    """A tiny open_clip image tower (see _util.make_tiny_vit), on the GPU where there is one."""
    pytest.importorskip("open_clip")
    from ._util import make_tiny_vit

    return make_tiny_vit()


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "slow: whole-model tests")
