"""Reading result files, matching rows, derived ratios, and the printed table."""
from __future__ import annotations

import json
from pathlib import Path
from statistics import median, quantiles
from typing import Dict, Iterable, List, Optional

from atlas_kernels.storage import BYTES_PER_ELEMENT

from .grid import row_key

METHOD_ORDER = {"ceiling": 0, "floor": 1, "naive": 2, "merge_once": 3, "atlas": 4}


def load_rows(path) -> List[dict]:
    rows = []
    p = Path(path)
    if not p.exists():
        return rows
    with p.open() as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    pass  # a line cut short by a killed run
    return rows


def latest(rows: Iterable[dict]) -> List[dict]:
    """One row per job key, the last one written winning."""
    d: Dict[tuple, dict] = {}
    for r in rows:
        d[row_key(r)] = r
    return list(d.values())


def rounds_of(rows: Iterable[dict]) -> Dict[tuple, Dict[int, dict]]:
    """Per job key, the rows of the run that wrote its last row, by round (``python -m bench
    --rounds R`` writes one row per job and round, all with the same ``run``). A row of a run
    without rounds (or of an older file) is that run's round 1."""
    rows = list(rows)
    last_run = {row_key(r): r.get("run") for r in rows}
    out: Dict[tuple, Dict[int, dict]] = {}
    for r in rows:
        k = row_key(r)
        if r.get("run") == last_run[k]:
            out.setdefault(k, {})[int(r.get("round") or 1)] = r
    return out


def merged(rows: Iterable[dict]) -> List[dict]:
    """One row per job key, as :func:`latest`, except that a key measured in several rounds gets
    the rounds pooled: ``step_ms`` and its p20/p80 from every timed step of every round (the
    median of the rounds' medians where the steps were not written), the highest peak, the median
    copy bandwidth and matmul rate of the ceiling, and ``rounds`` = how many."""
    out = []
    for by_round in rounds_of(rows).values():
        rs = [by_round[i] for i in sorted(by_round)]
        if len(rs) == 1:
            out.append(rs[0])
            continue
        m = dict(rs[-1], rounds=len(rs))
        good = [r for r in rs if ok(r)]
        steps = [t for r in good for t in (r.get("step_times_ms") or [])]
        if steps and all(r.get("step_times_ms") for r in good):
            q = quantiles(steps, n=5, method="inclusive")  # linear, as a round's torch.quantile
            m.update(step_ms=median(steps), step_ms_p20=q[0], step_ms_p80=q[3])
        elif good:
            m.update(step_ms=median([r["step_ms"] for r in good]), step_ms_p20=min(r["step_ms"] for r in good),
                     step_ms_p80=max(r["step_ms"] for r in good))
        peaks = [r["peak_bytes"] for r in rs if r.get("peak_bytes")]
        if peaks:
            m["peak_bytes"] = max(peaks)
        for f in ("copy_gbps", "matmul_tflops"):
            vals = [r[f] for r in rs if r.get(f)]
            if vals:
                m[f] = median(vals)
        out.append(m)
    return out


def ok(r: Optional[dict]) -> bool:
    return r is not None and not r.get("oom") and not r.get("error") and r.get("step_ms") is not None


def config_key(r: dict) -> tuple:
    return (r.get("model"), r.get("n_task_vectors"), r.get("batch"), r.get("precision"), r.get("storage"),
            r.get("partitions"))


def ceiling_row(rows: Iterable[dict]) -> Optional[dict]:
    c = [r for r in rows if r.get("method") == "ceiling" and r.get("copy_gbps")]
    return c[-1] if c else None


def two_pass_ms(n: int, adapted_params: int, storage: str, copy_gbps: float) -> float:
    """Two passes over the task vectors at copy bandwidth, in ms (docs/PERFORMANCE.md)."""
    return 2 * n * adapted_params * BYTES_PER_ELEMENT[storage] / (copy_gbps * 1e9) * 1e3


