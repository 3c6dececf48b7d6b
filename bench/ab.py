"""``python -m bench.ab [--base REV] [--new REV] [--repeats R] -- BENCH ARGS``: step time of one
commit against another, measured in the same run.

Both sides run the same ``python -m bench BENCH ARGS`` (each in its own process, on its own copy of
the code: ``--base`` extracted with ``git archive`` into a temporary folder; ``--new`` likewise, or,
by default, this work tree as it stands), interleaved: round 1 runs base then new, round 2 new then
base, and so on, so that a machine that slows down or speeds up during the run loads both sides
alike. For every job the two sides measured, each round gives one ratio ``new step_ms / base
step_ms`` (``step_ms`` is the median of the timed steps inside that process); the report gives the
median ratio over the rounds with its spread (min and max), and the geometric mean of the jobs'
median ratios. A ratio whose min-max range holds 1.0 is no change beyond noise; run
``--base HEAD --new HEAD`` once to see this machine's noise (an A/A run).

It also lists result fields that one side's rows have and the other's lack (a renamed or dropped
field shows here). Examples::

    python -m bench.ab --base HEAD~1 -- --models ViT-tiny --n 4 --batch 8 --precision fp32 \\
        --storage float32 --steps 10 --in-process
    python -m bench.ab --base HEAD~1 --repeats 3 -- --models ViT-B-32 --n 2 --batch 2 --precision fp32 \\
        --storage float32 --only floor,merge_once,atlas --steps 5

``--out``, ``--no-plot`` and ``--no-resume`` are set per side (every round measures afresh).
"""
from __future__ import annotations

import argparse
import io
import math
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

from .grid import row_key
from .summary import load_rows

REPO_ROOT = Path(__file__).resolve().parent.parent
_OWN_FLAGS = ("--out", "--no-plot", "--no-resume", "--resume", "--max-minutes")


def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(REPO_ROOT), *args], check=True, capture_output=True,
                          text=True).stdout.strip()


