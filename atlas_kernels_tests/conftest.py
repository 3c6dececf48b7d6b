"""Test setup: without a GPU, Triton kernels run in its interpreter (must be set before any kernel
is defined, so before atlas_kernels.kernels is imported)."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def _vtuple(v):
    out = []
    for part in v.split("+")[0].split(".")[:2]:
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits or 0))
    return tuple(out)


def _interpreter_broken():
    """Why Triton's interpreter cannot run here, or None. Triton 3.6's interpreter (and older)
    breaks with numpy 2.3 or newer: ``TypeError: only 0-dimensional arrays can be converted to
    Python scalars`` inside ``triton/runtime/interpreter.py``. Compiled kernels on a GPU are not
    affected; only the CPU tests that run kernels in the interpreter."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return None
    try:
        import numpy
        import triton
    except ImportError:
        return None
    if _vtuple(triton.__version__) <= (3, 6) and _vtuple(numpy.__version__) >= (2, 3):
        return (f"triton {triton.__version__}'s interpreter is broken with numpy {numpy.__version__} "
                "(>= 2.3: 'only 0-dimensional arrays can be converted to Python scalars'); "
                "use numpy < 2.3 or triton >= 3.7 to run the interpreter tests")
    return None


INTERPRETER_BROKEN = _interpreter_broken()


def pytest_report_header(config):
    if INTERPRETER_BROKEN:
        return f"atlas_kernels: Triton interpreter tests will be skipped: {INTERPRETER_BROKEN}"
    return None


def _hits_interpreter_bug(excinfo) -> bool:
    # A TypeError, or triton's InterpreterError wrapping it (TypeError('only 0-dimensional ...'))
    if excinfo is None or "0-dimensional arrays can be converted to Python scalars" not in str(excinfo.value):
        return False
    return any("interpreter" in str(entry.path) and "triton" in str(entry.path) for entry in excinfo.traceback)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Where the interpreter is known broken (see _interpreter_broken), a test that fails with that
    very error, raised inside Triton's interpreter, is reported as skipped with the reason; every
    other failure stays a failure."""
    outcome = yield
    rep = outcome.get_result()
    if INTERPRETER_BROKEN and rep.failed and call.when in ("setup", "call") and _hits_interpreter_bug(call.excinfo):
        rep.outcome = "skipped"
        rep.longrepr = (str(item.path), item.location[1] or 0, f"Skipped: {INTERPRETER_BROKEN}")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """One torch thread for the test: small float64/fp32 models run several times faster on one
    thread than on two of a busy 2-core machine. Modules opt in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny_vit():
    """A tiny open_clip image tower (see _util.make_tiny_vit), on the GPU where there is one."""
    pytest.importorskip("open_clip")
    from ._util import make_tiny_vit

    return make_tiny_vit()


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "slow: whole-model tests")
