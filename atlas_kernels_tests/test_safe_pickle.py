"""The restricted reader runs nothing from a file: pickles whose ``__reduce__`` calls os.system,
exec, subprocess.Popen, getattr chains or torch.load itself are refused (or, inside a module,
recorded inert) at every entry point that reads a file; a marker file proves nothing ran."""
import functools
import json
import os
import pickle
import struct
import subprocess
import time

import pytest
import torch
from torch import nn

import atlas_kernels as ak
from atlas_kernels import safe_pickle


class Payload:
    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _u(s):  # BINUNICODE
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def getattr_chain(cmd):
    """``builtins.getattr(builtins.__import__('os'), 'system')(cmd)`` as raw pickle opcodes."""
    return (b"\x80\x02cbuiltins\ngetattr\ncbuiltins\n__import__\n" + _u("os") + b"\x85R" + _u("system")
            + b"\x86R" + _u(cmd) + b"\x85R.")


def attrgetter_chain(cmd):
    """``operator.attrgetter('system')(builtins.__import__('os'))(cmd)``."""
    return (b"\x80\x02coperator\nattrgetter\n" + _u("system") + b"\x85Rcbuiltins\n__import__\n" + _u("os")
            + b"\x85R\x85R" + _u(cmd) + b"\x85R.")


@pytest.fixture
def payloads(tmp_path):
    marker = tmp_path / "MARKER"
    other = tmp_path / "other.pt"
    torch.save(Payload(os.system, (f"touch {marker}",)), other)
    objs = {
        "os.system": Payload(os.system, (f"touch {marker}",)),
        "exec": Payload(exec, (f"open({str(marker)!r}, 'w').close()",)),
        "Popen": Payload(subprocess.Popen, (["touch", str(marker)],)),
        "torch.load": Payload(functools.partial(torch.load, weights_only=False), (str(other),)),
    }
    raw = {"getattr": getattr_chain(f"touch {marker}"), "attrgetter": attrgetter_chain(f"touch {marker}")}
    return marker, objs, raw


def _write_all(tmp_path, objs, raw):
    """Every payload as a zip torch file, a legacy torch file, a plain pickle, and inside a module."""
    files = {}
    for name, obj in objs.items():
        for fmt in ("zip", "legacy", "plain", "in_module"):
            p = tmp_path / f"{name}.{fmt}.pt"
            if fmt == "plain":
                with open(p, "wb") as fh:
                    pickle.dump(obj, fh)
            elif fmt == "in_module":
                m = nn.Linear(2, 3)
                m.extra = obj
                torch.save(m, p)
            else:
                torch.save(obj, p, _use_new_zipfile_serialization=fmt == "zip")
            files[p.name] = (p, fmt)
    for name, data in raw.items():
        p = tmp_path / f"{name}.plain.pt"
        p.write_bytes(data)
        files[p.name] = (p, "plain")
    return files


def test_the_payloads_are_live(payloads, tmp_path):
    """Sanity: an ordinary unpickler runs every payload (so the tests below can fail)."""
    marker, objs, raw = payloads
    blobs = [pickle.dumps(o) for o in objs.values()] + list(raw.values())
    for blob in blobs:
        pickle.loads(blob)
        for _ in range(100):
            if marker.exists():
                break
            time.sleep(0.02)
        assert marker.exists()
        marker.unlink()


def test_nothing_runs_at_any_entry_point(payloads, tmp_path, capsys):
    from atlas_kernels.task_vectors.cli import main as tv_main

    marker, objs, raw = payloads
    files = _write_all(tmp_path, objs, raw)
    good = tmp_path / "good.safetensors"
    from safetensors.torch import save_file

    save_file({"weight": torch.randn(3, 2), "bias": torch.randn(3)}, str(good))
    for name, (p, fmt) in files.items():
        if fmt == "in_module":  # the module's tensors come back; the payload stays a record
            sd = ak.load_state_dict_file(p)
            assert set(sd) == {"weight", "bias"}
            obj = safe_pickle.restricted_load(p)
            extra = obj.state["extra"]
            assert isinstance(extra, safe_pickle.Inert) and extra.how == "call", name
            continue
        with pytest.raises(ValueError, match="not a state dict|could not be read"):
            ak.load_state_dict_file(p)
        with pytest.raises(ValueError):
            ak.TaskVectors.from_checkpoints(good, [p])
        with pytest.raises(ValueError):
            ak.TaskVectors.from_checkpoints(p, [good], prefix="auto")
        with pytest.raises(ValueError):
            ak.load_head(p)
        with pytest.raises(ValueError):
            ak.convert_checkpoint(p, tmp_path / "out.safetensors")
        assert tv_main(["build", "--pretrained", str(good), "--finetuned", str(p), "--out",
                        str(tmp_path / "o.safetensors")]) == 2
        assert tv_main(["convert", str(p), str(tmp_path / "o.safetensors")]) == 2
        assert not marker.exists(), name
    err = capsys.readouterr().err
    for what in ("posix.system", "builtins.exec", "subprocess.Popen", "builtins.getattr", "operator.attrgetter",
                 "functools.partial"):
        assert what in err, what
    assert not (tmp_path / "o.safetensors").exists() and not (tmp_path / "out.safetensors").exists()
    assert not marker.exists()