def _paired_two_pass(atlas_rounds: Dict[int, dict], floor_rounds: Dict[int, dict],
                     ceil_rounds: Dict[int, dict], n: int, storage: str) -> List[float]:
    """(atlas - floor) / two_pass per round where all three were measured in that round (each
    round's own copy bandwidth): a slow spell of a shared machine then lands on both terms."""
    vals = []
    for i, a in sorted(atlas_rounds.items()):
        f, c = floor_rounds.get(i), ceil_rounds.get(i)
        if ok(a) and ok(f) and c and c.get("copy_gbps") and a.get("adapted_params"):
            vals.append((a["step_ms"] - f["step_ms"]) / two_pass_ms(n, a["adapted_params"], storage, c["copy_gbps"]))
    return vals


def ratios(rows: List[dict]) -> List[dict]:
    """For every successful atlas row: atlas/naive, atlas/merge_once, atlas/floor (step time; <1
    means atlas is faster), peak memory of each, and (atlas - floor) / two_pass_time. With several
    rounds (``--rounds``): step times pooled over the rounds (:func:`merged`), and
    (atlas - floor) / two_pass the median over rounds of each round's own value (paired by round),
    with its spread in ``two_pass_rounds``."""
    rows = list(rows)
    by_round = rounds_of(rows)
    ceil_rounds = next((v for v in by_round.values() if v[max(v)].get("method") == "ceiling"), {})
    rows = merged(rows)
    by = {}
    for r in rows:
        if r.get("method") in ("naive", "merge_once"):
            by[(r["method"],) + config_key(r)] = r
        elif r.get("method") == "floor":
            by[("floor", r.get("model"), r.get("batch"), r.get("precision"))] = r
    ceil = ceiling_row(rows)
    out = []
    for a in rows:
        if a.get("method") != "atlas" or not ok(a):
            continue
        naive = by.get(("naive",) + config_key(a))
        merge = by.get(("merge_once",) + config_key(a))
        floor = by.get(("floor", a.get("model"), a.get("batch"), a.get("precision")))
        d = dict(
            model=a["model"], n_task_vectors=a["n_task_vectors"], batch=a["batch"], precision=a["precision"],
            storage=a["storage"], partitions=a["partitions"], backend=a["backend"],
            atlas_ms=a["step_ms"], atlas_peak=a.get("peak_bytes"),
            naive_ms=naive["step_ms"] if ok(naive) else None,
            naive_peak=naive.get("peak_bytes") if naive else None,
            naive_oom=bool(naive and naive.get("oom")),
            merge_ms=merge["step_ms"] if ok(merge) else None,
            merge_peak=merge.get("peak_bytes") if merge else None,
            merge_oom=bool(merge and merge.get("oom")),
            floor_ms=floor["step_ms"] if ok(floor) else None,
            floor_peak=floor.get("peak_bytes") if floor else None,
        )
        d["atlas/naive"] = d["atlas_ms"] / d["naive_ms"] if d["naive_ms"] else None
        d["atlas/merge_once"] = d["atlas_ms"] / d["merge_ms"] if d["merge_ms"] else None
        d["atlas/floor"] = d["atlas_ms"] / d["floor_ms"] if d["floor_ms"] else None
        d["two_pass_ms"] = None
        d["(atlas-floor)/two_pass"] = None
        if ceil and a.get("adapted_params") and a["storage"] in BYTES_PER_ELEMENT:
            tp = two_pass_ms(a["n_task_vectors"], a["adapted_params"], a["storage"], ceil["copy_gbps"])
            d["two_pass_ms"] = tp
            if d["floor_ms"]:
                d["(atlas-floor)/two_pass"] = (d["atlas_ms"] - d["floor_ms"]) / tp
        d["two_pass_rounds"] = None
        if floor is not None and a.get("rounds"):
            paired = _paired_two_pass(by_round.get(row_key(a), {}), by_round.get(row_key(floor), {}), ceil_rounds,
                                      a["n_task_vectors"], a["storage"])
            if len(paired) >= 2:
                d["two_pass_rounds"] = paired
                d["(atlas-floor)/two_pass"] = median(paired)
        out.append(d)
    return out


