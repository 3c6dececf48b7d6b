"""Fault injection: writers killed mid-write never destroy the previous good file.

Two ways of dying: a writer that raises half-way (monkeypatched: the serialiser writes half its
bytes and raises, or the atomic protocol fails after the data is written), and a real process
killed with SIGKILL while it rewrites every kind of file in a loop. Each writer starts from an
existing good file, which must afterwards be intact (or, after a kill, be either the old file or
a complete new one); temporary leftovers are never mistaken for the file and are cleaned up."""
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

import atlas_kernels as ak
from atlas_kernels import _io
from atlas_kernels_tests._util import make_tiny_vit

REPO = Path(__file__).resolve().parents[1]


class Crash(Exception):
    pass


def _half_writer(real):
    """A stand-in for a serialiser taking (obj, path, ...): writes half of the real bytes, raises."""
    def fake(obj, path, *a, **k):
        real(obj, path, *a, **k)
        data = Path(path).read_bytes()
        Path(path).write_bytes(data[: len(data) // 2])
        raise Crash("killed half-way")
    return fake


def _tiny_patched():
    m = make_tiny_vit("cpu")
    pre = {k: v.detach().clone() for k, v in m.named_parameters()}
    ft = {k: v + 0.01 for k, v in pre.items()}
    ak.patch(m, ak.TaskVectors.from_state_dicts(pre, [ft], names=["t"]), backend="torch")
    return m


def _writers(tmp_path):
    """name -> (path, write(version)); version 0 writes the good file."""
    from atlas_kernels.train.heatmap import save_heatmap
    from atlas_kernels.train.loop import export_merged

    m = _tiny_patched()

    def coefs(v):
        with torch.no_grad():
            for c in ak.coefficients(m).values():
                c.fill_(float(v))
        ak.save_coefficients(m, tmp_path / "coef.safetensors")

    def merged(v):
        mm = _tiny_patched()
        with torch.no_grad():
            for c in ak.coefficients(mm).values():
                c.fill_(float(v))
        export_merged(types.SimpleNamespace(model=types.SimpleNamespace(visual=mm, state_dict=mm.state_dict),
                                            tower=mm, fingerprint={"model": "tiny"}), tmp_path / "merged.safetensors")

    def peft(v):
        f = {"fc.weight": (torch.full((2, 3), float(v)), torch.ones(4, 2))}
        ak.write_peft_adapter(tmp_path / "adapter", f, r=2, lora_alpha=float(v + 1), target_modules=["fc"])

    return {
        "metrics.json": (tmp_path / "metrics.json",
                         lambda v: _io.atomic_write_json(tmp_path / "metrics.json", {"v": v})),
        "checkpoint": (tmp_path / "checkpoint.pt",
                       lambda v: _io.atomic_torch_save({"v": torch.full((64,), float(v))}, tmp_path / "checkpoint.pt")),
        "coefficients": (tmp_path / "coef.safetensors", coefs),
        "task vectors": (tmp_path / "tv.safetensors", lambda v: ak.TaskVectors(
            {"w": torch.full((1, 8, 8), float(v))}, names=["t"]).save(tmp_path / "tv.safetensors")),
        "convert": (tmp_path / "conv.safetensors", lambda v: (
            torch.save({"w": torch.full((4,), float(v))}, tmp_path / f"src{v}.pt"),
            ak.convert_checkpoint(tmp_path / f"src{v}.pt", tmp_path / "conv.safetensors"))),
        "merged": (tmp_path / "merged.safetensors", merged),
        "heatmap": (tmp_path / "coef.png", lambda v: save_heatmap({"b": torch.full((2,), float(v))},
                                                                   tmp_path / "coef.png", names=["x", "y"])),
        "peft adapter": (tmp_path / "adapter", peft),
        "bench jsonl": (tmp_path / "rows.jsonl", lambda v: _io.atomic_append_line(tmp_path / "rows.jsonl",
                                                                                  json.dumps({"v": v}))),
    }


def _snapshot(path: Path):
    if path.is_dir():
        return {p.name: p.read_bytes() for p in sorted(path.iterdir())}
    return path.read_bytes()


@pytest.mark.parametrize("how", ["serialiser", "fsync", "rename"])
def test_a_writer_raising_half_way_leaves_the_good_file(tmp_path, monkeypatch, how):
    pytest.importorskip("matplotlib")
    writers = _writers(tmp_path)
    for name, (path, write) in writers.items():
        write(0)
        good = _snapshot(path)
        with monkeypatch.context() as mp:
            if how == "serialiser":
                import safetensors.torch

                mp.setattr(safetensors.torch, "save_file", _half_writer(safetensors.torch.save_file))
                mp.setattr(torch, "save", _half_writer(torch.save) if name != "convert" else torch.save)
                real_fdopen = os.fdopen

                def fdopen(fd, *a, **k):  # text/bytes writers: half the bytes, then die
                    fh = real_fdopen(fd, *a, **k)
                    real_write = fh.write

                    def write_half(data):
                        real_write(data[: len(data) // 2])
                        raise Crash("killed half-way")
                    fh.write = write_half
                    return fh
                mp.setattr(_io.os, "fdopen", fdopen)
                if name == "peft adapter":  # several files: die after the first
                    real_open = open
                    count = {"n": 0}

                    def open_(p, mode="r", *a, **k):
                        fh = real_open(p, mode, *a, **k)
                        if "w" in mode and _io.TMP_MARK in str(p):
                            count["n"] += 1
                            if count["n"] == 2:
                                fh.close()
                                raise Crash("killed between the two files")
                        return fh
                    mp.setattr("builtins.open", open_)
            elif how == "fsync":
                mp.setattr(_io.os, "fsync", lambda fd: (_ for _ in ()).throw(Crash("killed before the rename")))
            else:
                mp.setattr(_io.os, "replace", lambda a, b: (_ for _ in ()).throw(Crash("killed at the rename")))
                mp.setattr(_io.os, "rename", lambda a, b: (_ for _ in ()).throw(Crash("killed at the rename")))
                mp.setattr(_io, "_rename_exchange", lambda a, b: (_ for _ in ()).throw(Crash("killed at the rename")))
            with pytest.raises(Crash):
                write(1)
        assert _snapshot(path) == good, f"{name}: the good file was damaged by a writer dying ({how})"
        leftovers = [p.name for p in tmp_path.iterdir() if _io.TMP_MARK in p.name]
        assert not leftovers, f"{name}: temporary files left behind: {leftovers}"
    # the good files still load
    torch.load(str(tmp_path / "checkpoint.pt"), weights_only=True)
    ak.TaskVectors.load(str(tmp_path / "tv.safetensors"))
    ak.read_peft_adapter(tmp_path / "adapter")


_CHILD = r"""
import json, os, sys, torch
import atlas_kernels as ak
from atlas_kernels import _io
d = sys.argv[1]
big = torch.arange(1 << 21, dtype=torch.float32)
def write(v):
    ak.TaskVectors({"w": (big + v).reshape(1, -1)}, names=[f"v{v}"]).save(os.path.join(d, "tv.safetensors"))
    _io.atomic_write_json(os.path.join(d, "metrics.json"), {"v": v, "pad": "x" * (1 << 20)})
    _io.atomic_torch_save({"v": big + v}, os.path.join(d, "checkpoint.pt"))
    f = {"fc.weight": (torch.full((2, 1 << 16), float(v)), torch.ones(4, 2))}
    ak.write_peft_adapter(os.path.join(d, "adapter"), f, r=2, lora_alpha=float(v + 1), target_modules=["fc"])
    _io.atomic_append_line(os.path.join(d, "rows.jsonl"), json.dumps({"v": v, "pad": "y" * 4096}))
write(0)
print("ready", flush=True)
v = 1
while True:
    write(v)
    v += 1
"""


def _check_consistent(d: Path):
    tv = ak.TaskVectors.load(str(d / "tv.safetensors"))
    v = int(tv.names[0][1:])
    big = torch.arange(1 << 21, dtype=torch.float32)
    assert torch.equal(tv["w"].reshape(-1), big + v)
    m = json.loads((d / "metrics.json").read_text())
    assert len(m["pad"]) == 1 << 20
    c = torch.load(str(d / "checkpoint.pt"), weights_only=True)
    assert torch.equal(c["v"] - c["v"][0], big)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a mixed pair would warn
        f = ak.read_peft_adapter(d / "adapter")
    a, b = f["fc.weight"]
    cfg = json.loads((d / "adapter" / "adapter_config.json").read_text())
    assert float(a[0, 0]) + 1 == cfg["lora_alpha"]  # factors and alpha from the same write
    lines = (d / "rows.jsonl").read_text().splitlines()
    rows = [json.loads(ln) for ln in lines]  # every line complete (each run restarts at v = 0)
    assert rows and all(len(r["pad"]) == 4096 for r in rows)


def test_kill_9_mid_write_leaves_old_or_new_never_torn(tmp_path):
    rng = random.Random(0)
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for trial in range(3):
        proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(tmp_path)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=env, cwd=str(REPO))
        try:
            line = proc.stdout.readline()
            assert line.strip() == b"ready", proc.stderr.read().decode()[-2000:]
            time.sleep(rng.uniform(0.05, 0.6))
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL
        _check_consistent(tmp_path)
        _io.clean_leftovers(tmp_path)
        assert not [p for p in tmp_path.iterdir() if _io.TMP_MARK in p.name]


# Every writer goes through atlas_kernels._io: no direct final-path writes in the sources.
_DIRECT = re.compile(r"\bsave_file\(|\btorch\.save\(|\.savefig\(\s*(str\(|out\b|path\b)|\.write_text\(|"
                     r"\.write_bytes\(")
_OPEN_W = re.compile(r"open\([^)]*['\"][wa]b?['\"]")
_STR = re.compile(r"\"[^\"]*\"|'[^']*'")


def test_no_writer_bypasses_the_atomic_helpers():
    offenders = []
    for folder in ("atlas_kernels", "bench"):
        for p in (REPO / folder).rglob("*.py"):
            if p.name == "_io.py":
                continue
            for i, line in enumerate(p.read_text().splitlines(), 1):
                code = line.split("#", 1)[0]
                if (_DIRECT.search(_STR.sub('""', code)) or _OPEN_W.search(code)) and "atomic" not in code:
                    offenders.append(f"{p.relative_to(REPO)}:{i}: {line.strip()}")
    assert not offenders, "writers that bypass atlas_kernels._io:\n" + "\n".join(offenders)
