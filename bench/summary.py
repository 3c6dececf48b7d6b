"""Reading result files, matching rows, derived ratios, and the printed table."""
from __future__ import annotations

import json
from pathlib import Path
from statistics import median, quantiles
from typing import Dict, Iterable, List, Optional

from atlas_kernels.storage import BYTES_PER_ELEMENT

from . import quiet
from .grid import row_key

METHOD_ORDER = {"ceiling": 0, "floor": 1, "naive": 2, "merge_once": 3, "fusionbench": 4, "atlas": 5}
# the baselines atlas is compared with, per configuration (the floor: per model, batch, precision)
BASELINES = ("naive", "merge_once", "fusionbench")
# Methods that compose the same weights start from the same loss: compared in fp32 only (float32
# sums in another order: 8e-8 relative measured for fusionbench on ViT-B/32); under bf16 / fp16
# autocast the composition runs in another precision per method, so loss0 is shown, not compared.
LOSS0_RTOL = 1e-4


def history_rows(path) -> List[dict]:
    """Every row of every ``*.jsonl`` in the folder of ``path`` (its own rows included): where
    :func:`bench.quiet.machine_notes` finds this host's usual ceiling and floor (it keeps only the
    runs before the one shown, on the same host)."""
    folder = Path(path).parent
    rows: List[dict] = []
    if folder.is_dir():
        for f in sorted(folder.glob("*.jsonl")):
            rows += load_rows(f)
    return rows


def machine_notes(rows: Iterable[dict], history: Iterable[dict] = ()) -> List[str]:
    """Why the machine was not quiet during the runs shown (bench/quiet.py); empty when quiet."""
    return quiet.machine_notes(rounds_of(rows), history)


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
    """For every successful atlas row: atlas/naive, atlas/merge_once, atlas/fusionbench, atlas/floor
    (step time; <1 means atlas is faster), peak memory of each, and (atlas - floor) / two_pass_time.
    With several rounds (``--rounds``): step times pooled over the rounds (:func:`merged`), and
    (atlas - floor) / two_pass the median over rounds of each round's own value (paired by round),
    with its spread in ``two_pass_rounds``. Every ratio also gets its interval over the run and,
    where that interval does not support it, the reason (``intervals``, ``flags``: bench/quiet.py);
    ``loss0``: each method's first loss, ``loss0_mismatch`` the methods whose first loss differs
    from atlas's (they compose the same weights, so they should not)."""
    rows = list(rows)
    by_round = rounds_of(rows)
    ceil_rounds = next((v for v in by_round.values() if v[max(v)].get("method") == "ceiling"), {})
    rows = merged(rows)
    by = {}
    for r in rows:
        if r.get("method") in BASELINES:
            by[(r["method"],) + config_key(r)] = r
        elif r.get("method") == "floor":
            by[("floor", r.get("model"), r.get("batch"), r.get("precision"))] = r
    ceil = ceiling_row(rows)
    out = []
    for a in rows:
        if a.get("method") != "atlas" or not ok(a):
            continue
        base = {m: by.get((m,) + config_key(a)) for m in BASELINES}
        naive, merge, peer = base["naive"], base["merge_once"], base["fusionbench"]
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
            fusionbench_ms=peer["step_ms"] if ok(peer) else None,
            fusionbench_peak=peer.get("peak_bytes") if peer else None,
            fusionbench_oom=bool(peer and peer.get("oom")),
            floor_ms=floor["step_ms"] if ok(floor) else None,
            floor_peak=floor.get("peak_bytes") if floor else None,
        )
        d["intervals"], d["flags"] = {}, {}
        a_rounds = by_round.get(row_key(a), {})
        for name, other in (("naive", naive), ("merge_once", merge), ("fusionbench", peer), ("floor", floor)):
            key = f"atlas/{name}"
            d[key] = a["step_ms"] / other["step_ms"] if ok(other) and other["step_ms"] else None
            if d[key] is not None:
                iv = quiet.step_ratio_interval(a, other, a_rounds, by_round.get(row_key(other), {}))
                d["intervals"][key] = iv
                why = quiet.ratio_flag(iv)
                if why:
                    d["flags"][key] = why
        d["two_pass_ms"] = None
        d["(atlas-floor)/two_pass"] = None
        if ceil and a.get("adapted_params") and a["storage"] in BYTES_PER_ELEMENT:
            tp = two_pass_ms(a["n_task_vectors"], a["adapted_params"], a["storage"], ceil["copy_gbps"])
            d["two_pass_ms"] = tp
            if d["floor_ms"]:
                d["(atlas-floor)/two_pass"] = (d["atlas_ms"] - d["floor_ms"]) / tp
        d["two_pass_rounds"] = None
        paired: List[float] = []
        if floor is not None and a.get("rounds"):
            paired = _paired_two_pass(a_rounds, by_round.get(row_key(floor), {}), ceil_rounds,
                                      a["n_task_vectors"], a["storage"])
            if len(paired) >= 2:
                d["two_pass_rounds"] = paired
                d["(atlas-floor)/two_pass"] = median(paired)
        if d["(atlas-floor)/two_pass"] is not None:
            iv = quiet.two_pass_interval(a, floor, d["two_pass_ms"], paired)
            d["intervals"]["(atlas-floor)/two_pass"] = iv
            why = quiet.two_pass_flag(iv)
            if why:
                d["flags"]["(atlas-floor)/two_pass"] = why
        # the same steps captured in one CUDA graph and replayed (GPU rows): the host out of the way
        d["graph_ms"] = {m: r.get("graph_step_ms") for m, r in list(base.items()) + [("floor", floor), ("atlas", a)]
                         if r is not None and r.get("graph_step_ms") is not None}
        g_a, g_f = d["graph_ms"].get("atlas"), d["graph_ms"].get("floor")
        d["graph (atlas-floor)/two_pass"] = ((g_a - g_f) / d["two_pass_ms"]
                                             if g_a is not None and g_f is not None and d["two_pass_ms"] else None)
        d["loss0"] = {m: r["loss0"] for m, r in list(base.items()) + [("atlas", a)]
                      if ok(r) and r.get("loss0") is not None}
        ref = d["loss0"].get("atlas")
        d["loss0_mismatch"] = sorted(m for m, v in d["loss0"].items() if ref is not None and a["precision"] == "fp32"
                                     and abs(v - ref) > LOSS0_RTOL * max(abs(ref), 1e-12))
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


