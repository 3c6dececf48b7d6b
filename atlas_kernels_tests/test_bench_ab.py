"""``python -m bench.ab``'s arithmetic: per-job ratios new / base over the rounds, jobs measured on
one side only or with an error left out, fields one side lacks reported; and the flags it sets
itself refused. (Running two checkouts is rehearsed by hand: it takes minutes.)"""
import pytest

from bench import ab


def _row(method, step_ms, **extra):
    row = {"model": "ViT-tiny", "n_task_vectors": 2, "batch": 2, "precision": "fp32", "storage": "float32",
           "partitions": 1, "method": method, "backend": "torch" if method == "atlas" else None, "step_ms": step_ms}
    row.update(extra)
    return row


def test_ratios_per_job_over_rounds_and_fields_one_side_lacks():
    rounds = [
        {"base": [_row("atlas", 10.0), _row("naive", 40.0), _row("floor", 5.0)],
         "new": [_row("atlas", 12.0), _row("naive", 30.0, extra_field=1), _row("floor", 5.0, error="boom")]},
        {"new": [_row("atlas", 9.0), _row("naive", 50.0)],
         "base": [_row("atlas", 10.0), _row("naive", 25.0), _row("merge_once", 7.0)]},
    ]
    res = ab.compare(rounds)
    by_method = {k[6]: v for k, v in res["ratios"].items()}
    assert by_method == {"atlas": [pytest.approx(1.2), pytest.approx(0.9)],
                         "naive": [pytest.approx(0.75), pytest.approx(2.0)]}
    assert res["only_new"] == ["error", "extra_field"] and res["only_base"] == []  # an error is a field too
    text = ab.report(res, "abc1234", "work tree")
    atlas_line = next(line for line in text.splitlines() if line.strip().startswith("atlas:torch"))
    assert "1.050 [0.900, 1.200]" in atlas_line and "(2 rounds)" in atlas_line
    # geometric mean of the medians 1.05 (atlas) and 1.375 (naive)
    assert f"{(1.05 * 1.375) ** 0.5:.3f} (2 jobs)" in text
    assert "fields only in the new rows: error, extra_field" in text


@pytest.mark.parametrize("flag", ["--out=x.jsonl", "--no-plot", "--resume"])
def test_refuses_the_flags_it_sets_for_each_side(flag, capsys):
    with pytest.raises(SystemExit):
        ab.main(["--base", "HEAD", "--", "--models", "ViT-tiny", flag])
    assert "bench.ab sets these" in capsys.readouterr().err


@pytest.mark.parametrize("given, expected", [([], ["--rounds", "1"]), (["--rounds", "2"], ["--rounds", "2"])])
def test_each_side_runs_one_round_unless_told(monkeypatch, tmp_path, given, expected):
    """bench.ab's repeats are its rounds: a side runs ``--rounds 1`` (a CPU run's default is 3, of which
    ``compare`` would keep only the last) unless the bench arguments say otherwise."""
    seen = []

    class Done:
        returncode, stderr = 0, ""

    monkeypatch.setattr(ab.subprocess, "run", lambda cmd, **kw: seen.append(cmd) or Done())
    ab.run_side(ab.REPO_ROOT, None, ["--models", "ViT-tiny", *given], tmp_path / "x.jsonl", print)
    (cmd,) = seen
    assert [a for i, a in enumerate(cmd) if a == "--rounds" or (i and cmd[i - 1] == "--rounds")] == expected
