"""Was the machine quiet, and does a run's own spread support each ratio it prints?

A benchmark on a shared machine can print anything: on a loaded 2-core VM ``python -m bench`` once
printed ``atlas/floor`` 0.51 and ``(atlas - floor) / two_pass`` -20, because a slow spell fell on the
floor. The table, ``bench.report`` and ``bench.plot`` therefore say when the machine was not quiet,
and mark every ratio whose interval over the run does not support it. The rule (bench/README.md,
"Is the machine quiet?"; docs/PERFORMANCE.md) uses only what the rows record:

The machine was **not quiet** when any of these holds for the rows of the run shown:

1. **load**: a job's 1-minute load average (``loadavg_1m``, before or after its timed steps) above
   ``cores + 0.5``: more runnable threads than cores, so someone waited (the benchmark runs at
   most one thread per core). Rows written before ``cores`` was recorded use ``threads``.
2. **CPU waits**: ``cpu_wait`` above 0.10: the share of a job's timed steps during which some task
   waited for a core (Linux pressure stall information). Unlike the load average it is not a
   minute late: quiet here 0.004, with one other busy thread beside a 2-thread job 0.50.
3. **floor spread**: the floor's step times spread by more than 25%: the rounds' medians
   ``(max - min) / median``, or one round's ``(p80 - p20) / median``. The floor is the plain model;
   its steps should not move (quiet runs here: at most 14%).
4. **ceiling or floor against its usual value**: the run's copy bandwidth or matmul rate below 0.6
   of the usual value (the median of earlier quiet runs on the same host: device, CPU model, cores,
   threads, found in the results folder), or the run's floor above 1 / 0.6 of its usual step time;
   and the ceiling's rounds disagreeing by more than that factor (lowest below 0.6 of highest).

Each printed ratio gets an **interval**: with two or more rounds, the [min, max] of its per-round
values (each round's atlas against that round's baseline, and that round's copy bandwidth for
``(atlas - floor) / two_pass``); with one round, the corners of the p20-p80 step times
(``[a_p20 / b_p80, a_p80 / b_p20]``, and ``[(a_p20 - f_p80), (a_p80 - f_p20)] / two_pass``). A ratio is
**flagged** (printed with ``?``) when

- a step-time ratio's interval holds 1 (the run cannot tell faster from slower), or spans more
  than 1.5x (``hi / lo``: the value itself is uncertain by more than about +-22%);
- ``(atlas - floor) / two_pass``'s interval is wider than 1.0 (one two-pass: it cannot tell a run
  that meets the 1.2 target from one that takes twice as long).

Nothing here imports torch.
"""
from __future__ import annotations

from statistics import median
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from .grid import row_key

LOAD_MARGIN = 0.5  # load average above cores + this: more runnable threads than cores
CPU_WAIT_MAX = 0.10  # share of the timed steps during which some task waited for a core
FLOOR_SPREAD_MAX = 0.25  # the floor's steps: rounds' medians, or one round's p20-p80, over the median
USUAL_FRACTION = 0.6  # the ceiling's rates below this share of their usual value (the floor above 1 / it)
RATIO_SPAN_MAX = 1.5  # a step-time ratio's interval spanning more than this factor
TWO_PASS_WIDTH_MAX = 1.0  # (atlas - floor) / two_pass's interval wider than one two-pass
FLAG = "?"

Interval = Tuple[float, float]


def _ok(r: Optional[dict]) -> bool:
    return r is not None and not r.get("oom") and not r.get("error") and r.get("step_ms") is not None


def _cores(r: dict) -> Optional[int]:
    return r.get("cores") or r.get("threads")


def loaded(r: dict) -> bool:
    """This row's timing shared the CPU: rule 1 (load) or 2 (CPU waits)."""
    la, cores = r.get("loadavg_1m"), _cores(r)
    if la and cores and max(la) > cores + LOAD_MARGIN:
        return True
    return (r.get("cpu_wait") or 0.0) > CPU_WAIT_MAX


def host_key(r: dict) -> tuple:
    """Rows of the same host and thread count (the usual values are this host's)."""
    return (r.get("device"), r.get("cpu_model"), r.get("cores"), r.get("threads"))


def _label(r: dict) -> str:
    return " ".join(str(x) for x in (r.get("model"), f"b{r.get('batch')}", r.get("precision")) if x)


