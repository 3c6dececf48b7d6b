"""Round 3 of the adversarial review (issue 24), the file-reading half: expansion and compression
bombs, special files, hostile files' messages, resume-file corruption, a full disk, and the README
journey's file mix-ups. Each test failed before its fix. The bombs are built on the fly and are
small on disk (see _bombs.py); the memory-capped ones run in a subprocess under RLIMIT_AS."""
import json
import os
import re
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from safetensors.torch import save_file

import atlas_kernels as ak
from atlas_kernels import safe_pickle
from atlas_kernels_tests import _bombs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------ expansion bombs
def test_an_expansion_bomb_is_refused_early_naming_the_file_and_both_sizes(tmp_path):
    bomb = _bombs.expansion_bomb(tmp_path / "eb.pt")  # 3000 x (1024, 1024) stride-0 views: 12 GiB
    assert bomb.stat().st_size < 400_000
    rx = r"eb\.pt.*tensors would expand to [\d.]+ MiB .* from 24 bytes of tensor data"
    t0 = time.perf_counter()
    for call in (lambda: ak.load_state_dict_file(bomb),
                 lambda: ak.convert_checkpoint(bomb, tmp_path / "out.safetensors"),
                 lambda: ak.TaskVectors.from_checkpoints(bomb, [bomb])):
        with pytest.raises(ValueError, match=rx):
            call()
    assert time.perf_counter() - t0 < 5
    assert not (tmp_path / "out.safetensors").exists()
    with pytest.raises(safe_pickle.RefusedPickle, match="expansion bomb"):
        safe_pickle.restricted_load(bomb)


def test_overlapping_full_size_views_are_refused(tmp_path):
    f = _bombs.overlapping_views(tmp_path / "ov.pt", n=32, rows=1024, cols=1024)  # 32 x 4 MiB over 4 MiB
    with pytest.raises(ValueError, match=r"ov\.pt.*would expand to .* from 4\.0 MiB"):
        ak.load_state_dict_file(f)


def test_tied_sliced_and_broadcast_tensors_still_load(tmp_path):
    w = torch.randn(8, 4)
    sd = {"w": w, "tied": w, "top": w[:4], "bottom": w[4:], "bias": torch.zeros(1).expand(16),
          "pos": torch.arange(64).expand(1, 64)}
    torch.save(sd, tmp_path / "ok.pt")
    got = ak.load_state_dict_file(tmp_path / "ok.pt")
    assert all(torch.equal(got[k], v) for k, v in sd.items())


# ------------------------------------------------------------------------------ compression bombs
def test_a_compression_bomb_is_refused_before_it_is_inflated(tmp_path):
    bomb = _bombs.compression_bomb(tmp_path / "cb.pt", n=20_000_000)  # a 40 MB pickle in ~80 KB
    assert bomb.stat().st_size < 200_000 and _bombs.deflate_ratio(bomb) > 300
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=r"cb\.pt.*'cb/data\.pkl' would inflate from [\d.]+ KiB .* to [\d.]+ "
                                         r"MiB .*\(\d+:1.*compression bomb"):
        ak.load_state_dict_file(bomb)
    assert time.perf_counter() - t0 < 1


def test_a_big_pickle_is_refused_by_counting_every_item(tmp_path):
    # stored, not compressed: 6 M list appends in a 12 MB data.pkl (under the pickle size cap)
    f = _bombs.compression_bomb(tmp_path / "sb.pt", n=6_000_000, compress=False)
    with pytest.raises(ValueError, match=r"sb\.pt.*builds more than 5,000,000 objects and items"):
        ak.load_state_dict_file(f)
    # the same program as a plain pickle (no zip): counted the same way
    (tmp_path / "plain.pkl").write_bytes(_bombs.list_pickle_bytes(6_000_000))
    with pytest.raises(ValueError, match="more than 5,000,000 objects"):
        ak.load_state_dict_file(tmp_path / "plain.pkl")


def test_a_storage_record_claiming_more_than_the_file_holds_allocates_nothing(tmp_path):
    f = _bombs.huge_declared_storage(tmp_path / "big.pt")
    with pytest.raises(ValueError, match=r"big\.pt.*claims 4\.0 GiB .* past the end of the"):
        ak.load_state_dict_file(f)


