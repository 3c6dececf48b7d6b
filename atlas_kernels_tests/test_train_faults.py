"""Training faults: divergence stops the run (non-zero exit, last finite checkpoint kept),
non-finite inputs are refused, resume checks content, and CLI input errors are one line, exit 2.

A tiny toy setup of its own (fine-tuned for 2 steps only: these tests need finite task vectors,
not useful ones)."""
import functools
import json
from pathlib import Path

import pytest
import torch

import atlas_kernels as ak
from atlas_kernels.train import ConfigError, TrainConfig, run, setup, toy
from atlas_kernels.train.cli import main as cli_main
from atlas_kernels.train.faults import DivergedError, skip_report

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _digest_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("ATLAS_KERNELS_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    torch.set_num_threads(1)
    return toy.make_demo(tmp_path_factory.mktemp("toyf"), train_per_class=4, val_per_class=2, finetune_steps=2)


def _cfg(demo, out, **kw):
    d = demo["data"]["shapes"]
    base = dict(task_vectors=str(demo["task_vectors"]), out=str(out), objective="fewshot",
                train=[str(d["train"])], val=[str(d["val"])], model_config=str(demo["model_config"]),
                weights=str(demo["pretrained"]), templates="photo", workers=0, quiet=True, epochs=1,
                batch_size=4, lr=0.05)
    base.update(kw)
    return TrainConfig(**base)


def _args(cfg: TrainConfig, *extra):
    return ["--objective", cfg.objective, "--task-vectors", cfg.task_vectors, "--out", cfg.out,
            "--train", *cfg.train, "--val", *cfg.val, "--model-config", cfg.model_config,
            "--templates", "photo", "--workers", "0", "--quiet", "--epochs", "1", "--batch-size", "4",
            *(["--weights", cfg.weights] if cfg.weights else []), *extra]


def test_divergence_stops_and_keeps_the_last_finite_checkpoint(demo, tmp_path):
    out = tmp_path / "o"
    # lr 1e30: step 1 moves every coefficient by ~1e30 (still finite; checkpointed by --save-every 1),
    # the forward of step 2 overflows.
    with pytest.raises(DivergedError, match=r"optimizer step 2 .*the loss is nan.*learning rate") as e:
        run(_cfg(demo, out, lr=1e30, save_every=1))
    assert "checkpoint.pt is kept" in str(e.value)
    ck = torch.load(str(out / "checkpoint.pt"), weights_only=True)
    assert ck["global_step"] == 1
    assert all(torch.isfinite(v).all() for v in ck["coefficients"].values())
    assert not (out / "coefficients.safetensors").exists() and not (out / "metrics.json").exists()
    # the CLI: non-zero exit (3), one line
    assert cli_main(_args(_cfg(demo, tmp_path / "c"), "--lr", "1e30")) == 3


def test_nonfinite_inputs_are_refused(demo, tmp_path):
    from safetensors.torch import load_file, save_file

    sd = load_file(str(demo["pretrained"]))
    k = next(k for k in sd if k.startswith("visual.") and sd[k].dim() == 2)
    sd[k] = sd[k].clone()
    sd[k][0, 0] = float("inf")
    w = tmp_path / "inf.safetensors"
    save_file(sd, str(w))
    with pytest.raises(ConfigError, match=rf"--weights .*{k.replace('.', '[.]')}.*NaN/inf"):
        setup(_cfg(demo, tmp_path / "o", weights=str(w)))
    # a checkpoint holding NaN coefficients
    run(_cfg(demo, tmp_path / "a", stop_after_steps=1, epochs=2))
    ckp = tmp_path / "a" / "checkpoint.pt"
    ck = torch.load(str(ckp), weights_only=True)
    name = next(iter(ck["coefficients"]))
    ck["coefficients"][name][0] = float("nan")
    torch.save(ck, str(ckp))
    with pytest.raises(ConfigError, match=r"resume file .*NaN/inf"):
        setup(_cfg(demo, tmp_path / "a", epochs=2, resume=str(ckp)))


def test_resume_with_other_task_vector_content_is_refused(demo, tmp_path):
    out = tmp_path / "a"
    tv_path = tmp_path / "tvs.safetensors"
    tvs = ak.TaskVectors.load(str(demo["task_vectors"]))
    tvs.save(str(tv_path))
    run(_cfg(demo, out, task_vectors=str(tv_path), stop_after_steps=1, epochs=2))
    # same names, blocks, sizes and file name; other values
    slabs = {b: tvs[b] * 2 for b in tvs.blocks}
    ak.TaskVectors(slabs, names=tvs.names).save(str(tv_path))
    with pytest.raises(ConfigError, match=r"another run(.|\n)*task_vectors"):
        setup(_cfg(demo, out, task_vectors=str(tv_path), epochs=2, resume=str(out / "checkpoint.pt")))


def test_grad_scaler_skips_are_reported(demo, tmp_path, monkeypatch, capsys):
    # a loss scale that overflows every fp16 gradient: GradScaler skips every step
    monkeypatch.setattr(torch.amp, "GradScaler", functools.partial(torch.amp.GradScaler, init_scale=2.0 ** 120))
    res = run(_cfg(demo, tmp_path / "o", precision="fp16", quiet=False))
    assert res["grad_scaler"]["skipped_steps"] == res["steps"] > 0
    assert "GradScaler skipped" in capsys.readouterr().err
    assert skip_report(1, 10) is None and skip_report(5, 10)["fraction"] == 0.5


@pytest.mark.parametrize("case", ["other_model", "string_width", "patch_size_0", "absurd_width", "out_is_file",
                                  "missing_keys"])
def test_cli_input_errors_are_one_line_exit_2(demo, tmp_path, capsys, case):
    from safetensors.torch import load_file, save_file

    cfg = _cfg(demo, tmp_path / "o")
    extra = []
    if case in ("other_model", "missing_keys"):
        sd = load_file(str(demo["pretrained"]))
        if case == "other_model":
            sd["visual.conv1.weight"] = torch.zeros(8, 3, 4, 4)
        else:
            sd.pop("visual.proj")
        w = tmp_path / "w.safetensors"
        save_file(sd, str(w))
        cfg.weights = str(w)
        want = "visual.conv1.weight" if case == "other_model" else "missing keys"
    elif case == "out_is_file":
        Path(cfg.out).write_text("x")
        want = "is not a folder"
    else:
        mc = json.loads(Path(demo["model_config"]).read_text())
        mc["vision_cfg"]["width"] = {"string_width": "64", "absurd_width": 10 ** 9}.get(case, 64)
        if case == "patch_size_0":
            mc["vision_cfg"]["patch_size"] = 0
        p = tmp_path / f"bad-{case.replace('_', '-')}.json"
        p.write_text(json.dumps(mc))
        cfg.model_config = str(p)
        want = "patch_size" if case == "patch_size_0" else "width"
    assert cli_main(_args(cfg, *extra)) == 2
    err = capsys.readouterr().err
    assert want in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
