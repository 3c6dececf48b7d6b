"""``python -m bench --rounds R``: rows of one run pooled per job, and (atlas - floor) / two_pass
taken per round (each round's own copy bandwidth), then its median; and one real run of the CLI
with two rounds on a tiny tower, read back through the table and the README report."""
from __future__ import annotations

import json

from bench import summary
from bench.cli import main as bench_main
from bench.report import markdown

N, PARAMS, STORAGE = 2, 1000, "float16"


def _row(method, rnd, step_ms, run="r1", **kw):
    row = dict(method=method, round=rnd, run=run, step_ms=step_ms, step_ms_p20=step_ms, step_ms_p80=step_ms,
               peak_bytes=100 + rnd, oom=False)
    if method == "ceiling":
        row.update(step_ms=None, copy_gbps=kw.pop("copy"))
    else:
        row.update(model="m", batch=4, precision="fp32")
    if method == "atlas":
        row.update(n_task_vectors=N, storage=STORAGE, partitions=1, backend="cuda", adapted_params=PARAMS)
    row.update(kw)
    return row


def test_rounds_pool_steps_and_pair_the_two_pass_ratio():
    # two passes over N float16 slabs: 8000 bytes; at 4e-6 GB/s (round 1) 2000 ms, at 8e-6 1000 ms
    rows = [
        _row("ceiling", 1, None, copy=4e-6), _row("floor", 1, 100.0, step_times_ms=[90.0, 100.0, 110.0]),
        _row("atlas", 1, 300.0, step_times_ms=[290.0, 300.0, 310.0]),
        _row("ceiling", 2, None, copy=8e-6), _row("floor", 2, 200.0, step_times_ms=[200.0, 200.0, 200.0]),
        _row("atlas", 2, 900.0, step_times_ms=[900.0, 900.0, 900.0]),
        _row("ceiling", 3, None, copy=8e-6), _row("floor", 3, 150.0, step_times_ms=[150.0, 150.0, 150.0]),
        _row("atlas", 3, 350.0, step_times_ms=[350.0, 350.0, 350.0]),
    ]
    m = {r["method"]: r for r in summary.merged(rows)}
    assert m["atlas"]["rounds"] == 3 and m["atlas"]["step_ms"] == 350.0  # median of the 9 pooled steps
    assert m["atlas"]["peak_bytes"] == 103 and m["ceiling"]["copy_gbps"] == 8e-6
    (d,) = summary.ratios(rows)
    # per round: (300 - 100) / 2000 = 0.1, (900 - 200) / 1000 = 0.7, (350 - 150) / 1000 = 0.2
    assert [round(v, 6) for v in d["two_pass_rounds"]] == [0.1, 0.7, 0.2]
    assert abs(d["(atlas-floor)/two_pass"] - 0.2) < 1e-12
    assert d["atlas/floor"] == 350.0 / 150.0  # the pooled medians


def test_an_older_run_of_the_same_job_is_not_pooled():
    rows = [_row("floor", 1, 500.0, run="old"), _row("floor", 1, 100.0, run="new"),
            _row("floor", 2, 120.0, run="new")]
    (m,) = summary.merged(rows)
    assert m["rounds"] == 2 and m["step_ms"] == 110.0


def test_cli_two_rounds_on_a_tiny_tower(tmp_path, capsys):
    out = tmp_path / "r.jsonl"
    rc = bench_main(["--models", "ViT-tiny", "--n", "2", "--batch", "2", "--storage", "float16",
                     "--only", "ceiling,floor,atlas:torch", "--steps", "2", "--warmup", "1", "--rounds", "2",
                     "--no-profile", "--no-plot", "--in-process", "--out", str(out)])
    assert rc == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted((r["method"], r["round"]) for r in rows) == [
        ("atlas", 1), ("atlas", 2), ("ceiling", 1), ("ceiling", 2), ("floor", 1), ("floor", 2)]
    assert len({r["run"] for r in rows}) == 1 and all(len(r["step_times_ms"]) == 2 for r in rows if r["step_ms"])
    printed = capsys.readouterr().out
    assert "2 rounds" in printed and "(a-f)/2pass" in printed
    assert "| ViT-tiny |" in markdown(out)


def test_version_commit_is_only_this_projects_own(tmp_path, monkeypatch):
    """A copy of the tree inside another git repository must not report that repository's commit
    (the H200 rows once said 0.1.0+g<a foreign commit>-dirty); ATLAS_KERNELS_COMMIT still overrides."""
    import subprocess

    from bench import env

    outer = tmp_path / "outer"
    inner = outer / "copy_of_project"
    inner.mkdir(parents=True)
    subprocess.run(["git", "init", "-q", str(outer)], check=True)
    subprocess.run(["git", "-C", str(outer), "-c", "user.email=a@b", "-c", "user.name=a", "commit", "-q",
                    "--allow-empty", "-m", "foreign"], check=True)
    monkeypatch.delenv("ATLAS_KERNELS_COMMIT", raising=False)
    monkeypatch.setattr(env, "REPO_ROOT", inner)
    assert env.git_commit() is None
    monkeypatch.setenv("ATLAS_KERNELS_COMMIT", "abc1234")
    assert env.git_commit() == "abc1234"
