"""An adversarial pass over the library and its training CLI, as a careless or hostile user would
try it. Not collected by pytest (no ``test_`` prefix); run it by hand:

    PYTHONPATH=. python -m atlas_kernels_tests.adversarial [--skip-train]

Each case is classified: ``ok`` (refused with a message naming the problem, or the right
behaviour), ``weak`` (refused, but the message misses what the user needs), ``bad`` (accepted
silently, a wrong result, lost data, or a raw internal error). Prints the table
``case family | cases | OK | weak | bad`` and the weak/bad cases.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import sys
import tempfile
import warnings
from collections import defaultdict
from pathlib import Path

import torch

import atlas_kernels as ak

RESULTS = defaultdict(list)  # family -> [(case, verdict, detail)]


def case(family, name, fn, expect=None, exc=(ValueError, RuntimeError, TypeError, OSError)):
    """``fn()`` must raise one of ``exc`` whose message matches ``expect`` (a regex), or, with
    ``expect=None``, return True."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = fn()
    except exc as e:
        if expect is None:
            RESULTS[family].append((name, "bad", f"raised {type(e).__name__}: {str(e)[:160]}"))
        elif re.search(expect, str(e), re.S):
            RESULTS[family].append((name, "ok", ""))
        else:
            RESULTS[family].append((name, "weak", f"{type(e).__name__}: {str(e)[:200]}"))
        return
    except Exception as e:  # an internal error type: a raw traceback for the user
        RESULTS[family].append((name, "bad", f"raw {type(e).__name__}: {str(e)[:160]}"))
        return
    if expect is not None:
        RESULTS[family].append((name, "bad", f"accepted (returned {str(out)[:80]})"))
    else:
        RESULTS[family].append((name, "ok" if out is True else "bad", "" if out is True else f"returned {out!r}"))


# ------------------------------------------------------------------------------------ fixtures
def tiny(names=("a", "b"), storage="float32", seed=0):
    from atlas_kernels_tests._util import make_tiny_vit

    torch.manual_seed(seed)
    m = make_tiny_vit("cpu")
    pre = {k: v.detach().clone() for k, v in m.named_parameters()}
    fts = [{k: v + 0.01 * torch.randn_like(v) for k, v in pre.items()} for _ in names]
    plain = {k: v.detach().clone() for k, v in m.state_dict().items()}
    ak.patch(m, ak.TaskVectors.from_state_dicts(pre, fts, names=list(names), storage=storage), backend="torch")
    return m, plain


def fill(m, v):
    with torch.no_grad():
        for c in ak.coefficients(m).values():
            c.copy_(torch.as_tensor(v, dtype=torch.float32).expand_as(c))


# ------------------------------------------------------------------------------------ families
def coefficient_files(d: Path):
    F = "coefficient files"
    m, _ = tiny(("cars", "dtd"))
    fill(m, [0.1, 0.7])
    f = d / "c.safetensors"
    ak.save_coefficients(m, f)
    case(F, "reordered task vectors", lambda: ak.load_coefficients(tiny(("dtd", "cars"))[0], f), r"another order")
    case(F, "reordered, strict=False", lambda: ak.load_coefficients(tiny(("dtd", "cars"))[0], f, strict=False),
         r"another order")
    case(F, "renamed (strict)", lambda: ak.load_coefficients(tiny(("cars2", "dtd"))[0], f), r"names differ")
    case(F, "renamed, strict=False loads",
         lambda: bool(ak.load_coefficients(tiny(("cars2", "dtd"))[0], f, strict=False)))
    case(F, "other N", lambda: ak.load_coefficients(tiny(("a", "b", "c"))[0], f), r"\bn: file 2, model 3")
    case(F, "directory as file", lambda: ak.load_coefficients(m, d), r"is a directory")
    case(F, "empty file", lambda: ak.load_coefficients(m, _empty(d)), r"empty \(0 bytes\)")
    tv = d / "tv.safetensors"
    ak.TaskVectors({"w": torch.zeros(1, 2)}).save(tv)
    case(F, "task-vector file as coefficients", lambda: ak.load_coefficients(m, tv),
         r"not an atlas_kernels coefficient")
    fill(m, float("nan"))
    case(F, "save NaN coefficients", lambda: ak.save_coefficients(m, d / "nan.safetensors"), r"NaN or inf")
    fill(m, 0.0)
    names = list(ak.coefficients(m))
    case(F, "names via torch.compile", lambda: list(ak.coefficients(torch.compile(m))) == names)
    case(F, "names via DataParallel", lambda: list(ak.coefficients(torch.nn.DataParallel(m))) == names)
    case(F, "save via compile, load plain", lambda: (ak.save_coefficients(torch.compile(m), d / "k.safetensors"),
                                                    ak.load_coefficients(m, d / "k.safetensors")) and True)