_CAPPED = textwrap.dedent("""
    import resource, sys, time
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
    import atlas_kernels as ak
    from atlas_kernels_tests import _bombs
    d = sys.argv[1]
    out = {}
    for name, make in (("expansion", lambda p: _bombs.expansion_bomb(p)),
                       ("compression", lambda p: _bombs.compression_bomb(p))):  # the issue's sizes
        p = make(f"{d}/{name}.pt")
        for call in ("load_state_dict_file", "convert_checkpoint", "from_checkpoints"):
            t0 = time.perf_counter()
            try:
                if call == "load_state_dict_file":
                    ak.load_state_dict_file(p)
                elif call == "convert_checkpoint":
                    ak.convert_checkpoint(p, f"{d}/out.safetensors")
                else:
                    ak.TaskVectors.from_checkpoints(p, [p])
                msg = "ACCEPTED"
            except Exception as e:
                msg = f"{type(e).__name__}: {e}"
            out[f"{name} {call}"] = [round(time.perf_counter() - t0, 3), msg[:300]]
    # VmHWM of this process, not ru_maxrss: a forked child's ru_maxrss starts at its parent's peak
    # (run inside the whole suite, pytest's own 12 GB showed up here)
    hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")]
    out["peak_rss_mib"] = (int(hwm[0].split()[1]) if hwm else
                           resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024
    print(__import__("json").dumps(out))
""")


def test_the_issue_sized_bombs_are_refused_within_seconds_under_a_4_gib_cap(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", _CAPPED, str(tmp_path)], capture_output=True, text=True,
                       timeout=120, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    for key, val in res.items():
        if key == "peak_rss_mib":
            continue
        secs, msg = val
        assert msg.startswith("ValueError") and "bomb" in msg, (key, msg)
        assert secs < 3, (key, secs)
    assert res["peak_rss_mib"] < 2048, res


# ------------------------------------------------------------------------------ the reader itself
def test_torch_load_never_sees_a_checkpoint(tmp_path, monkeypatch):
    torch.save({"w": torch.randn(3, 2)}, tmp_path / "sd.pt")
    torch.save(torch.nn.Linear(2, 3), tmp_path / "mod.pt")

    calls = []

    def no(*a, **k):  # recorded, since a caller may catch the error and fall back
        calls.append(a)
        raise AssertionError("torch.load was called on a file the restricted reader had not vetted")
    monkeypatch.setattr(torch, "load", no)
    assert set(ak.load_state_dict_file(tmp_path / "sd.pt")) == {"w"}
    assert set(ak.load_state_dict_file(tmp_path / "mod.pt")) == {"weight", "bias"}
    assert ak.load_head(tmp_path / "mod.pt").weight.shape == (3, 2)
    assert calls == []


def test_every_dtype_reads_through_the_restricted_reader(tmp_path):
    sd = {str(dt): torch.arange(6).reshape(2, 3).to(dt) for dt in (
        torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2, torch.uint16,
        torch.int8, torch.bool, torch.complex64)}
    torch.save(sd, tmp_path / "dt.pt")
    got = ak.load_state_dict_file(tmp_path / "dt.pt")
    for k, v in sd.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k].view(torch.uint8), v.view(torch.uint8)), k


def test_meta_and_sparse_tensors_are_refused_by_name(tmp_path):
    torch.save({"w": torch.empty(2, 3, device="meta")}, tmp_path / "meta.pt")
    with pytest.raises(ValueError, match=r"meta\.pt.*'w' is a meta tensor of shape \(2, 3\).*no values.*save the "
                                         r"real weights"):
        ak.load_state_dict_file(tmp_path / "meta.pt")
    with pytest.raises(ValueError, match="meta tensor"):
        ak.convert_checkpoint(tmp_path / "meta.pt", tmp_path / "o.safetensors")
    torch.save({"w": torch.eye(3).to_sparse(), "b": torch.zeros(3)}, tmp_path / "sparse.pt")
    with pytest.raises(ValueError, match=r"sparse\.pt.*'w' is a sparse tensor.*to_dense\(\)"):
        ak.load_state_dict_file(tmp_path / "sparse.pt")
    m = torch.nn.Linear(2, 3, device="meta")
    torch.save(m, tmp_path / "meta_module.pt")
    with pytest.raises(ValueError, match=r"meta tensor of shape \(3, 2\)"):
        ak.load_state_dict_file(tmp_path / "meta_module.pt")


