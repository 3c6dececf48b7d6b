"""`--help` of every command-line entry point answers without importing torch (it took 25-30 s on
a loaded machine when the package imported everything up front). Checked by what the process
imported, not by timing it."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

_PROBE = """
import runpy, sys
mod = sys.argv[1]
sys.argv = [mod, "--help"]
try:
    runpy.run_module(mod, run_name="__main__", alter_sys=True)
except SystemExit as e:
    assert e.code in (0, None), e.code
heavy = sorted(m for m in ("torch", "numpy", "open_clip", "triton") if m in sys.modules)
assert not heavy, f"--help of {mod} imported {heavy}"
"""


@pytest.mark.parametrize("module", ["atlas_kernels.train", "atlas_kernels.task_vectors", "bench"])
def test_help_imports_no_torch(module):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", _PROBE, module], capture_output=True, text=True, cwd=str(REPO),
                          env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage:" in proc.stdout