def _empty(d: Path) -> Path:
    p = d / "empty.safetensors"
    p.write_bytes(b"")
    return p


def module_api(d: Path):
    F = "module API (dtype, grad, state dict)"
    for storage in ("float32", "bfloat16", "int8", "float8_e4m3fn"):
        for to in (torch.float16, torch.bfloat16):
            def conv(storage=storage, to=to):
                m, _ = tiny(storage=storage)
                sdt = {n: b.dtype for n, b in m.named_buffers() if n.endswith(("tau", "scale"))}
                m.to(to)
                ok = all(c.dtype == torch.float32 for c in ak.coefficients(m).values())
                ok &= all(b.dtype == sdt[n] for n, b in m.named_buffers() if n in sdt)
                y = m(torch.randn(1, 3, 32, 32).to(to))
                return ok and y.dtype == to and bool(torch.isfinite(y).all())
            case(F, f".to({str(to)[6:]}) with {storage} storage", conv)

    def rg():
        m, _ = tiny()
        m.requires_grad_(True)
        m(torch.randn(1, 3, 32, 32))
    case(F, "requires_grad_(True) then forward", rg, r"theta0.*requires grad")

    def strict_plain():
        m, plain = tiny()
        before = {k: v.clone() for k, v in m.state_dict().items()}
        try:
            m.load_state_dict({k: v + 1 for k, v in plain.items()})
        finally:
            if any(not torch.equal(v, before[k]) for k, v in m.state_dict().items()):
                raise AssertionError("theta0 overwritten by a failed load")  # -> bad
    case(F, "strict load of a plain state dict", strict_plain, r"Nothing was loaded.*unpatch.*load_plain_state_dict")

    def shape_nonstrict():
        m, plain = tiny()
        sd = dict(m.state_dict())
        sd["transformer.resblocks.0.mlp.c_fc.weight"] = torch.zeros(2, 2)
        m.load_state_dict(sd, strict=False)
    case(F, "non-strict load, wrong shape", shape_nonstrict, r"another shape")

    def helper():
        m, plain = tiny()
        fill(m, 0.5)
        ak.load_plain_state_dict(m, {k: v + 1 for k, v in plain.items()})
        return bool(torch.equal(m.state_dict()["conv1.parametrizations.weight.original"], plain["conv1.weight"] + 1))
    case(F, "load_plain_state_dict", helper)
    case(F, "unpatch NaN coefficients", lambda: (lambda m: (fill(m, float("nan")), ak.unpatch(m)))(tiny()[0]),
         r"NaN or inf")