@pytest.mark.parametrize("content", [b"hello world, this is a text file\n" * 8,
                                     bytes(range(7, 250)) * 4,
                                     b"(lp0\nI1\naI2\na."])  # a protocol 0 pickle: torch never writes one
def test_files_that_are_not_checkpoints_say_so(tmp_path, content):
    p = tmp_path / "notes.pt"
    p.write_bytes(content)
    with pytest.raises(ValueError) as e:
        ak.load_state_dict_file(p)
    msg = str(e.value)
    assert "notes.pt" in msg and "is not a checkpoint" in msg and "Memo value" not in msg
    assert ("a text file?" in msg) == (content[:1] != b"\x07")


def test_hostile_pickles_never_relay_torchs_weights_only_advice(tmp_path):
    frame = b"\x80\x04\x95" + (1 << 60).to_bytes(8, "little") + b"}."  # a frame declaring 2^60 bytes
    unusual = b"\x80\x02cbuiltins\nbytearray\n" + b"C\x03abc\x85R."  # a global this reader only records
    for name, data in (("frame.pt", frame), ("unusual.pt", unusual), ("random.pt", os.urandom(4096))):
        (tmp_path / name).write_bytes(data)
        for call in (ak.load_state_dict_file, lambda p: ak.convert_checkpoint(p, tmp_path / "o.safetensors"),
                     ak.load_head):
            with pytest.raises(ValueError) as e:
                call(tmp_path / name)
            msg = str(e.value)
            assert name in msg and "weights_only" not in msg and "trust" not in msg, msg


def test_running_out_of_memory_while_reading_is_said_as_such(tmp_path, monkeypatch):
    torch.save({"w": torch.zeros(4)}, tmp_path / "w.pt")

    def oom(path):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory")
    monkeypatch.setattr(safe_pickle, "restricted_load", oom)
    with pytest.raises(MemoryError, match=r"ran out of memory while reading 'w.pt'|ran out of memory while reading "
                                          r"'.*w\.pt'") as e:
        ak.load_state_dict_file(tmp_path / "w.pt")
    assert "truncated" not in str(e.value) and "corrupted" not in str(e.value)


# ------------------------------------------------------------------------------ special files
@pytest.fixture
def special(tmp_path):
    fifo = tmp_path / "head.pt"
    os.mkfifo(fifo)
    zero = tmp_path / "zero.pt"
    os.symlink("/dev/zero", zero)
    return fifo, zero


