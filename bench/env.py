"""The run's identity: date, device, versions, commit; where its results go."""
from __future__ import annotations

import datetime
import os
import re
import subprocess
from pathlib import Path
from typing import Optional

import torch

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"


def device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def device_name(dev: torch.device) -> str:
    """The name torch reports (``torch.cuda.get_device_name``), or ``cpu``."""
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return "cpu"


def slug(name: str) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return s or "unknown"


def today() -> str:
    return datetime.date.today().isoformat()


def triton_version() -> Optional[str]:
    try:
        import triton

        return triton.__version__
    except Exception:
        return None


def git_commit() -> Optional[str]:
    """Short commit of this project's repository, with ``-dirty`` when the library's files differ
    from it; None when the project is not a git checkout of its own.

    ``ATLAS_KERNELS_COMMIT`` overrides (the GPU machine receives a copy of the work tree without
    ``.git``: pass the commit in the environment there). A repository that merely encloses the
    project (a copy of the tree inside another checkout) is not asked: its commit is not ours (the
    H200 rows once said ``0.1.0+g<a foreign commit>-dirty``).
    """
    env = os.environ.get("ATLAS_KERNELS_COMMIT")
    if env:
        return env
    try:
        top = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--show-toplevel"],
                             capture_output=True, text=True, timeout=10)
        if top.returncode != 0 or Path(top.stdout.strip()).resolve() != Path(REPO_ROOT).resolve():
            return None
        head = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, timeout=10,
        )
        if head.returncode != 0:
            return None
        commit = head.stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--", "atlas_kernels", "csrc"],
            capture_output=True, text=True, timeout=10,
        )
        if dirty.returncode == 0 and dirty.stdout.strip():
            commit += "-dirty"
        return commit
    except Exception:
        return None


def atlas_kernels_version() -> str:
    """``<version>+g<commit>``, e.g. ``0.1.0+gabc1234``; ``unavailable`` when it does not import."""
    try:
        import atlas_kernels

        ver = getattr(atlas_kernels, "__version__", "unknown")
    except Exception as e:  # the library may not import yet
        ver = f"unavailable ({type(e).__name__})"
    commit = git_commit()
    return f"{ver}+g{commit}" if commit else f"{ver}+unknown-commit"


def run_info(dev: torch.device) -> dict:
    """The leading fields of every row."""
    return {
        "date": today(),
        "device": device_name(dev),
        "torch": torch.__version__,
        "triton": triton_version(),
        "atlas_kernels": atlas_kernels_version(),
    }


def default_output(dev: torch.device) -> Path:
    return RESULTS_DIR / f"{today()}-{slug(device_name(dev))}.jsonl"