def peft_configs(d: Path):
    F = "PEFT configs"

    def adapter(name, b_scale=1.0, **changes):
        p = d / name
        ak.write_peft_adapter(p, {"fc1.weight": (torch.randn(2, 5), torch.randn(6, 2) * b_scale)}, r=2,
                              lora_alpha=4, target_modules=["fc1"])
        cp = p / "adapter_config.json"
        cfg = json.loads(cp.read_text())
        cfg.update(changes)
        cp.write_text(json.dumps(cfg))
        return p
    bad = [("r=4.5", {"r": 4.5}, r"'r' must be a positive number"), ("r=0", {"r": 0}, r"'r'"),
           ("r='2'", {"r": "2"}, r"'r'"), ("lora_alpha=1e300", {"lora_alpha": 1e300}, r"'lora_alpha'"),
           ("lora_alpha=-1", {"lora_alpha": -1}, r"'lora_alpha'"),
           ("use_rslora='false'", {"use_rslora": "false"}, r"'use_rslora' must be true or false"),
           ("use_rslora='true'", {"use_rslora": "true"}, r"'use_rslora' must be true or false"),
           ("use_dora='false'", {"use_dora": "false"}, r"'use_dora' must be true or false"),
           ("fan_in_fan_out='no'", {"fan_in_fan_out": "no"}, r"'fan_in_fan_out'"),
           ("rank_pattern value 2.5", {"rank_pattern": {"fc1": 2.5}}, r"rank_pattern\['fc1'\]"),
           ("alpha_pattern value NaN", {"alpha_pattern": {"fc1": float("nan")}}, r"alpha_pattern\['fc1'\]"),
           ("pattern (a+)+$", {"rank_pattern": {"(a+)+$": 2}}, r"repeats a group"),
           ("pattern (x|xx)*y", {"rank_pattern": {"(x|xx)*y": 2}}, r"repeats a group"),
           ("pattern .*.*.*.*z", {"rank_pattern": {".*.*.*.*z": 2}}, r"unbounded repeats"),
           ("pattern of 5000 chars", {"rank_pattern": {"a" * 5000: 2}}, r"longer than"),
           ("pattern not a regex", {"rank_pattern": {"(": 2}}, r"not a regular expression"),
           ("peft_type PREFIX", {"peft_type": "PREFIX_TUNING"}, r"peft_type"),
           ("use_dora true", {"use_dora": True}, r"DoRA")]
    for i, (name, ch, rx) in enumerate(bad):
        case(F, name, lambda ch=ch, i=i: ak.read_peft_adapter(adapter(f"a{i}", **ch)), rx)
    case(F, "alpha overflowing float32 in B", lambda: ak.read_peft_adapter(adapter("ov", 1e4, lora_alpha=1e38)),
         r"scaling lora_alpha / r")
    case(F, "writer r=2.0", lambda: ak.write_peft_adapter(d / "w", {"fc.weight": (torch.ones(2, 3), torch.ones(4, 2))},
                                                          r=2.0, lora_alpha=4, target_modules=["fc"]),
         r"r must be an integer")
    case(F, "valid rank_pattern regex", lambda: ak.read_peft_adapter(
        adapter("ok", rank_pattern={r"f.1": 2}))["fc1.weight"][0].shape == (2, 5))


def task_vector_files(d: Path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from atlas_kernels.task_vectors import _META_CRC, _meta_crc
    F = "task-vector files"
    tv = ak.TaskVectors({"a.weight": torch.randn(2, 3, 4), "b.weight": torch.randn(2, 5)}, names=["x", "y"])
    f = d / "tv.safetensors"
    tv.save(f)
    with safe_open(str(f), framework="pt") as h:
        meta, tensors = dict(h.metadata()), {k: h.get_tensor(k) for k in h.keys()}

    def variant(name, recrc=False, drop_crc=False, **ch):
        m = dict(meta, **ch)
        if drop_crc:
            m.pop(_META_CRC)
        if recrc:
            m[_META_CRC] = str(_meta_crc(m))
        p = d / name
        save_file(tensors, str(p), metadata=m)
        return str(p)
    case(F, "names swapped in metadata", lambda: ak.TaskVectors.load(variant("s", names='["y", "x"]')),
         r"metadata fails")
    case(F, "block dropped from list", lambda: ak.TaskVectors.load(variant("dr", True, blocks='["a.weight"]')),
         r"does not list")
    case(F, "shapes not JSON", lambda: ak.TaskVectors.load(variant("sj", drop_crc=True, shapes="{")),
         r"'shapes' is not valid JSON")
    case(F, "n not an int", lambda: ak.TaskVectors.load(variant("n", drop_crc=True, n="two")),
         r"'n' must be an integer")
    case(F, "names not a list", lambda: ak.TaskVectors.load(variant("nl", drop_crc=True, names='"x"')),
         r"'names' must be a JSON list")
    case(F, "directory", lambda: ak.TaskVectors.load(d), r"is a directory")
    loop = d / "loop.safetensors"
    os.symlink(loop, loop)
    case(F, "symlink loop", lambda: ak.TaskVectors.load(loop), r"symbolic link loop")
    case(F, "empty file", lambda: ak.TaskVectors.load(_empty(d)), r"empty \(0 bytes\)")
    pre, ft = {"w": torch.zeros(2, 2)}, {"w": torch.tensor([[0.0, 7e4], [0.0, 0.0]])}
    case(F, "fp16 storage overflow (build)", lambda: ak.TaskVectors.from_state_dicts(pre, [ft], storage="float16"),
         r"overflows float16 storage.*70000")
    case(F, "fp16 storage overflow (to_storage)",
         lambda: ak.TaskVectors.from_state_dicts(pre, [ft]).to_storage("float16"), r"overflows float16.*70000")
    case(F, "convert zero-byte", lambda: ak.convert_checkpoint(_empty(d), d / "o.safetensors"),
         r"^(?!.*pickled).*empty")
    bad = d / "broken.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")
    case(F, "convert broken safetensors", lambda: ak.convert_checkpoint(bad, d / "o.safetensors"),
         r"^(?!.*pickled).*not a readable safetensors")
    case(F, "checkpoint is a directory", lambda: ak.load_state_dict_file(d), r"is a directory")


