"""The task-vector papers' checkpoints as they are: pickled whole ``src.modeling.ImageEncoder``
modules holding open_clip 2.0.2 classes, read in a process where none of them can be imported.

The files are written by ``_published.py`` in a subprocess whose stand-in ``src`` and ``open_clip``
packages shadow the installed open_clip, holding a real open_clip tower's parameters (text
leftovers included) and torchvision transforms, an enum and a plain function as attributes.
"""
import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import atlas_kernels as ak

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TINY = {"embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
        "text_cfg": {"context_length": 16, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1}}
TINY_RN = {"embed_dim": 32,
           "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8, "head_width": 8},
           "text_cfg": {"context_length": 16, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1}}
# Importing any of these in the reading process fails (and is recorded).
BLOCKER = textwrap.dedent("""
    import sys
    class _Block:
        tried = []
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                _Block.tried.append(name)
                raise ImportError("blocked in this test: " + name)
    sys.meta_path.insert(0, _Block())
""")


def env():
    return dict(os.environ, OMP_NUM_THREADS="1",
                PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def run_py(code, blocked, cwd, timeout=300):
    src = f"BLOCKED = {sorted(blocked)!r}\n" + BLOCKER + textwrap.dedent(code)
    r = subprocess.run([sys.executable, "-c", src], cwd=cwd, env=env(), capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def _clip_sd(cfg, seed):
    import open_clip

    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = open_clip.model.CLIP(embed_dim=cfg["embed_dim"], vision_cfg=cfg["vision_cfg"], text_cfg=cfg["text_cfg"])
    sd = {k: v.detach().clone().contiguous() for k, v in m.state_dict().items()}
    # the published ImageEncoder deletes the text transformer; its other text blocks stay
    return {k: v for k, v in sd.items() if not k.startswith("transformer.")}


def _finetune(sd, seed):
    g = torch.Generator().manual_seed(seed)
    return {k: (v + 0.01 * torch.randn(v.shape, generator=g) if k.startswith("visual.") and v.is_floating_point()
                else v.clone()) for k, v in sd.items()}


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """Both published layouts, ViT (zip and legacy files) and a tiny ModifiedResNet."""
    pytest.importorskip("open_clip")
    pytest.importorskip("torchvision")
    d = tmp_path_factory.mktemp("published")
    (d / "tiny-vit.json").write_text(json.dumps(TINY))
    (d / "tiny-rn.json").write_text(json.dumps(TINY_RN))
    pre = _clip_sd(TINY, 0)
    fts = {"Cars": _finetune(pre, 1), "DTD": _finetune(pre, 2)}
    fts["SUN397"] = {k: v.clone() for k, v in fts["Cars"].items()}  # a mislabelled duplicate
    rn_pre = _clip_sd(TINY_RN, 3)
    rn_ft = _finetune(rn_pre, 4)
    files, sds = [], d / "sds"
    sds.mkdir()

    def add(sd, out, kind="encoder", legacy=False, normalize=True):
        p = sds / f"{len(files)}.safetensors"
        save_file(sd, str(p))
        files.append({"sd": str(p), "out": str(out), "kind": kind, "legacy": legacy, "normalize": normalize})

    tv, at = d / "task_vectors", d / "atlas"
    add(pre, tv / "zeroshot.pt")
    for i, (name, ft) in enumerate(fts.items()):
        add(ft, tv / name / "finetuned.pt", legacy=(i == 1))
        add(ft, at / f"{name}Val" / "finetuned.pt", legacy=(i != 1))
        add(pre, at / f"{name}Val" / "zeroshot.pt", legacy=(i == 2))
        head = {"weight": torch.randn(3 + i, 32), "bias": torch.zeros(3 + i)}
        add(head, tv / f"head_{name}.pt", kind="head")
        add(head, at / f"head_{name}Val.pt", kind="head", legacy=True)
    add(rn_pre, d / "rn" / "zeroshot.pt", legacy=True)
    add(rn_ft, d / "rn" / "Cars" / "finetuned.pt")
    job = d / "job.json"
    job.write_text(json.dumps({"files": files}))
    r = subprocess.run([sys.executable, str(HERE / "_published.py"), str(d / "pkgs"), str(job)],
                       cwd=d, env=env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    taus = {n: {k[len("visual."):]: ft[k].float() - pre[k].float() for k in pre
                if k.startswith("visual.") and pre[k].is_floating_point()} for n, ft in fts.items()}
    rn_tau = {k[len("visual."):]: rn_ft[k].float() - rn_pre[k].float() for k in rn_pre
              if k.startswith("visual.") and rn_pre[k].is_floating_point()}
    return {"dir": d, "tv": tv, "atlas": at, "taus": taus, "rn_tau": rn_tau, "pre": pre}


def _check_bitwise(path, taus, names):
    tvs = ak.TaskVectors.load(str(path))
    assert tvs.names == names
    want = taus[names[0]]
    assert sorted(tvs.blocks) == sorted(want)
    for i, n in enumerate(names):
        for b in tvs.blocks:
            assert torch.equal(tvs[b][i], taus[n][b]), (n, b)


def test_files_really_need_the_original_classes(published):
    """Sanity: the ordinary unpickler cannot read them without src.modeling (so the test is real)."""
    r = subprocess.run([sys.executable, "-c", "import sys, torch; torch.load(sys.argv[1], weights_only=False)",
                        str(published["tv"] / "zeroshot.pt")], env=env(), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode != 0 and "src" in r.stderr


def test_from_checkpoints_bitwise_in_a_clean_process(published):
    d, tv, at = published["dir"], published["tv"], published["atlas"]
    run_py(f"""
        import atlas_kernels as ak
        tv, at, d = {str(tv)!r}, {str(at)!r}, {str(d)!r}
        a = ak.TaskVectors.from_checkpoints(tv + "/zeroshot.pt", [tv + "/Cars/finetuned.pt",
            tv + "/DTD/finetuned.pt"], names=["Cars", "DTD"], prefix="model.visual.")
        a.save(d + "/a.safetensors")
        b = ak.TaskVectors.from_checkpoints(at + "/DTDVal/zeroshot.pt", [at + "/CarsVal/finetuned.pt",
            at + "/DTDVal/finetuned.pt"], names=["Cars", "DTD"], prefix="auto")
        b.save(d + "/b.safetensors")
        r = ak.TaskVectors.from_checkpoints(d + "/rn/zeroshot.pt", [d + "/rn/Cars/finetuned.pt"],
            names=["Cars"], prefix="auto")
        r.save(d + "/rn.safetensors")
        h = ak.load_head(tv + "/head_DTD.pt")
        assert h.normalize is True and tuple(h.weight.shape) == (4, 32), h
        bad = [m for m in sys.modules if m.split(".")[0] in BLOCKED]
        assert not bad and not _Block.tried, (bad, _Block.tried)
    """, {"src", "open_clip", "torchvision", "PIL"}, d)
    _check_bitwise(d / "a.safetensors", published["taus"], ["Cars", "DTD"])
    _check_bitwise(d / "b.safetensors", published["taus"], ["Cars", "DTD"])
    _check_bitwise(d / "rn.safetensors", {"Cars": published["rn_tau"]}, ["Cars"])


def test_recovered_state_dict_matches_and_skips_non_persistent(published):
    sd = ak.load_state_dict_file(published["tv"] / "DTD" / "finetuned.pt")  # legacy format
    assert "model.attn_mask" not in sd
    assert {"model.token_embedding.weight", "model.logit_scale", "model.text_projection"} <= set(sd)
    pre = ak.load_state_dict_file(published["tv"] / "zeroshot.pt")
    assert set(pre) == {"model." + k for k in published["pre"]}
    # the transforms, the enum and the plain function were recorded as stand-ins, never resolved
    from atlas_kernels import safe_pickle

    enc = safe_pickle.restricted_load(published["tv"] / "zeroshot.pt")
    assert enc.cls.name == "src.modeling.ImageEncoder"
    compose = enc.state["train_preprocess"]
    assert compose.cls.name == "torchvision.transforms.transforms.Compose"
    steps = compose.state["transforms"]
    assert steps[2].name == "open_clip.transform._convert_to_rgb"
    mode = steps[0].state["interpolation"]
    assert mode.how == "call" and mode.cls.name == "torchvision.transforms.functional.InterpolationMode"
    assert enc.state["_modules"]["model"].state["_modules"]["visual"].cls.name == "open_clip.model.VisualTransformer"
    assert all(torch.equal(pre["model." + k], v) for k, v in published["pre"].items())


def test_import_cli(published, tmp_path):
    """Both layouts, in one clean process where src.modeling cannot be imported."""
    d = published["dir"]
    cmds = [["import", str(published[lay]), "--model-config", str(d / "tiny-vit.json"),
             "--out", str(tmp_path / f"{lay}.safetensors"), "--heads", str(tmp_path / f"heads-{lay}")]
            for lay in ("tv", "atlas")]
    r = run_py(f"""
        from atlas_kernels.task_vectors.cli import main
        for cmd in {cmds!r}:
            assert main(cmd) == 0, cmd
            print("=====")
        assert not [m for m in sys.modules if m.split(".")[0] == "src"]
    """, {"src"}, tmp_path)
    names = ["Cars", "DTD", "SUN397"]
    for lay, text in zip(("tv", "atlas"), r.stdout.split("=====")[:2]):
        _check_bitwise(tmp_path / f"{lay}.safetensors", published["taus"], names)
        assert "identical" in text and "Cars and SUN397" in text
        assert "dropped" in text and "MiB" in text and "token_embedding" in text
        for n in names:
            assert f"  {n} " in text and "|tau|" in text
        h = ak.load_head(tmp_path / f"heads-{lay}" / "head_DTD.safetensors")
        ref = ak.load_head(published[lay] / ("head_DTD.pt" if lay == "tv" else "head_DTDVal.pt"))
        assert torch.equal(h.weight, ref.weight) and torch.equal(h.bias, ref.bias) and h.normalize


def test_import_checks_the_model_and_datasets(published, tmp_path, capsys):
    from atlas_kernels.task_vectors.cli import main

    d = published["dir"]
    rc = main(["import", str(published["tv"]), "--model-config", str(d / "tiny-rn.json"),
               "--out", str(tmp_path / "x.safetensors")])
    err = capsys.readouterr().err
    assert rc == 2 and "does not fit open_clip 'tiny-rn'" in err and not (tmp_path / "x.safetensors").exists()
    rc = main(["import", str(published["tv"]), "--model-config", str(d / "tiny-vit.json"),
               "--out", str(tmp_path / "x.safetensors"), "--datasets", "DTD", "Flowers"])
    assert rc == 2 and "Flowers" in capsys.readouterr().err
    rc = main(["import", str(published["atlas"]), "--model-config", str(d / "tiny-vit.json"),
               "--out", str(tmp_path / "y.safetensors"), "--datasets", "DTDVal", "cars", "--storage", "float16"])
    assert rc == 0
    tvs = ak.TaskVectors.load(str(tmp_path / "y.safetensors"))
    assert tvs.names == ["DTD", "Cars"] and tvs.storage == "float16"


def test_import_linearised_files(published, tmp_path, capsys, monkeypatch):
    """linear_*.pt: named as skipped without linearised support; handed to it where installed."""
    import shutil
    import types

    from atlas_kernels.task_vectors.cli import main

    d = published["dir"]
    root = tmp_path / "root"
    shutil.copytree(published["tv"], root)
    shutil.copy(root / "zeroshot.pt", root / "linear_zeroshot.pt")
    shutil.copy(root / "DTD" / "finetuned.pt", root / "DTD" / "linear_finetuned.pt")
    args = ["import", str(root), "--model-config", str(d / "tiny-vit.json"), "--out", str(tmp_path / "t.safetensors")]
    monkeypatch.setitem(sys.modules, "atlas_kernels.checkpoints.linearised", None)  # no reader, whatever the tree holds
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "skipped 2 linearised checkpoint(s)" in out and "linear_finetuned.pt" in out
    assert not (tmp_path / "t.linear.safetensors").exists()

    fake = types.ModuleType("atlas_kernels.checkpoints.linearised")
    # these copies are plain pickled modules: "not the positional format" for any file it is asked about
    fake.is_linearised_state_dict = lambda sd: False
    monkeypatch.setitem(sys.modules, "atlas_kernels.checkpoints.linearised", fake)
    assert main(args + ["--prefix", "model.visual."]) == 0
    assert (tmp_path / "t.linear.safetensors").is_file()
    assert ak.TaskVectors.load(str(tmp_path / "t.linear.safetensors")).names == ["DTD"]


def test_train_with_published_weights_and_head(published, tmp_path, capsys):
    """--weights zeroshot.pt (an ImageEncoder without its text transformer) and --head head_Cars.pt:
    training runs, and the zero-shot accuracy it reports is the head's own on the validation set."""
    from PIL import Image

    from atlas_kernels.task_vectors.cli import main as tv_main
    from atlas_kernels.train.cli import main as train_main
    from atlas_kernels.train.model import build_model, head_logits, load_task_heads

    d, tv = published["dir"], published["tv"]
    cfg = str(d / "tiny-vit.json")
    assert tv_main(["import", str(tv), "--model-config", cfg, "--out", str(tmp_path / "tvs.safetensors"),
                    "--datasets", "Cars", "DTD"]) == 0
    data = tmp_path / "data"
    for split in ("train", "val"):
        for j, c in enumerate(("a", "b", "c")):  # head_Cars has 3 classes
            (data / split / c).mkdir(parents=True)
            for k in range(2):
                Image.new("RGB", (32, 32), (80 * j + 20 * k, 90, 200 - 60 * j)).save(data / split / c / f"{k}.png")
    base = ["--model-config", cfg, "--weights", str(tv / "zeroshot.pt"), "--task-vectors",
            str(tmp_path / "tvs.safetensors"), "--objective", "fewshot", "--train", str(data / "train"),
            "--val", str(data / "val"), "--epochs", "1", "--batch-size", "3", "--workers", "0", "--quiet",
            "--precision", "fp32"]
    # without --head the missing text tower is an error, not random zero-shot heads
    assert train_main(base + ["--out", str(tmp_path / "r0")]) == 2
    assert "no text tower" in capsys.readouterr().err
    assert train_main(base + ["--head", str(tv / "head_DTD.pt"), "--out", str(tmp_path / "r1")]) == 2
    assert "4 classes" in capsys.readouterr().err
    assert train_main(base + ["--head", str(tv / "head_Cars.pt"), "--out", str(tmp_path / "r2")]) == 0
    metrics = json.loads((tmp_path / "r2" / "metrics.json").read_text())
    zs = metrics["zero_shot"] if "zero_shot" in metrics else metrics["history"][0]

    # the same accuracy by hand: the published weights' image tower and the head, no text tower
    model = build_model("tiny-vit", str(tv / "zeroshot.pt"), text_tower=False)
    from atlas_kernels.train import data as D

    pre = D.model_preprocess(model)
    _, samples = D.scan_image_folder(str(data / "val"), "val")

    class T:
        classnames, name = ["a", "b", "c"], "val"
    head = load_task_heads([str(tv / "head_Cars.pt")], [T], model, "cpu")[0]
    x = torch.stack([pre.eval(Image.open(p).convert("RGB")) for p, _ in samples])
    y = torch.tensor([lab for _, lab in samples])
    with torch.no_grad():
        logits = head_logits(head, model.visual(x), 1.0)
        ref = model.visual(x).float()
        ref = (ref / ref.norm(dim=-1, keepdim=True)) @ head.weight.T + head.bias
    assert torch.allclose(logits, ref, atol=1e-5)
    got = list(zs.values())[0]
    assert round(got["acc"] * len(y)) == int((logits.argmax(-1) == y).sum()), (got, logits)
    loss = float(torch.nn.functional.cross_entropy(logits, y))
    assert abs(got["loss"] - loss) < 1e-4 * max(1.0, loss), (got, loss)
