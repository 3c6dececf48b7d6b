"""bench/quiet.py on synthetic rows (no timing): a quiet run prints no flag in the table, the report
or the plot; a loaded run (load above the cores, the floor's steps spread, a slow ceiling) is said in
all three, and every ratio its spread does not support is marked."""
import json

import pytest

from bench import quiet, summary
from bench.plot import plot, warning_lines
from bench.report import markdown

N, PARAMS, STORAGE = 8, 10_000_000, "float32"  # two passes: 640 MB; at 20 GB/s, 32 ms


def _rows(floor_ms, atlas_ms, naive_ms, copy, load=(1.6, 1.7), cpu_wait=0.01, run="2026-12-04T10:00:00Z",
          spread=0.01, cores=2, cpu_model="Test CPU"):
    """One run: per round a ceiling, a floor, naive and atlas (torch), each with three timed steps
    ``step * (1 - spread, 1, 1 + spread)``; ``load``/``cpu_wait``: one value for every row, or one per round."""
    rows = []
    for i, (f, a, nv, c) in enumerate(zip(floor_ms, atlas_ms, naive_ms, copy), start=1):
        la = load[i - 1] if isinstance(load[0], (list, tuple)) else load
        cw = cpu_wait[i - 1] if isinstance(cpu_wait, (list, tuple)) else cpu_wait
        machine = dict(device="cpu", cpu_model=cpu_model, cores=cores, threads=2, loadavg_1m=list(la), cpu_wait=cw,
                       run=run, round=i, oom=False)
        rows.append(dict(machine, method="ceiling", copy_gbps=c, matmul_tflops=0.3, step_ms=None))
        for method, ms in (("floor", f), ("naive", nv), ("atlas", a)):
            steps = [ms * (1 - spread), ms, ms * (1 + spread)]
            r = dict(machine, method=method, model="ViT-B-32", batch=8, precision="fp32", step_ms=ms,
                     step_ms_p20=ms * (1 - 0.6 * spread), step_ms_p80=ms * (1 + 0.6 * spread), step_times_ms=steps,
                     peak_bytes=10**9, loss0=None if method == "floor" else 2.5)
            if method != "floor":
                r.update(n_task_vectors=N, storage=STORAGE, partitions=1, adapted_params=PARAMS)
            if method == "atlas":
                r["backend"] = "torch"
            rows.append(r)
    return rows


QUIET = dict(floor_ms=[1000, 1010, 995], atlas_ms=[1040, 1050, 1035], naive_ms=[2000, 2020, 1990],
             copy=[20.0, 20.5, 19.8])
# the run: a slow spell on the floor's round, load average 3.2 to 7.3 on 2 cores
LOADED = dict(floor_ms=[6041, 1239, 2900], atlas_ms=[1500, 2600, 1480], naive_ms=[2100, 6000, 2500],
              copy=[6.0, 21.0, 9.0], load=[(7.3, 6.8), (3.2, 3.9), (5.0, 5.5)], cpu_wait=[0.6, 0.2, 0.5],
              spread=0.2)


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_quiet_run_prints_no_flag(tmp_path):
    rows = _rows(**QUIET)
    assert summary.machine_notes(rows) == []
    (d,) = summary.ratios(rows)
    assert d["flags"] == {} and d["loss0_mismatch"] == []
    table = summary.format_table(rows)
    assert quiet.QUIET_LINE in table and "NOT QUIET" not in table
    ratio_line = next(line for line in table.splitlines() if line.startswith("ViT-B-32") and "torch" in line
                      and "atlas" not in line)
    assert quiet.FLAG not in ratio_line, ratio_line
    path = _write(tmp_path / "quiet.jsonl", rows)
    md = markdown(path)
    assert "Not a quiet machine" not in md and f"{quiet.FLAG} |" not in md and "not supported" not in md
    assert warning_lines(path) == []
    png = plot(path)
    assert "NOT A QUIET" not in _png_description(png)