def atomic_writes(d: Path):
    from atlas_kernels import _io
    from atlas_kernels_tests.test_faults import Crash, _snapshot, _writers
    F = "atomic writes"
    writers = _writers(d)
    modes = {"fsync fails": ("fsync", lambda fd: (_ for _ in ()).throw(Crash())),
             "rename fails": ("replace", lambda a, b: (_ for _ in ()).throw(Crash()))}
    for name, (path, write) in writers.items():
        write(0)
        for mode, (attr, fake) in modes.items():
            def run(path=path, write=write, attr=attr, fake=fake):
                good = _snapshot(path)
                real, real_x = getattr(_io.os, attr), _io._rename_exchange
                setattr(_io.os, attr, fake)
                if attr == "replace":
                    _io._rename_exchange = lambda a, b: (_ for _ in ()).throw(Crash())
                    real_rename, _io.os.rename = _io.os.rename, lambda a, b: (_ for _ in ()).throw(Crash())
                try:
                    write(1)
                except Crash:
                    pass
                finally:
                    setattr(_io.os, attr, real)
                    _io._rename_exchange = real_x
                    if attr == "replace":
                        _io.os.rename = real_rename
                return _snapshot(path) == good and not [p for p in d.iterdir() if _io.TMP_MARK in p.name]
            case(F, f"{name}: {mode}", run)