def extract(rev: str, dest: Path) -> str:
    """The tree of commit ``rev`` under ``dest`` (no ``.git``); returns its short commit."""
    sha = _git("rev-parse", "--short", f"{rev}^{{commit}}")
    dest.mkdir(parents=True)
    tar = subprocess.run(["git", "-C", str(REPO_ROOT), "archive", "--format=tar", sha], check=True,
                         capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        try:
            tf.extractall(dest, filter="data")  # the repository's own files: no links out, no absolute paths
        except TypeError:  # a Python before the extraction filters (3.11.4)
            tf.extractall(dest)
    return sha


def _has_rounds(root: Path) -> bool:
    """Whether the bench under ``root`` knows ``--rounds`` (older commits did not)."""
    try:
        return '"--rounds"' in (root / "bench" / "cli.py").read_text()
    except OSError:
        return False


def run_side(root: Path, commit: Optional[str], bench_args: List[str], out: Path, log) -> List[dict]:
    """One ``python -m bench`` of the code under ``root``; its rows (an empty list if it failed)."""
    env = os.environ.copy()
    env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
    if commit:
        env["ATLAS_KERNELS_COMMIT"] = commit  # an extracted tree has no .git to ask
    cmd = [sys.executable, "-m", "bench", *bench_args, "--out", str(out), "--no-plot", "--no-resume"]
    if not any(a.split("=")[0] == "--rounds" for a in bench_args) and _has_rounds(root):
        # bench.ab's own repeats are the rounds: one per side and repeat (a CPU run now defaults to 3)
        cmd += ["--rounds", "1"]
    proc = subprocess.run(cmd, cwd=str(root), env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        log(f"  exit {proc.returncode}: " + " | ".join(proc.stderr.strip().splitlines()[-3:])[-400:])
    return load_rows(out)


def _label(key: tuple) -> str:
    model, n, batch, precision, storage, k, method, backend = key
    m = method if backend is None else f"{method}:{backend}"
    cfg = " ".join(str(v) for v in (model, f"N{n}" if n else None, f"b{batch}" if batch else None, precision,
                                    storage, f"K{k}" if k else None) if v)
    return f"{m:<16} {cfg}"


def compare(rounds: List[Dict[str, List[dict]]]) -> dict:
    """Per job key: the ratios new/base of ``step_ms`` over the rounds; and the fields one side lacks."""
    ratios: Dict[tuple, List[float]] = {}
    fields = {"base": set(), "new": set()}
    for r in rounds:
        by = {side: {row_key(x): x for x in rows} for side, rows in r.items()}
        for side, rows in r.items():
            for x in rows:
                fields[side].update(x)
        for key, b in by["base"].items():
            n = by["new"].get(key)
            if n and b.get("step_ms") and n.get("step_ms") and not b.get("error") and not n.get("error"):
                ratios.setdefault(key, []).append(n["step_ms"] / b["step_ms"])
    return {"ratios": ratios, "only_base": sorted(fields["base"] - fields["new"]),
            "only_new": sorted(fields["new"] - fields["base"])}


def report(res: dict, base: str, new: str) -> str:
    lines = [f"step_ms ratio new ({new}) / base ({base}), per job: median [min, max] over rounds", ""]
    meds = []
    for key in sorted(res["ratios"], key=lambda k: tuple(str(v) for v in k)):
        rs = res["ratios"][key]
        med = statistics.median(rs)
        meds.append(med)
        lines.append(f"  {_label(key):<56} {med:.3f} [{min(rs):.3f}, {max(rs):.3f}]  ({len(rs)} rounds)")
    if meds:
        gm = math.exp(sum(math.log(m) for m in meds) / len(meds))
        lines += ["", f"geometric mean of the jobs' median ratios: {gm:.3f} ({len(meds)} jobs)"]
    else:
        lines.append("  no job was measured on both sides")
    for side in ("base", "new"):
        if res[f"only_{side}"]:
            lines.append(f"fields only in the {side} rows: {', '.join(res[f'only_{side}'])}")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    bench_args: List[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, bench_args = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__.split("\n\n")[0],
                                epilog="Everything after -- goes to python -m bench on both sides.")
    p.add_argument("--base", default="HEAD~1", help="the commit to compare against (default HEAD~1)")
    p.add_argument("--new", default=None, help="the commit measured against it (default: this work tree as it is)")
    p.add_argument("--repeats", type=int, default=5, help="rounds; each runs both sides once (default 5)")
    p.add_argument("--json", type=Path, default=None, help="also write the ratios and the report here")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error(f"--repeats must be at least 1, got {args.repeats}")
    clash = [a for a in bench_args if a.split("=")[0] in _OWN_FLAGS]
    if clash:
        p.error(f"{', '.join(clash)}: bench.ab sets these for each side; leave them out")

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="bench-ab-") as tmp:
        tmp = Path(tmp)
        base_commit = extract(args.base, tmp / "base")
        sides = {"base": (tmp / "base", base_commit)}
        if args.new is None:
            sides["new"], new_name = (REPO_ROOT, None), "work tree"
        else:
            new_commit = extract(args.new, tmp / "new")
            sides["new"], new_name = (tmp / "new", new_commit), new_commit
        rounds = []
        for r in range(args.repeats):
            order = ("base", "new") if r % 2 == 0 else ("new", "base")
            got = {}
            for side in order:
                root, commit = sides[side]
                t0 = time.perf_counter()
                got[side] = run_side(root, commit, bench_args, tmp / f"{side}-{r}.jsonl", log)
                log(f"round {r + 1}/{args.repeats} {side}: {len(got[side])} rows "
                    f"({time.perf_counter() - t0:.0f} s)")
            rounds.append(got)
        res = compare(rounds)
    text = report(res, base_commit, new_name)
    print(text)
    if args.json:
        from atlas_kernels._io import atomic_write_json

        atomic_write_json(args.json, {"base": base_commit, "new": new_name, "bench_args": bench_args,
                                      "report": text, "ratios": [{"job": list(k), "ratios": v}
                                                                 for k, v in res["ratios"].items()],
                                      "fields_only_in_base": res["only_base"], "fields_only_in_new": res["only_new"]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