def _spread(vals: Sequence[float]) -> float:
    return (max(vals) - min(vals)) / median(vals) if vals and median(vals) > 0 else 0.0


def machine_notes(by_round: Dict[tuple, Dict[int, dict]], history: Iterable[dict] = ()) -> List[str]:
    """Why the machine was not quiet during the run(s) shown (``by_round``: per job key, its rows by
    round, as :func:`bench.summary.rounds_of` gives them), one line per reason; empty when quiet.
    ``history``: rows of earlier runs (any files); only those of the same host, written before the
    run shown and themselves not loaded, set the usual values."""
    rows = [r for rs in by_round.values() for r in rs.values()]
    notes: List[str] = []
    # 1. load
    over = [(max(r["loadavg_1m"]), _cores(r)) for r in rows
            if r.get("loadavg_1m") and _cores(r) and max(r["loadavg_1m"]) > _cores(r) + LOAD_MARGIN]
    timed = [r for r in rows if r.get("loadavg_1m")]
    if over:
        worst, cores = max(over)
        notes.append(f"load average up to {worst:.1f} on {cores} cores during {len(over)} of {len(timed)} "
                     f"measurements (quiet: at most cores + {LOAD_MARGIN})")
    # 2. CPU waits
    waits = [r["cpu_wait"] for r in rows if r.get("cpu_wait") is not None]
    high = [w for w in waits if w > CPU_WAIT_MAX]
    if high:
        notes.append(f"some task waited for a core during up to {max(high):.0%} of the timed steps, in {len(high)} "
                     f"of {len(waits)} measurements (quiet: at most {CPU_WAIT_MAX:.0%})")
    # 3. the floor's spread
    for rs in by_round.values():
        floors = [rs[i] for i in sorted(rs) if rs[i].get("method") == "floor" and _ok(rs[i])]
        if not floors:
            continue
        meds = [r["step_ms"] for r in floors]
        across = _spread(meds) if len(meds) > 1 else 0.0
        within = max(((r["step_ms_p80"] - r["step_ms_p20"]) / r["step_ms"]
                      for r in floors if r.get("step_ms_p20") is not None and r["step_ms"] > 0), default=0.0)
        if max(across, within) > FLOOR_SPREAD_MAX:
            what = (f"its rounds' medians ranged {min(meds):.0f} to {max(meds):.0f} ms ({across:.0%} of their median)"
                    if across >= within else f"its steps' p20-p80 within a round spanned {within:.0%} of the median")
            notes.append(f"floor {_label(floors[0])}: {what} (quiet: at most {FLOOR_SPREAD_MAX:.0%})")
    # 4. the ceiling across rounds and against its usual value; the floor against its usual value
    ceils = [r for rs in by_round.values() for r in rs.values() if r.get("method") == "ceiling" and r.get("copy_gbps")]
    for f, unit in (("copy_gbps", "GB/s"), ("matmul_tflops", "TFLOP/s")):
        vals = [r[f] for r in ceils if r.get(f)]
        if len(vals) > 1 and min(vals) < USUAL_FRACTION * max(vals):
            notes.append(f"ceiling {f.split('_')[0]} moved between rounds: {min(vals):.3g} to {max(vals):.3g} {unit} "
                         f"(quiet: lowest at least {USUAL_FRACTION} of highest)")
    runs = {r.get("run") for r in rows if r.get("run")}
    first_run = min(runs) if runs else None
    past = [h for h in history if first_run is not None and h.get("run") and h["run"] < first_run
            and not h.get("error") and not loaded(h)]
    if ceils and past:
        host = host_key(ceils[0])
        usual = [h for h in past if h.get("method") == "ceiling" and host_key(h) == host and h.get("copy_gbps")]
        for f, unit in (("copy_gbps", "GB/s"), ("matmul_tflops", "TFLOP/s")):
            now = [r[f] for r in ceils if r.get(f)]
            then = [h[f] for h in usual if h.get(f)]
            if now and then and median(now) < USUAL_FRACTION * median(then):
                notes.append(f"ceiling {f.split('_')[0]} {median(now):.3g} {unit}, usual {median(then):.3g} "
                             f"on this host (median of {len(then)} earlier quiet measurements; "
                             f"quiet: at least {USUAL_FRACTION} of it)")
    for key, rs in by_round.items():
        floors = [r for r in rs.values() if r.get("method") == "floor" and _ok(r)]
        if not floors or not past:
            continue
        then = [h["step_ms"] for h in past if h.get("method") == "floor" and _ok(h) and row_key(h) == key
                and host_key(h) == host_key(floors[0])]
        now = median([r["step_ms"] for r in floors])
        if then and now > median(then) / USUAL_FRACTION:
            notes.append(f"floor {_label(floors[0])}: {now:.0f} ms, usual {median(then):.0f} ms on this host "
                         f"(median of {len(then)} earlier quiet measurements; quiet: at most 1/{USUAL_FRACTION} of it)")
    return notes