def gb(x) -> str:
    return "-" if x is None else f"{x / 1e9:.2f}"


def fmt(x, nd=2) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def sort_key(r: dict):
    return (
        r.get("model") or "", r.get("batch") or 0, r.get("precision") or "", r.get("n_task_vectors") or 0,
        r.get("storage") or "", r.get("partitions") or 0, METHOD_ORDER.get(r.get("method"), 9), r.get("backend") or "",
    )


def format_table(rows: List[dict]) -> str:
    rows = list(rows)
    rs = ratios(rows)
    rows = sorted(merged(rows), key=sort_key)
    lines = []
    ceil = ceiling_row(rows)
    if ceil:
        lines.append(
            f"ceiling on {ceil.get('device')}: copy {ceil['copy_gbps']:.1f} GB/s (read+write), "
            f"matmul {ceil['matmul_tflops']:.2f} TFLOP/s ({ceil.get('matmul_dtype', '?')})"
        )
    hdr = (f"{'model':<9} {'N':>3} {'batch':>5} {'prec':<4} {'storage':<9} {'K':>2} {'method':<17} {'step ms':>10} "
           f"{'p20-p80':>19} {'peak GB':>8}  note")
    lines += [hdr, "-" * len(hdr)]
    for r in rows:
        if r.get("method") == "ceiling":
            continue
        m = r["method"] + (f":{r['backend']}" if r.get("backend") else "")
        note = "OOM" if r.get("oom") else (r.get("error", "")[:60] if r.get("error") else "")
        if r.get("launches") is not None:
            note = (note + f" launches={r['launches']}").strip()
        elif r.get("aten_ops") is not None and not note:
            note = f"aten_ops={r['aten_ops']}"
        p = "-" if r.get("step_ms_p20") is None else f"{r['step_ms_p20']:.1f}-{r['step_ms_p80']:.1f}"
        lines.append(
            f"{r.get('model') or '':<9} {r.get('n_task_vectors') or '-':>3} {r.get('batch') or '-':>5} "
            f"{r.get('precision') or '':<4} {r.get('storage') or '-':<9} {r.get('partitions') or '-':>2} {m:<17} "
            f"{fmt(r.get('step_ms'), 1):>10} {p:>19} {gb(r.get('peak_bytes')):>8}  {note}"
        )
    if rs:
        rounds = max((r.get("rounds") or 1) for r in rows)
        lines.append("")
        lines.append("ratios (step time; < 1: atlas faster)" + (
            f"; {rounds} rounds: step times pooled, (a-f)/2pass the median of the rounds' own values "
            "[their min, max]" if rounds > 1 else ""))
        h2 = (f"{'model':<9} {'N':>3} {'batch':>5} {'prec':<4} {'storage':<9} {'K':>2} {'backend':<7} "
              f"{'/naive':>7} {'/merge':>7} {'/floor':>7} {'2pass ms':>9} {'(a-f)/2pass':>11}")
        lines += [h2, "-" * len(h2)]
        for d in rs:
            spread = d.get("two_pass_rounds")
            lines.append(
                f"{d['model']:<9} {d['n_task_vectors']:>3} {d['batch']:>5} {d['precision']:<4} {d['storage']:<9} "
                f"{d['partitions']:>2} {d['backend']:<7} {fmt(d['atlas/naive']):>7} {fmt(d['atlas/merge_once']):>7} "
                f"{fmt(d['atlas/floor']):>7} {fmt(d['two_pass_ms']):>9} {fmt(d['(atlas-floor)/two_pass']):>11}"
                + (f" [{min(spread):.2f}, {max(spread):.2f}]" if spread else "")
            )
    return "\n".join(lines)
