"""``python -m bench.report FILE.jsonl [--n 21] [--all]``: a markdown headline table for the README.

Per model and batch (and precision, storage, partitions, backend where they differ): the atlas step
time, its ratios to naive, merge_once, fusionbench (where it ran) and the floor (step time; below 1
means atlas is faster), (atlas - floor) / two_pass_time where a ceiling was measured
(docs/PERFORMANCE.md), and the peak memory of atlas, naive and the floor. A machine that was not
quiet during the run is said above the table, and every ratio the run's own spread does not
support is marked ``?`` with the reason below it (bench/quiet.py). By default only the headline N
(21 when present, else every N in the file); ``--all`` for every row.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import quiet
from .summary import ceiling_row, fmt, gb, history_rows, load_rows, machine_notes, merged, ratios


def _x(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def _r(d: dict, key: str) -> str:
    return quiet.mark(_x(d[key]), key in d["flags"] and d[key] is not None)


def markdown(path, n=None, all_rows=False) -> str:
    loaded = load_rows(path)
    rs = ratios(loaded)
    rows = merged(loaded)
    if not rs:
        return f"_{path}: no successful atlas rows to report._\n"
    ns = sorted({d["n_task_vectors"] for d in rs})
    if n is not None:
        rs = [d for d in rs if d["n_task_vectors"] == n]
    elif not all_rows and 21 in ns:
        rs = [d for d in rs if d["n_task_vectors"] == 21]
    rs.sort(key=lambda d: (d["model"], d["batch"], d["n_task_vectors"], d["precision"], d["storage"],
                           d["partitions"], d["backend"]))
    meta = next(r for r in rows if r.get("method") == "atlas")
    ceil = ceiling_row(rows)
    notes = machine_notes(loaded, history_rows(path))
    peer = any(d["fusionbench_ms"] is not None or d["fusionbench_oom"] for d in rs)
    lines = []
    if notes:
        lines += [f"> **Not a quiet machine**: {quiet.NOT_QUIET_WHY}:"]
        lines += [f"> - {n}" for n in notes]
        lines += ["> ", f"> Ratios marked {quiet.FLAG} are not supported by the run's own spread; rerun on a "
                  "quiet machine before quoting them.", ""]
    lines += [
        f"**{meta.get('device')}**, {meta.get('date')}, torch {meta.get('torch')}, triton {meta.get('triton')}, "
        f"atlas_kernels {meta.get('atlas_kernels')}"
        + (f"; copy {ceil['copy_gbps']:.0f} GB/s, matmul {ceil['matmul_tflops']:.3g} TFLOP/s "
           f"({ceil.get('matmul_dtype', '')})" if ceil else "")
        + ". One training step (forward, cross-entropy, backward, AdamW on the coefficients) of the "
        "open_clip image tower; ratios are step-time ratios (below 1: atlas is faster).",
        "",
        "| model | batch | N | precision | storage | K | backend | atlas ms | atlas/naive | atlas/merge_once "
        + ("| atlas/fusionbench " if peer else "")
        + "| atlas/floor | (atlas-floor)/2-pass | peak atlas GB | peak naive GB | peak floor GB |",
        "|---|---:|---:|---|---|---:|---|---:|---:|---:|" + ("---:|" if peer else "") + "---:|---:|---:|---:|---:|",
    ]
    for d in rs:
        naive_peak = "OOM" if d["naive_oom"] else gb(d["naive_peak"])
        naive_ratio = "naive OOM" if d["naive_oom"] else _r(d, "atlas/naive")
        merge_ratio = "merge OOM" if d["merge_oom"] else _r(d, "atlas/merge_once")
        peer_ratio = "fusionbench OOM" if d["fusionbench_oom"] else _r(d, "atlas/fusionbench")
        lines.append(
            f"| {d['model']} | {d['batch']} | {d['n_task_vectors']} | {d['precision']} | {d['storage']} | "
            f"{d['partitions']} | {d['backend']} | {fmt(d['atlas_ms'], 1)} | {naive_ratio} | {merge_ratio} | "
            + (f"{peer_ratio} | " if peer else "")
            + f"{_r(d, 'atlas/floor')} | {_r(d, '(atlas-floor)/two_pass')} | {gb(d['atlas_peak'])} | "
            f"{naive_peak} | {gb(d['floor_peak'])} |"
        )
    lines.append("")
    graphed = [d for d in rs if d["graph_ms"]]
    if graphed:
        lines += [
            "The same steps captured in one CUDA graph and replayed (the host out of the way), against the eager "
            "steps above (ms):",
            "",
            "| model | batch | backend | atlas eager | atlas graph | floor eager | floor graph | merge_once eager "
            "| merge_once graph | naive graph | (atlas-floor)/2-pass eager | graph |",
            "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for d in graphed:
            gm = d["graph_ms"]
            lines.append(
                f"| {d['model']} | {d['batch']} | {d['backend']} | {fmt(d['atlas_ms'], 1)} | "
                f"{fmt(gm.get('atlas'), 1)} | {fmt(d['floor_ms'], 1)} | {fmt(gm.get('floor'), 1)} | "
                f"{fmt(d['merge_ms'], 1)} | {fmt(gm.get('merge_once'), 1)} | {fmt(gm.get('naive'), 1)} | "
                f"{_x(d['(atlas-floor)/two_pass'])} | "
                f"{_x(d['graph (atlas-floor)/two_pass'])} |")
        lines.append("")
    flagged = [(d, key, why) for d in rs for key, why in d["flags"].items()]
    if flagged:
        lines.append(f"{quiet.FLAG}: not supported by this run's own spread:")
        lines.append("")
        for d, key, why in flagged:
            lines.append(f"- {key} = {_x(d[key])} ({d['model']}, batch {d['batch']}, N {d['n_task_vectors']}, "
                         f"{d['storage']}, K {d['partitions']}, {d['backend']}): {why}")
        lines.append("")
        lines.append(f"Flagged: {quiet.FLAG_RULE} (bench/README.md, \"Is the machine quiet?\").")
        lines.append("")
    elif not notes:
        lines.append(quiet.QUIET_LINE[0].upper() + quiet.QUIET_LINE[1:] + "; every ratio is supported by the "
                     "run's own spread.")
        lines.append("")
    kind = meta.get("peak_kind", "")
    if kind.startswith("ru_maxrss"):
        lines.append("Peak memory on CPU is the peak RSS of a fresh process per (configuration, method)"
                     + (" over the timed steps (its high-water mark reset after warm-up, as on GPU)"
                        if "reset" in kind else "")
                     + ", so it includes the Python interpreter and torch (about 0.5 GB).")
    elif kind:
        lines.append("Peak memory is torch.cuda.max_memory_allocated over the timed steps "
                     "(model, task vectors, optimizer state and activations included).")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.splitlines()[0])
    p.add_argument("jsonl", type=Path)
    p.add_argument("--n", type=int, default=None, help="only this N")
    p.add_argument("--all", action="store_true", help="every N, not just the headline N=21")
    a = p.parse_args(argv)
    sys.stdout.write(markdown(a.jsonl, a.n, a.all))
    return 0


if __name__ == "__main__":
    sys.exit(main())