# ---- ratios -----------------------------------------------------------------------------------


def step_ratio_interval(a: dict, b: dict, a_rounds: Dict[int, dict], b_rounds: Dict[int, dict]) -> Optional[Interval]:
    """The interval of ``a / b`` (step times) over the run: per-round ratios' [min, max] where both
    were measured in two or more of the same rounds, else the corners of their p20-p80."""
    paired = [a_rounds[i]["step_ms"] / b_rounds[i]["step_ms"] for i in sorted(a_rounds)
              if _ok(a_rounds[i]) and _ok(b_rounds.get(i)) and b_rounds[i]["step_ms"] > 0]
    if len(paired) >= 2:
        return min(paired), max(paired)
    if a.get("step_ms_p20") is None or b.get("step_ms_p20") is None or not b["step_ms_p20"] > 0:
        return None
    return a["step_ms_p20"] / b["step_ms_p80"], a["step_ms_p80"] / b["step_ms_p20"]


def two_pass_interval(a: dict, f: dict, two_pass_ms: float, per_round: Sequence[float]) -> Optional[Interval]:
    """The interval of ``(atlas - floor) / two_pass``: the per-round values' [min, max] with two or
    more rounds, else ``[(a_p20 - f_p80), (a_p80 - f_p20)] / two_pass``."""
    if len(per_round) >= 2:
        return min(per_round), max(per_round)
    if a.get("step_ms_p20") is None or f.get("step_ms_p20") is None or not two_pass_ms:
        return None
    return (a["step_ms_p20"] - f["step_ms_p80"]) / two_pass_ms, (a["step_ms_p80"] - f["step_ms_p20"]) / two_pass_ms


def ratio_flag(iv: Optional[Interval]) -> Optional[str]:
    """Why a step-time ratio with this interval is not supported, or None."""
    if iv is None:
        return None
    lo, hi = iv
    if lo <= 1.0 <= hi:
        return f"its interval [{lo:.2f}, {hi:.2f}] holds 1"
    if lo > 0 and hi / lo > RATIO_SPAN_MAX:
        return f"its interval [{lo:.2f}, {hi:.2f}] spans {hi / lo:.1f}x (supported: at most {RATIO_SPAN_MAX}x)"
    return None


def two_pass_flag(iv: Optional[Interval]) -> Optional[str]:
    """Why an ``(atlas - floor) / two_pass`` with this interval is not supported, or None."""
    if iv is None:
        return None
    lo, hi = iv
    if hi - lo > TWO_PASS_WIDTH_MAX:
        return (f"its interval [{lo:.2f}, {hi:.2f}] is {hi - lo:.2f} two-passes wide "
                f"(supported: at most {TWO_PASS_WIDTH_MAX})")
    return None


def mark(text: str, flagged: bool) -> str:
    return text + FLAG if flagged else text


QUIET_LINE = ("machine: quiet by the benchmark's checks (load against cores, CPU waits, the floor's spread, "
              "the ceiling against its usual value)")
NOT_QUIET_WHY = "the run's times were shared with other work or disturbed"
NOT_QUIET_HEAD = f"machine: NOT QUIET, {NOT_QUIET_WHY}:"
FLAG_RULE = (f"a step-time ratio whose interval over the rounds (over p20-p80 with one round) holds 1 or spans more "
             f"than {RATIO_SPAN_MAX}x; an (atlas-floor)/two_pass whose interval is wider than {TWO_PASS_WIDTH_MAX}")
FLAG_LEGEND = (f"{FLAG}: not supported by this run's own spread ({FLAG_RULE}): rerun on a quiet machine, "
               "with more --rounds")
