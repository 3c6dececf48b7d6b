"""Runs one job in this (fresh) process and prints its measurements as one JSON line.

Used on the CPU, where peak memory is the peak RSS of a process: one process per job keeps every
peak honest. ``python -m bench.worker '{"job": {...}, "settings": {...}}'``
"""
from __future__ import annotations

import json
import sys

MARKER = "@@BENCH_RESULT@@ "


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spec = json.loads(argv[0])
    import torch

    from .grid import Job
    from .workload import Session, Settings

    dev = torch.device(spec.get("device", "cpu"))
    session = Session(dev, Settings(**spec["settings"]), cache_models=False)
    res = session.run(Job(**spec["job"]))
    sys.stdout.write(MARKER + json.dumps(res) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