def test_import_cli_and_train_cli_run_nothing(payloads, tmp_path, capsys):
    pytest.importorskip("open_clip")
    from PIL import Image

    from atlas_kernels.task_vectors.cli import main as tv_main
    from atlas_kernels.train.cli import main as train_main
    from atlas_kernels.train.model import build_model, register_model_config

    from .test_published_checkpoints import TINY

    marker, objs, raw = payloads
    evil = tmp_path / "evil.pt"
    torch.save(objs["os.system"], evil)
    root = tmp_path / "root"
    (root / "Cars").mkdir(parents=True)
    with open(root / "zeroshot.pt", "wb") as fh:
        fh.write(getattr_chain(f"touch {marker}"))
    torch.save(objs["Popen"], root / "Cars" / "finetuned.pt")
    cfg = tmp_path / "tiny-vit.json"
    cfg.write_text(json.dumps(TINY))
    assert tv_main(["import", str(root), "--model-config", str(cfg), "--out", str(tmp_path / "t.safetensors")]) == 2
    assert "builtins.getattr" in capsys.readouterr().err

    name = register_model_config(cfg)
    model = build_model(name)
    pre = {k: v.detach().clone() for k, v in model.visual.state_dict().items()}
    tvs = ak.TaskVectors.from_state_dicts(pre, [{k: v + 0.01 for k, v in pre.items()}])
    tvs.save(str(tmp_path / "tvs.safetensors"))
    data = tmp_path / "data"
    for split in ("train", "val"):
        for c in ("a", "b"):
            (data / split / c).mkdir(parents=True)
            Image.new("RGB", (32, 32), (200 if c == "a" else 20, 90, 90)).save(data / split / c / "0.png")
    base = ["--model-config", str(cfg), "--task-vectors", str(tmp_path / "tvs.safetensors"),
            "--objective", "fewshot", "--train", str(data / "train"), "--val", str(data / "val"),
            "--epochs", "1", "--batch-size", "2", "--workers", "0", "--quiet"]
    assert train_main(base + ["--weights", str(evil), "--out", str(tmp_path / "r1")]) == 2
    assert "posix.system" in capsys.readouterr().err
    assert train_main(base + ["--head", str(evil), "--out", str(tmp_path / "r2")]) == 2
    assert "posix.system" in capsys.readouterr().err
    assert not marker.exists()


def test_limits_against_hostile_sizes(tmp_path):
    # a tensor that views far more elements than its storage holds (stride 0)
    t = torch.zeros(1).expand(1 << 22)
    torch.save({"w": t}, tmp_path / "expand.pt")
    with pytest.raises(safe_pickle.RefusedPickle, match="expand past"):
        safe_pickle.restricted_load(tmp_path / "expand.pt")
    # a legacy file whose storages claim more bytes than the file has
    torch.save({"w": torch.zeros(1000)}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    data = (tmp_path / "legacy.pt").read_bytes()
    needle = struct.pack("<H", 1000)  # numel as BININT2 in the persistent id
    assert data.count(b"M" + needle) >= 1
    (tmp_path / "big.pt").write_bytes(data.replace(b"M" + needle, b"J" + struct.pack("<i", 1 << 30), 1))
    with pytest.raises(safe_pickle.RefusedPickle, match="more than the file"):
        safe_pickle.restricted_load(tmp_path / "big.pt")
    # a bare function, and a module without tensors, are refused naming what they hold
    torch.save(os.path.join, tmp_path / "fn.pt")
    with pytest.raises(ValueError, match=r"posixpath\.join \(a class or function"):
        ak.load_state_dict_file(tmp_path / "fn.pt")


def test_find_tower_prefix():
    from atlas_kernels.checkpoints import find_tower_prefix, select_tower

    t = torch.zeros(1)
    assert find_tower_prefix({"visual.conv1.weight": t, "token_embedding.weight": t}) == "visual."
    assert find_tower_prefix({"model.visual.proj": t, "model.logit_scale": t}) == "model.visual."
    assert find_tower_prefix({"module.model.visual.proj": t}) == "module.model.visual."
    assert find_tower_prefix({"conv1.weight": t, "class_embedding": t}) == ""
    assert find_tower_prefix({"avisual.x": t, "conv1.weight": t}) == ""  # 'visual.' must start a key part
    with pytest.raises(ValueError, match="several image towers"):
        find_tower_prefix({"a.visual.x": t, "b.visual.x": t})
    with pytest.raises(ValueError, match="no image tower"):
        find_tower_prefix({"encoder.layer.0.weight": t})
    kept, dropped, used = select_tower({"model.visual.proj": t, "model.logit_scale": t}, "auto")
    assert used == "model.visual." and list(kept) == ["proj"] and list(dropped) == ["model.logit_scale"]