def training(d: Path):
    from atlas_kernels.train import TrainConfig, run, setup, toy
    from atlas_kernels.train.cli import main
    from atlas_kernels.train.faults import DivergedError
    F = "training run and CLI"
    torch.set_num_threads(1)
    os.environ["ATLAS_KERNELS_CACHE"] = str(d / "cache")
    demo = toy.make_demo(d / "toy", train_per_class=4, val_per_class=2, finetune_steps=2)
    sh = demo["data"]["shapes"]

    def cfg(out, **kw):
        base = dict(task_vectors=str(demo["task_vectors"]), out=str(d / out), objective="fewshot",
                    train=[str(sh["train"])], val=[str(sh["val"])], model_config=str(demo["model_config"]),
                    weights=str(demo["pretrained"]), templates="photo", workers=0, quiet=True, epochs=1,
                    batch_size=4, lr=0.05)
        base.update(kw)
        return TrainConfig(**base)

    def cli(c, *extra):
        args = ["--objective", "fewshot", "--task-vectors", c.task_vectors, "--out", c.out, "--train", *c.train,
                "--val", *c.val, "--model-config", c.model_config, "--templates", "photo", "--workers", "0",
                "--quiet", "--epochs", "1", "--batch-size", "4", "--weights", c.weights, *extra]
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            rc = main(args)
        msg = err.getvalue().strip()
        if rc == 0:
            return True if not extra or extra[0] != "--expect-fail" else "exit 0"
        raise ValueError(f"exit {rc}: {msg}" + (" [multi-line]" if len(msg.splitlines()) > 1 else ""))

    case(F, "huge lr diverges", lambda: run(cfg("lr", lr=1e30, save_every=1)), r"diverged at optimizer step",
         exc=(DivergedError,))
    case(F, "huge lr via CLI exits non-zero", lambda: cli(cfg("lr2"), "--lr", "1e30"), r"exit 3: .*diverged")
    from safetensors.torch import load_file, save_file
    sd = load_file(str(demo["pretrained"]))

    def weights(name, fn):
        s = dict(sd)
        fn(s)
        p = d / name
        save_file(s, str(p))
        return str(p)
    k = next(k for k in sd if k.startswith("visual.") and sd[k].dim() == 2)
    w_inf = weights("inf.safetensors", lambda s: s.__setitem__(k, torch.full_like(s[k], float("inf"))))
    case(F, "inf in --weights", lambda: setup(cfg("o", weights=w_inf)), r"--weights .*NaN/inf")
    w_other = weights("other.safetensors", lambda s: s.__setitem__("visual.conv1.weight", torch.zeros(8, 3, 4, 4)))
    case(F, "--weights of another model (CLI)", lambda: cli(cfg("o", weights=w_other)), r"exit 2: .*another shape")
    w_miss = weights("miss.safetensors", lambda s: s.pop("visual.proj"))
    case(F, "--weights missing keys (CLI)", lambda: cli(cfg("o", weights=w_miss)), r"exit 2: .*missing keys(?!.*multi)")
    mc = json.loads(Path(demo["model_config"]).read_text())
    for name, ch in (("string width", {"width": "64"}), ("patch_size=0", {"patch_size": 0}),
                     ("absurd width", {"width": 10 ** 9}), ("layers=-1", {"layers": -1})):
        c2 = json.loads(json.dumps(mc))
        c2["vision_cfg"].update(ch)
        p = d / f"cfg-{abs(hash(name))}.json"
        p.write_text(json.dumps(c2))
        case(F, f"model config {name} (CLI)", lambda p=p: cli(cfg("o", model_config=str(p))),
             r"exit 2: .*(width|patch_size|layers)(?!.*multi)")
    (d / "afile").write_text("x")
    case(F, "--out is a file (CLI)", lambda: cli(cfg("afile")), r"exit 2: .*not a folder")
    run(cfg("a", stop_after_steps=1, epochs=2))
    ck = d / "a" / "checkpoint.pt"
    c = torch.load(str(ck), weights_only=True)
    c["coefficients"][next(iter(c["coefficients"]))][0] = float("nan")
    torch.save(c, str(d / "nan.pt"))
    case(F, "resume NaN checkpoint", lambda: setup(cfg("a", epochs=2, resume=str(d / "nan.pt"))), r"NaN/inf")
    tvp = d / "tvs.safetensors"
    tvs = ak.TaskVectors.load(str(demo["task_vectors"]))
    tvs.save(tvp)
    run(cfg("b", task_vectors=str(tvp), stop_after_steps=1, epochs=2))
    ak.TaskVectors({b: tvs[b] * 2 for b in tvs.blocks}, names=tvs.names).save(tvp)
    case(F, "resume with other task-vector content",
         lambda: setup(cfg("b", task_vectors=str(tvp), epochs=2, resume=str(d / "b" / "checkpoint.pt"))),
         r"another run.*task_vectors")
    case(F, "--lr inf", lambda: cli(cfg("o"), "--lr", "inf"), r"exit 2: .*--lr must be a finite")

    def fp16_skips():
        import functools

        real = torch.amp.GradScaler
        torch.amp.GradScaler = functools.partial(real, init_scale=2.0 ** 120)
        try:
            res = run(cfg("fp16", precision="fp16"))
        finally:
            torch.amp.GradScaler = real
        return bool(res.get("grad_scaler", {}).get("warning"))
    case(F, "fp16 GradScaler skipping every step is reported", fp16_skips)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-train", action="store_true", help="leave out the training family (the slowest)")
    args = ap.parse_args(argv)
    fams = [coefficient_files, module_api, peft_configs, task_vector_files, atomic_writes]
    if not args.skip_train:
        fams.append(training)
    with tempfile.TemporaryDirectory() as tmp:
        for fam in fams:
            d = Path(tmp) / fam.__name__
            d.mkdir()
            fam(d)
    rows = ["| case family | cases | OK | weak | bad |", "|---|---:|---:|---:|---:|"]
    tot = [0, 0, 0, 0]
    for fam, res in RESULTS.items():
        n = [len(res)] + [sum(v == k for _, v, _ in res) for k in ("ok", "weak", "bad")]
        tot = [a + b for a, b in zip(tot, n)]
        rows.append(f"| {fam} | {n[0]} | {n[1]} | {n[2]} | {n[3]} |")
    rows.append(f"| **total** | {tot[0]} | {tot[1]} | {tot[2]} | {tot[3]} |")
    print("\n".join(rows))
    for fam, res in RESULTS.items():
        for name, v, detail in res:
            if v != "ok":
                print(f"  {v.upper()}: [{fam}] {name}: {detail}")
    return 0 if tot[3] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