def _cell(d: dict, key: str, width: int, nd: int = 2) -> str:
    return f"{quiet.mark(fmt(d[key], nd), key in d['flags'] and d[key] is not None):>{width}}"


def machine_lines(notes: List[str]) -> List[str]:
    if not notes:
        return [quiet.QUIET_LINE]
    return [quiet.NOT_QUIET_HEAD] + [f"  - {n}" for n in notes]


def flag_lines(rs: List[dict]) -> List[str]:
    """One line per flagged ratio, saying why; then the legend. Empty when nothing is flagged."""
    lines = []
    for d in rs:
        what = (f"{d['model']} N{d['n_task_vectors']} b{d['batch']} {d['precision']} {d['storage']} "
                f"K{d['partitions']} {d['backend']}")
        for key, why in d["flags"].items():
            lines.append(f"  {quiet.FLAG} {key} = {fmt(d[key])} ({what}): {why}")
        for m in d.get("loss0_mismatch") or []:
            lines.append(f"  ! loss0 of {m} {d['loss0'][m]:.6f} differs from atlas's {d['loss0']['atlas']:.6f} "
                         f"({what}): they compose the same weights, so they should start from the same loss")
    return lines + [quiet.FLAG_LEGEND] if lines else []


def format_table(rows: List[dict], history: Iterable[dict] = ()) -> str:
    """The printed table: the ceiling, whether the machine was quiet (bench/quiet.py), every job's
    step time, p20-p80, peak and first loss, then the ratios, each marked ``?`` where the run's own
    spread does not support it, with the reasons below. ``history``: earlier rows (any files) for
    this host's usual ceiling and floor."""
    rows = list(rows)
    rs = ratios(rows)
    notes = machine_notes(rows, history)
    rows = sorted(merged(rows), key=sort_key)
    lines = []
    ceil = ceiling_row(rows)
    if ceil:
        lines.append(
            f"ceiling on {ceil.get('device')}: copy {ceil['copy_gbps']:.1f} GB/s (read+write), "
            f"matmul {ceil['matmul_tflops']:.2f} TFLOP/s ({ceil.get('matmul_dtype', '?')})"
        )
    lines += machine_lines(notes)
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
        if r.get("loss0") is not None and not r.get("error"):
            note = (note + f" loss0={r['loss0']:.6f}").strip()
        p = "-" if r.get("step_ms_p20") is None else f"{r['step_ms_p20']:.1f}-{r['step_ms_p80']:.1f}"
        lines.append(
            f"{r.get('model') or '':<9} {r.get('n_task_vectors') or '-':>3} {r.get('batch') or '-':>5} "
            f"{r.get('precision') or '':<4} {r.get('storage') or '-':<9} {r.get('partitions') or '-':>2} {m:<17} "
            f"{fmt(r.get('step_ms'), 1):>10} {p:>19} {gb(r.get('peak_bytes')):>8}  {note}"
        )
    if rs:
        rounds = max((r.get("rounds") or 1) for r in rows)
        peer = any(d["fusionbench_ms"] is not None or d["fusionbench_oom"] for d in rs)
        lines.append("")
        lines.append("ratios (step time; < 1: atlas faster)" + (
            f"; {rounds} rounds: step times pooled, (a-f)/2pass the median of the rounds' own values "
            "[their min, max]" if rounds > 1 else "") + f"; {quiet.FLAG}: not supported by this run's spread")
        h2 = (f"{'model':<9} {'N':>3} {'batch':>5} {'prec':<4} {'storage':<9} {'K':>2} {'backend':<7} "
              f"{'/naive':>7} {'/merge':>7} " + (f"{'/fusionb':>8} " if peer else "")
              + f"{'/floor':>7} {'2pass ms':>9} {'(a-f)/2pass':>11}")
        lines += [h2, "-" * len(h2)]
        for d in rs:
            spread = d.get("two_pass_rounds")
            lines.append(
                f"{d['model']:<9} {d['n_task_vectors']:>3} {d['batch']:>5} {d['precision']:<4} {d['storage']:<9} "
                f"{d['partitions']:>2} {d['backend']:<7} {_cell(d, 'atlas/naive', 7)} "
                f"{_cell(d, 'atlas/merge_once', 7)} "
                + (f"{_cell(d, 'atlas/fusionbench', 8)} " if peer else "")
                + f"{_cell(d, 'atlas/floor', 7)} {fmt(d['two_pass_ms']):>9} {_cell(d, '(atlas-floor)/two_pass', 11)}"
                + (f" [{min(spread):.2f}, {max(spread):.2f}]" if spread else "")
            )
        flagged = flag_lines(rs)
        if flagged:
            lines += [""] + flagged
    return "\n".join(lines)