def _no_hang(fn, seconds=10):
    """Run ``fn`` in a thread; fail (instead of hanging the suite) if it blocks."""
    import threading

    box = {}

    def target():
        try:
            box["out"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            box["exc"] = e
    th = threading.Thread(target=target, daemon=True)
    th.start()
    th.join(seconds)
    assert not th.is_alive(), "blocked on a special file"
    if "exc" in box:
        raise box["exc"]
    return box.get("out")


def test_load_head_refuses_a_fifo_and_a_symlink_to_dev_zero(special):
    fifo, zero = special
    with pytest.raises(ValueError, match=r"head file '.*head\.pt' is a named pipe \(FIFO\), not a regular file"):
        _no_hang(lambda: ak.load_head(fifo))
    with pytest.raises(ValueError, match=r"head file '.*zero\.pt' is a symbolic link to '/dev/zero', a character "
                                         r"device, not a regular file"):
        _no_hang(lambda: ak.load_head(zero))
    for reader in (ak.load_state_dict_file, lambda p: ak.convert_checkpoint(p, str(p) + ".safetensors"),
                   ak.TaskVectors.load):
        for p in (fifo, zero):
            with pytest.raises(ValueError, match="not a regular file"):
                _no_hang(lambda: reader(p))


# ------------------------------------------------------------------------------ resume files
@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from atlas_kernels.train import toy

    torch.set_num_threads(1)
    return toy.make_demo(tmp_path_factory.mktemp("toy3"), train_per_class=4, val_per_class=2, finetune_steps=2)


def _train_args(demo, out, *extra):
    d = demo["data"]["shapes"]
    return ["--objective", "fewshot", "--task-vectors", str(demo["task_vectors"]), "--out", str(out),
            "--train", str(d["train"]), "--val", str(d["val"]), "--model-config", str(demo["model_config"]),
            "--weights", str(demo["pretrained"]), "--templates", "photo", "--workers", "0", "--quiet",
            "--epochs", "2", "--batch-size", "4", *extra]


@pytest.fixture(scope="module")
def resume_ckpt(demo, tmp_path_factory):
    from atlas_kernels.train.cli import main as cli_main

    out = tmp_path_factory.mktemp("run")
    os.environ.setdefault("ATLAS_KERNELS_CACHE", str(out / "cache"))
    assert cli_main(_train_args(demo, out, "--stop-after-steps", "1")) == 0
    return out / "checkpoint.pt"


def _set(d, path, value):
    *head, last = path
    for k in head:
        d = d[k]
    if value is _DROP:
        del d[last]
    else:
        d[last] = value


_DROP = object()
_CORRUPT = {
    "missing fingerprint": ((("fingerprint",), _DROP), r"'fingerprint' should be a non-empty dict, but it holds "
                                                         r"nothing \(the entry is missing\)"),
    "corrupt torch RNG": ((("rng", "torch"), torch.zeros(3, dtype=torch.uint8)), r"rng\['torch'\] should be a uint8 "
                                                                                r"tensor of shape \(5056,\)"),
    "corrupt python RNG": ((("rng", "python"), "garbage"), r"rng\['python'\] should be Python's RNG state"),
    "empty optimizer state": ((("optimizer",), {}), r"'optimizer' should be a non-empty dict, but it holds a dict "
                                                   r"of 0 item"),
    "no parameter groups": ((("optimizer", "param_groups"), []), r"optimizer\['param_groups'\] should be a "
                                                                r"non-empty list"),
    "another optimizer's groups": ((("optimizer", "param_groups", 0, "params"), [0, 1, 2, 3, 4, 5, 6, 7, 8]),
                                   r"its optimizer state cannot be restored \(ValueError"),
    "epoch a string": ((("epoch",), "1"), r"'epoch' should be a non-negative integer, but it holds str '1'"),
}


@pytest.mark.parametrize("case", list(_CORRUPT))
def test_a_corrupt_resume_file_is_one_line_exit_2(demo, resume_ckpt, tmp_path, capsys, case):
    from atlas_kernels.train.cli import main as cli_main

    (path, value), want = _CORRUPT[case]
    ck = torch.load(str(resume_ckpt), weights_only=True)
    _set(ck, path, value)
    bad = tmp_path / "bad.pt"
    torch.save(ck, str(bad))
    capsys.readouterr()
    assert cli_main(_train_args(demo, resume_ckpt.parent, "--resume", str(bad))) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "bad.pt" in err and re.search(want, err), err
    assert "resume from another checkpoint, or start afresh without --resume" in err


def test_a_resume_file_that_is_a_bomb_fifo_or_another_run_is_one_line(demo, resume_ckpt, tmp_path, capsys):
    from atlas_kernels.train.cli import main as cli_main

    fifo = tmp_path / "fifo.pt"
    os.mkfifo(fifo)
    cases = {_bombs.expansion_bomb(tmp_path / "eb.pt"): "expansion bomb",
             _bombs.compression_bomb(tmp_path / "cb.pt", n=2_000_000): "compression bomb",
             fifo: r"named pipe \(FIFO\)"}
    ck = torch.load(str(resume_ckpt), weights_only=True)
    ck["fingerprint"]["lr"] = 123.0
    torch.save(ck, str(tmp_path / "other.pt"))
    cases[tmp_path / "other.pt"] = r"comes from another run; it differs in: lr: checkpoint 123.0"
    for f, want in cases.items():
        capsys.readouterr()
        assert _no_hang(lambda: cli_main(_train_args(demo, resume_ckpt.parent, "--resume", str(f))), 60) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and re.search(want, err) and "weights_only" not in err, err


def test_a_good_resume_file_still_resumes(demo, resume_ckpt, tmp_path):
    import shutil

    from atlas_kernels.train.cli import main as cli_main

    out = tmp_path / "copy"
    shutil.copytree(resume_ckpt.parent, out)
    assert cli_main(_train_args(demo, out, "--resume", str(out / "checkpoint.pt"))) == 0
    assert (out / "coefficients.safetensors").is_file()


# ------------------------------------------------------------------------------ a full disk
def _on_a_full_disk(tmp_path, script: str):
    """Run ``script`` (sh) with ``$D`` a 64 KiB tmpfs, in a private mount namespace (nothing
    outside sees it); skip where mounting is not allowed."""
    import shutil

    if shutil.which("unshare") is None:
        pytest.skip("no unshare(1) to mount a small tmpfs")
    d = tmp_path / "full"
    d.mkdir()
    flags = "-m" if os.geteuid() == 0 else "-rm"
    env = dict(os.environ, D=str(d), PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    probe = subprocess.run(["unshare", flags, "sh", "-c", 'mount -t tmpfs -o size=64k tmpfs "$D"'],
                           capture_output=True, env=env)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {probe.stderr.decode()[:200]}")
    return subprocess.run(["unshare", flags, "sh", "-c", 'mount -t tmpfs -o size=64k tmpfs "$D" && ' + script],
                          capture_output=True, text=True, env=env, timeout=120)


def test_a_full_disk_during_task_vectors_build_is_one_line_exit_2(tmp_path):
    pre = {"w": torch.zeros(128, 256)}
    save_file(pre, str(tmp_path / "pre.safetensors"))
    save_file({"w": torch.ones(128, 256)}, str(tmp_path / "ft.safetensors"))
    torch.save({"w": torch.ones(128, 256)}, str(tmp_path / "ft.pt"))
    r = _on_a_full_disk(tmp_path, f"""
        echo previous > "$D/tv.safetensors"
        {sys.executable} -m atlas_kernels.task_vectors build --pretrained {tmp_path}/pre.safetensors \\
            --finetuned {tmp_path}/ft.safetensors --out "$D/tv.safetensors"; echo "rc=$?"
        {sys.executable} -m atlas_kernels.task_vectors convert {tmp_path}/ft.pt "$D/ft.safetensors"; echo "rc=$?"
        ls -A "$D"; cat "$D/tv.safetensors" """)
    out, err = r.stdout.split(), r.stderr.strip().splitlines()
    assert out[:2] == ["rc=2", "rc=2"] and out[2:] == ["tv.safetensors", "previous"], (r.stdout, r.stderr)
    assert len(err) == 2 and "Traceback" not in r.stderr, r.stderr
    for line, name in zip(err, ("build", "convert")):
        assert line.startswith(f"python -m atlas_kernels.task_vectors {name}: error: no space left on the device")
        assert "nothing was written under that name" in line and "free space there" in line


def test_a_full_disk_is_said_as_such_for_every_writer(tmp_path, monkeypatch, capsys):
    """Without a real full device: each writer's own error for one (safetensors' "os error 28",
    torch.save's "unexpected pos" while the device has no space left)."""
    import safetensors.torch
    from safetensors import SafetensorError

    from atlas_kernels import _io
    from atlas_kernels.task_vectors.cli import main as tv_main

    def full_safetensors(*a, **k):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    monkeypatch.setattr(safetensors.torch, "save_file", full_safetensors)
    save = tmp_path / "pre.pt"
    torch.save({"w": torch.zeros(2)}, str(save))
    assert tv_main(["build", "--pretrained", str(save), "--finetuned", str(save), "--out",
                    str(tmp_path / "tv.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "no space left on the device" in err and "tv.safetensors" in err and len(err.splitlines()) == 1
    assert not [p for p in tmp_path.iterdir() if _io.TMP_MARK in p.name]

    real_save = torch.save

    def full_torch(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    class Full:
        f_bavail, f_frsize = 0, 4096
    monkeypatch.setattr(torch, "save", full_torch)
    monkeypatch.setattr(_io.os, "statvfs", lambda p: Full)
    with pytest.raises(_io.DiskFullError, match=r"no space left on the device .* while writing '.*ck\.pt'"):
        _io.atomic_torch_save({"a": 1}, tmp_path / "ck.pt")
    assert not (tmp_path / "ck.pt").exists()
    # a writer's error on a device with space left stays what it was
    monkeypatch.setattr(_io.os, "statvfs", lambda p: type("Roomy", (), {"f_bavail": 1 << 30, "f_frsize": 4096}))
    with pytest.raises(RuntimeError, match="unexpected pos"):
        _io.atomic_torch_save({"a": 1}, tmp_path / "ck.pt")


# ------------------------------------------------------------------------------ task-vector values and files
@pytest.mark.parametrize("storage", ["float8_e4m3fn", "int8"])
@pytest.mark.parametrize("rowmax", [1e-44, 3e-43, 1e-40, 1e-37])
def test_a_subnormal_row_maximum_quantizes_instead_of_failing(storage, rowmax):
    w = torch.zeros(2, 2, 4)
    w[0, 1, 2], w[0, 1, 1] = rowmax, -rowmax / 3  # row 1 of task vector 0: all subnormal
    w[1] = torch.randn(2, 4)
    for tvs in (ak.TaskVectors({"w": w}, names=["a", "b"]).to_storage(storage),
                ak.TaskVectors.from_state_dicts({"w": torch.zeros(2, 4)}, [{"w": w[0]}, {"w": w[1]}],
                                                storage=storage)):
        sc = tvs.scale("w")
        assert bool((sc >= torch.finfo(torch.float32).tiny).all()), sc  # never subnormal or 0
        d = tvs.dense("w", 0)
        assert bool(torch.isfinite(d).all()) and float((d - w[0]).abs().max()) < 1e-37


@pytest.mark.parametrize("index", [[0.7], [True], torch.tensor([0.7]), torch.tensor([True]), ["0"]])
def test_a_ragged_index_that_is_not_integers_is_refused(index):
    with pytest.raises(TypeError, match=r"block 'w': index must (list|hold) task-vector numbers \(integers\), got "):
        ak.TaskVectors({"w": torch.randn(1, 3), "v": torch.randn(2, 3)}, index={"w": index})
    ok = ak.TaskVectors({"w": torch.randn(1, 3), "v": torch.randn(2, 3)}, index={"w": [1]})
    assert ok.index("w").tolist() == [1]


def test_a_file_whose_metadata_lists_other_names_blames_the_names_not_the_shape(tmp_path):
    from safetensors import safe_open

    from atlas_kernels.task_vectors import _META_CRC, _meta_crc
    tv = ak.TaskVectors({"a.weight": torch.randn(2, 3, 4), "b.weight": torch.randn(2, 5)}, names=["x", "y"])
    tv.save(tmp_path / "tv.safetensors")
    with safe_open(str(tmp_path / "tv.safetensors"), framework="pt") as h:
        meta, tensors = dict(h.metadata()), {k: h.get_tensor(k) for k in h.keys()}
    for names, n in ((["x", "y", "z"], None), (["x"], None), (["x", "y", "z"], "3")):
        m = dict(meta, names=json.dumps(names), **({"n": n} if n else {}))
        m[_META_CRC] = str(_meta_crc(m))
        save_file(tensors, str(tmp_path / "three.safetensors"), metadata=m)
        with pytest.raises(ValueError, match=rf"three\.safetensors': its metadata 'names' lists {len(names)} task "
                                             r"vector\(s\) .* but block 'a.weight' holds 2 .*names and the tensors "
                                             r"disagree") as e:
            ak.TaskVectors.load(tmp_path / "three.safetensors")
        assert "metadata says" not in str(e.value)
    m = dict(meta, n="3")
    m[_META_CRC] = str(_meta_crc(m))
    save_file(tensors, str(tmp_path / "n3.safetensors"), metadata=m)
    with pytest.raises(ValueError, match=r"n3\.safetensors': n=3 given, but blocks hold N=2"):
        ak.TaskVectors.load(tmp_path / "n3.safetensors")


# ------------------------------------------------------------------------------ the README journey
def _clip_like():
    """A CLIP-shaped state dict (text-tower keys first, as open_clip orders them)."""
    g = torch.Generator().manual_seed(0)
    keys = ["positional_embedding", "text_projection", "logit_scale", "token_embedding.weight",
            "transformer.resblocks.0.attn.in_proj_weight", "ln_final.weight", "visual.conv1.weight",
            "visual.class_embedding", "visual.transformer.resblocks.0.mlp.c_fc.weight", "visual.proj"]
    return {k: torch.randn(3, 2, generator=g) for k in keys}


def test_a_prefix_without_its_dot_or_cut_inside_a_name_is_refused():
    sd = _clip_like()
    ft = {k: v + 1 for k, v in sd.items()}
    with pytest.raises(ValueError, match=r"prefix 'visual' lacks its trailing dot: the names under it would start "
                                         r"with a dot \('\.conv1\.weight'\); pass prefix='visual\.'"):
        ak.TaskVectors.from_state_dicts(sd, [ft], prefix="visual")
    with pytest.raises(ValueError, match=r"prefix 'visu' stops inside a name part .*prefix='visual\.'"):
        ak.TaskVectors.from_state_dicts(sd, [ft], prefix="visu")
    from atlas_kernels.checkpoints import select_tower
    with pytest.raises(ValueError, match="lacks its trailing dot"):
        select_tower(sd, "visual")
    assert set(ak.TaskVectors.from_state_dicts(sd, [ft], prefix="visual.").blocks) == {
        "conv1.weight", "class_embedding", "transformer.resblocks.0.mlp.c_fc.weight", "proj"}


def test_a_prefix_matching_nothing_points_at_the_image_tower(tmp_path):
    sd = _clip_like()
    save_file(sd, str(tmp_path / "clip.safetensors"))
    for call in (lambda: ak.TaskVectors.from_state_dicts(sd, [sd], prefix="model.visual."),
                 lambda: ak.TaskVectors.from_checkpoints(tmp_path / "clip.safetensors",
                                                         [tmp_path / "clip.safetensors"], prefix="vision.")):
        with pytest.raises(ValueError, match=r"matches no .*the dotted ones start with .*'visual\.' \(4\).*the image "
                                             r"tower is under 'visual\.': pass prefix='visual\.' or 'auto'"):
            call()


def test_load_state_dict_file_refuses_the_librarys_own_files(tmp_path):
    from atlas_kernels_tests._util import make_tiny_vit

    m = make_tiny_vit("cpu")
    pre = {k: v.detach().clone() for k, v in m.named_parameters()}
    tvs = ak.TaskVectors.from_state_dicts(pre, [{k: v + 0.01 for k, v in pre.items()}])
    tvs.save(tmp_path / "tv.safetensors")
    ak.patch(m, tvs, backend="torch")
    ak.save_coefficients(m, tmp_path / "coef.safetensors")
    with pytest.raises(ValueError, match=r"coef\.safetensors' is an atlas_kernels coefficient file, not a state dict"
                                         r".*ak\.load_coefficients\(module, path\) after ak\.patch"):
        ak.load_state_dict_file(tmp_path / "coef.safetensors")
    with pytest.raises(ValueError, match=r"is an atlas_kernels task-vector file, not a state dict.*TaskVectors\.load"):
        ak.convert_checkpoint(tmp_path / "tv.safetensors", tmp_path / "o.safetensors")


@pytest.mark.parametrize("cmd", ["build", "convert", "import"])
def test_the_task_vector_cli_refuses_a_pickle_suffix_for_a_safetensors_output(tmp_path, capsys, cmd):
    from atlas_kernels.task_vectors.cli import main as tv_main

    save_file({"w": torch.zeros(2)}, str(tmp_path / "p.safetensors"))
    p = str(tmp_path / "p.safetensors")
    argv = {"build": ["build", "--pretrained", p, "--finetuned", p, "--out", str(tmp_path / "tv.pt")],
            "convert": ["convert", p, str(tmp_path / "tv.pt")],
            "import": ["import", str(tmp_path), "--model", "ViT-B-32", "--out", str(tmp_path / "tv.pt")]}[cmd]
    assert tv_main(argv) == 2
    err = capsys.readouterr().err
    assert "ends in .pt, the suffix of a torch pickle, but this command writes a safetensors file: name it" in err
    assert "tv.safetensors" in err and not (tmp_path / "tv.pt").exists()


def test_patching_through_compile_or_dataparallel_names_the_wrapper_prefix():
    from atlas_kernels_tests._util import make_tiny_vit

    m = make_tiny_vit("cpu")
    pre = {k: v.detach().clone() for k, v in m.named_parameters()}
    tvs = ak.TaskVectors.from_state_dicts(pre, [{k: v + 0.01 for k, v in pre.items()}])
    for wrapped, prefix, how in ((torch.compile(m), "_orig_mod.", "torch.compile"),
                                 (torch.nn.DataParallel(m), "module.", "DataParallel")):
        with pytest.raises(ValueError, match=rf"wrapped by {how}.*named '{prefix}' \+ the task vectors' names; "
                                             rf"patch the module inside, e.g. ak.patch\(model\.{prefix[:-1]}, "):
            ak.patch(wrapped, tvs, backend="torch")


def test_the_train_cli_speaks_of_its_own_options_not_the_python_api(demo, tmp_path, capsys):
    from atlas_kernels.train.cli import main as cli_main

    tvs = ak.TaskVectors.load(str(demo["task_vectors"]))
    for prefix in ("model.visual.", "."):
        renamed = ak.TaskVectors({prefix + b: tvs[b] for b in tvs.blocks}, names=tvs.names)
        p = tmp_path / f"tv{len(prefix)}.safetensors"
        renamed.save(p)
        args = _train_args(demo, tmp_path / "o")
        args[args.index("--task-vectors") + 1] = str(p)
        capsys.readouterr()
        assert cli_main(args) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        assert "patch the whole model" not in err and "prefix=" not in err, err
        assert "python -m atlas_kernels.task_vectors build" in err and "--prefix" in err, err
        assert ("'model.visual.' prefix" in err) == (prefix == "model.visual."), err


def test_a_fifo_or_dev_zero_as_a_text_input_of_the_train_cli_is_named(demo, tmp_path, capsys, special):
    from atlas_kernels.train.cli import main as cli_main

    fifo, zero = special
    for flag in ("--classnames", "--templates", "--weights", "--model-config"):
        for p in (fifo, zero):
            args = _train_args(demo, tmp_path / "o", *(["--classnames", str(p)] if flag == "--classnames" else []))
            if flag != "--classnames":
                args[args.index(flag) + 1] = str(p)
            capsys.readouterr()
            assert _no_hang(lambda: cli_main(args), 60) == 2
            err = capsys.readouterr().err
            kind = r"named pipe \(FIFO\)" if p == fifo else "symbolic link to '/dev/zero', a character device"
            assert re.search(kind + ", not a regular file", err) and "does not exist" not in err, (flag, err)


def test_bench_help_answers_from_any_folder(tmp_path, monkeypatch):
    import runpy

    import setuptools
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench"), "--help"], cwd=str(tmp_path),
                       capture_output=True, text=True, timeout=120,
                       env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert r.returncode == 0 and "usage: python -m bench" in r.stdout, r.stderr[-1000:]
    got = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kw: got.update(kw))
    monkeypatch.chdir(ROOT)
    runpy.run_path(os.path.join(ROOT, "setup.py"))
    assert "bench" in got["packages"]  # installed (pip install -e .): python -m bench from anywhere


def test_a_peft_adapter_whose_weights_are_a_special_file_says_so(tmp_path, special):
    fifo, zero = special
    for target in (fifo, zero):
        p = tmp_path / f"ad-{target.name}"
        ak.write_peft_adapter(p, {"fc1.weight": (torch.randn(2, 5), torch.randn(6, 2))}, r=2, lora_alpha=4,
                              target_modules=["fc1"])
        (p / "adapter_model.safetensors").unlink()
        os.symlink(target, p / "adapter_model.safetensors")
        with pytest.raises(ValueError, match=r"PEFT adapter weights .* is a symbolic link to .*(named pipe|character "
                                             r"device).*not a regular file"):
            _no_hang(lambda: ak.read_peft_adapter(p))