def test_loaded_run_is_said_in_table_report_and_plot(tmp_path):
    rows = _rows(**LOADED)
    notes = summary.machine_notes(rows)
    assert any("load average up to 7.3 on 2 cores" in n for n in notes), notes
    assert any("waited for a core during up to 60%" in n for n in notes), notes
    assert any(n.startswith("floor ViT-B-32 b8 fp32: its rounds' medians ranged 1239 to 6041 ms") for n in notes), notes
    assert any(n.startswith("ceiling copy moved between rounds") for n in notes), notes
    (d,) = summary.ratios(rows)
    assert set(d["flags"]) == {"atlas/naive", "atlas/floor", "(atlas-floor)/two_pass"}, d["flags"]
    assert "holds 1" in d["flags"]["atlas/floor"]  # rounds: 1500/6041 = 0.25, 2600/1239 = 2.1

    table = summary.format_table(rows)
    assert quiet.NOT_QUIET_HEAD in table and "load average up to 7.3" in table
    ratio_line = next(line for line in table.splitlines() if line.startswith("ViT-B-32") and " torch " in line
                      and "atlas" not in line)
    assert f"{d['atlas/floor']:.2f}{quiet.FLAG}" in ratio_line, ratio_line
    assert f"{d['(atlas-floor)/two_pass']:.2f}{quiet.FLAG}" in ratio_line, ratio_line
    assert "? atlas/floor" in table and quiet.FLAG_LEGEND in table

    path = _write(tmp_path / "loaded.jsonl", rows)
    md = markdown(path)
    assert md.startswith("> **Not a quiet machine**") and "load average up to 7.3" in md
    assert f"| {d['atlas/floor']:.2f}{quiet.FLAG} |" in md and "- atlas/floor = " in md
    warn = warning_lines(path)
    assert warn[0].startswith("NOT A QUIET MACHINE") and any("ratio(s) not supported" in w for w in warn)
    assert "NOT A QUIET MACHINE" in _png_description(plot(path))


def test_one_loaded_spell_is_enough(tmp_path):
    """Low load averages (a minute late) but CPU waits during one job's steps: not quiet."""
    rows = _rows(**dict(QUIET, cpu_wait=[0.01, 0.35, 0.01]))
    (note,) = summary.machine_notes(rows)
    assert "35%" in note and "4 of 12 measurements" in note  # round 2: its ceiling and three jobs


def test_one_round_uses_the_steps_p20_p80():
    """One round (a GPU run): the intervals come from p20-p80; narrow steps support the ratios, wide
    ones do not."""
    narrow = _rows(floor_ms=[10.0], atlas_ms=[12.0], naive_ms=[40.0], copy=[400.0], load=(0.1, 0.1))
    (d,) = summary.ratios(narrow)
    assert d["flags"] == {} and d["intervals"]["atlas/floor"] == pytest.approx((11.928 / 10.06, 12.072 / 9.94))
    wide = _rows(floor_ms=[10.0], atlas_ms=[12.0], naive_ms=[40.0], copy=[400.0], load=(0.1, 0.1), spread=0.3)
    (d,) = summary.ratios(wide)
    assert "holds 1" in d["flags"]["atlas/floor"]  # [12 * 0.82 / 11.8, 12 * 1.18 / 8.2] = [0.83, 1.73]


def test_ratio_rules():
    assert "holds 1" in quiet.ratio_flag((0.9, 1.1))
    assert "spans 2.0x" in quiet.ratio_flag((0.4, 0.8))
    assert quiet.ratio_flag((0.45, 0.55)) is None and quiet.ratio_flag(None) is None
    assert "23.00 two-passes wide" in quiet.two_pass_flag((-20.0, 3.0))
    assert quiet.two_pass_flag((0.9, 1.5)) is None


def test_ceiling_and_floor_against_this_hosts_usual_values():
    earlier = _rows(**dict(QUIET, copy=[22.0, 21.0, 23.0]), run="2026-12-03T10:00:00Z")
    slow = _rows(**dict(QUIET, copy=[9.0, 9.5, 9.2], floor_ms=[1800, 1810, 1790], atlas_ms=[1900, 1905, 1895]))
    notes = summary.machine_notes(slow, history=earlier + slow)
    assert any(n.startswith("ceiling copy 9.2 GB/s, usual 22 on this host") for n in notes), notes
    assert any(n.startswith("floor ViT-B-32 b8 fp32: 1800 ms, usual 1000 ms") for n in notes), notes
    # another host's history, a later run, or a loaded earlier run set no usual value
    other = _rows(**dict(QUIET, copy=[22.0, 21.0, 23.0]), run="2026-12-03T10:00:00Z", cpu_model="Other CPU")
    later = _rows(**dict(QUIET, copy=[22.0, 21.0, 23.0]), run="2026-12-05T10:00:00Z")
    busy = _rows(**dict(QUIET, copy=[22.0, 21.0, 23.0]), run="2026-12-03T10:00:00Z", load=(4.0, 4.0))
    assert summary.machine_notes(slow, history=other + later + busy) == []


def test_loss0_mismatch_is_said():
    rows = _rows(**QUIET)
    for r in rows:
        if r["method"] == "naive":
            r["loss0"] = 2.6
    (d,) = summary.ratios(rows)
    assert d["loss0_mismatch"] == ["naive"]
    assert "! loss0 of naive 2.600000 differs from atlas's 2.500000" in summary.format_table(rows)
    for r in rows:  # under autocast each method composes in its own precision: shown, not compared
        r["precision"] = "bf16"
    (d,) = summary.ratios(rows)
    assert d["loss0"]["naive"] == 2.6 and d["loss0_mismatch"] == []


def _png_description(png) -> str:
    from PIL import Image

    with Image.open(png) as im:
        return im.text.get("Description", "")
