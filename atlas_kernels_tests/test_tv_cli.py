"""python -m atlas_kernels.task_vectors build / convert / info."""
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import atlas_kernels as ak
from atlas_kernels.task_vectors.cli import main

REPO = Path(__file__).resolve().parents[1]


def _model(seed):
    torch.manual_seed(seed)
    m = torch.nn.Module()
    m.visual = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.LayerNorm(7))
    m.text = torch.nn.Linear(3, 3)
    return m


def _sd(m):
    return {k: v.detach().clone().contiguous() for k, v in m.state_dict().items()}


@pytest.fixture
def ckpts(tmp_path):
    pre, a, b = _sd(_model(0)), _sd(_model(1)), _sd(_model(2))
    save_file(pre, str(tmp_path / "pre.safetensors"))
    save_file(a, str(tmp_path / "cars.safetensors"))
    torch.save(b, str(tmp_path / "dtd.pt"))  # a plain state dict in a torch file is fine too
    return tmp_path, pre, [a, b]


def test_build(ckpts, capsys):
    d, pre, fts = ckpts
    out = d / "tvs.safetensors"
    rc = main(["build", "--pretrained", str(d / "pre.safetensors"), "--finetuned",
               str(d / "cars.safetensors"), str(d / "dtd.pt"), "--out", str(out),
               "--prefix", "visual."])
    assert rc == 0
    assert "2 task vectors" in capsys.readouterr().out
    tvs = ak.TaskVectors.load(str(out))
    assert tvs.names == ["cars", "dtd"]
    assert sorted(tvs.blocks) == ["0.bias", "0.weight", "1.bias", "1.weight"]
    for i, ft in enumerate(fts):
        torch.testing.assert_close(tvs.dense("0.weight", i), ft["visual.0.weight"] - pre["visual.0.weight"])

    rc = main(["build", "--pretrained", str(d / "pre.safetensors"), "--finetuned",
               str(d / "cars.safetensors"), "--out", str(d / "bf.safetensors"), "--prefix",
               "visual.", "--storage", "bfloat16", "--names", "x"])
    assert rc == 0
    tvs = ak.TaskVectors.load(str(d / "bf.safetensors"))
    assert tvs.names == ["x"] and tvs["0.weight"].dtype == torch.bfloat16
    assert main(["info", str(d / "bf.safetensors")]) == 0
    assert "0.weight" in capsys.readouterr().out


def test_build_errors(ckpts, capsys):
    d, _, _ = ckpts
    rc = main(["build", "--pretrained", str(d / "pre.safetensors"), "--finetuned",
               str(d / "cars.safetensors"), "--out", str(d / "o.safetensors"), "--names", "a", "b"])
    assert rc == 2 and "--names has 2 names for 1" in capsys.readouterr().err
    rc = main(["build", "--pretrained", str(d / "nope.safetensors"), "--finetuned",
               str(d / "cars.safetensors"), "--out", str(d / "o.safetensors")])
    assert rc == 2 and "nope.safetensors" in capsys.readouterr().err
    # a pickled whole module is read without running code (no opt-in needed)
    torch.save(_model(3), str(d / "module.pt"))
    rc = main(["build", "--pretrained", str(d / "pre.safetensors"), "--finetuned",
               str(d / "module.pt"), "--out", str(d / "o.safetensors"), "--prefix", "auto"])
    assert rc == 0 and ak.TaskVectors.load(str(d / "o.safetensors")).names == ["module"]
    # a file that holds no state dict is refused, naming what it holds
    torch.save(print, str(d / "fn.pt"))
    rc = main(["build", "--pretrained", str(d / "pre.safetensors"), "--finetuned",
               str(d / "fn.pt"), "--out", str(d / "o2.safetensors")])
    err = capsys.readouterr().err
    assert rc == 2 and "builtins.print" in err and not (d / "o2.safetensors").exists()


def test_convert(tmp_path, capsys):
    m = _model(4)
    torch.save(m, str(tmp_path / "old.pt"))  # as the task-vector papers released them
    dst = tmp_path / "new.safetensors"
    rc = main(["convert", str(tmp_path / "old.pt"), str(dst)])
    assert rc == 0 and dst.is_file()
    got = load_file(str(dst))
    assert set(got) == set(m.state_dict())
    for k, v in m.state_dict().items():
        assert torch.equal(got[k], v)
    rc = main(["convert", str(tmp_path / "old.pt"), str(tmp_path / "vis.safetensors"), "--prefix", "auto"])
    assert rc == 0 and set(load_file(str(tmp_path / "vis.safetensors"))) == {"0.weight", "0.bias", "1.weight", "1.bias"}
    # the converted file now builds task vectors
    assert main(["build", "--pretrained", str(dst), "--finetuned", str(dst), "--out",
                 str(tmp_path / "t.safetensors"), "--prefix", "visual."]) == 0
