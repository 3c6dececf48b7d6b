"""The GPU window's script (.ci/gpu.sh) rehearsed on a CPU: ``GPU_REHEARSAL=1`` runs every stage with
tiny shapes and the torch backend. Checks that each stage ran to its end and wrote what the GPU run
would (test logs, headline and limited-VRAM rows with step and first-step times),
so the one real call cannot die on a typo. On a GPU machine the script itself is the check."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("tests_gpu_only", "tests_real_shapes", "kernels", "headline", "limited")


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: run .ci/gpu.sh itself")
def test_gpu_script_rehearsal(tmp_path):
    pytest.importorskip("open_clip")
    env = dict(os.environ, GPU_REHEARSAL="1", OUT=str(tmp_path),
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    env.pop("TRITON_INTERPRET", None)  # as a fresh shell would have it
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")  # `python` in the script is this one
    proc = subprocess.run(["bash", str(ROOT / ".ci" / "gpu.sh")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    log = (tmp_path / "stages.log").read_text() if (tmp_path / "stages.log").exists() else ""
    assert proc.returncode == 0, f"gpu.sh exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert "rehearsal=1" in log, log
    for stage in STAGES:
        assert f"end {stage} rc=0" in log, f"stage {stage} did not end cleanly:\n{log}"
        assert (tmp_path / f"{stage}.log").exists(), stage
    assert "all stages done" in log
    res = tmp_path / "results"
    assert "no GPU" in (tmp_path / "kernels.log").read_text()
    rows = [json.loads(line) for line in (res / "headline.jsonl").read_text().splitlines() if line.strip()]
    methods = {r.get("method") for r in rows if not r.get("error")}
    assert {"ceiling", "floor", "naive", "merge_once", "atlas"} <= methods, methods
    for r in rows:
        if r.get("method") != "ceiling":
            assert r.get("step_ms", 0) > 0 and r.get("first_step_ms", 0) > 0, r
    limited = [json.loads(line) for line in (res / "limited.jsonl").read_text().splitlines() if line.strip()]
    assert any(r.get("method") == "atlas" and r.get("storage") == "int8" and r.get("step_ms", 0) > 0
               for r in limited), limited
