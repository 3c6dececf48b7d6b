"""The published linearised checkpoint format (tangent_task_arithmetic's LinearizedImageEncoder.save):
positional model.params0.<i> / model.params.<i> in ImageEncoder.named_parameters() order, model_name."""
import json
import warnings

import pytest
import torch
import torch.nn as nn

import atlas_kernels as ak
from atlas_kernels.checkpoints import linearised as lc

open_clip = pytest.importorskip("open_clip")

_CFG = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
        "text_cfg": {"context_length": 8, "vocab_size": 50, "width": 16, "heads": 2, "layers": 1}}


@pytest.fixture(scope="module")
def arch(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cfg")
    for name, width in (("atlas-test-lin-a", 32), ("atlas-test-lin-b", 48)):
        cfg = json.loads(json.dumps(_CFG))
        cfg["vision_cfg"]["width"] = width
        (folder / f"{name}.json").write_text(json.dumps(cfg))
        open_clip.add_model_config(folder / f"{name}.json")
    return "atlas-test-lin-a"


class _ImageEncoder(nn.Module):
    """As the paper's ImageEncoder(keep_lang=False): the CLIP model without its text transformer."""

    def __init__(self, name):
        super().__init__()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.model = open_clip.create_model(name, pretrained=None)
        delattr(self.model, "transformer")


def _save_linearised(path, params0, params, model_name):
    """As LinearizedImageEncoder.save: state_dict() of model.params / model.params0 ParameterLists
    plus a model_name string, torch.save'd."""
    sd = {}
    for i, (p0, p) in enumerate(zip(params0, params)):
        sd[f"model.params0.{i}"] = p0
        sd[f"model.params.{i}"] = p
    sd["model_name"] = model_name
    torch.save(sd, str(path))
    return sd


def test_published_format_recovers_task_vectors_exactly(arch, tmp_path):
    enc = _ImageEncoder(arch)
    names = [k for k, _ in enc.named_parameters()]
    assert not names[0].startswith("model.visual.")  # text-tower leftovers come first
    params0 = [p.detach().clone() for p in enc.parameters()]
    g = torch.Generator().manual_seed(0)
    params = [p + torch.randn(p.shape, generator=g) * 0.01 for p in params0]
    _save_linearised(tmp_path / "linear_zeroshot.pt", params0, params0, arch)
    sd = _save_linearised(tmp_path / "linear_finetuned.pt", params0, params, arch + "__pretrained__openai")
    assert lc.is_linearised_state_dict(torch.load(tmp_path / "linear_finetuned.pt", weights_only=True))
    assert not lc.is_linearised_state_dict({"visual.conv1.weight": params0[0]})
    tvs = ak.TaskVectors.from_checkpoints(tmp_path / "linear_zeroshot.pt", [tmp_path / "linear_finetuned.pt"],
                                          prefix="visual.")
    visual = [(n[len("model.visual."):], i) for i, n in enumerate(names) if n.startswith("model.visual.")]
    assert sorted(tvs.blocks) == sorted(b for b, _ in visual)
    for block, i in visual:
        assert torch.equal(tvs[block][0], params[i] - params0[i]), block
    named = lc.task_vector(sd)
    assert set(named) == {n[len("model."):] for n in names}
    i = names.index("model.logit_scale")
    assert torch.equal(named["logit_scale"], params[i] - params0[i])


def test_shape_mismatch_names_the_position(arch, tmp_path):
    enc = _ImageEncoder(arch)
    params0 = [p.detach().clone() for p in enc.parameters()]
    bad = list(params0)
    bad[5] = torch.zeros(3, 3)
    _save_linearised(tmp_path / "bad.pt", bad, bad, arch)
    with pytest.raises(ValueError, match=r"position 5 .*has shape \(3, 3\), expected"):
        ak.load_state_dict_file(tmp_path / "bad.pt")


def test_checkpoint_of_another_model(arch, tmp_path):
    other = _ImageEncoder("atlas-test-lin-b")
    params0 = [p.detach().clone() for p in other.parameters()]
    _save_linearised(tmp_path / "other.pt", params0, params0, arch)  # says model a, holds model b
    with pytest.raises(ValueError, match="position .* expected .*another model"):
        ak.load_state_dict_file(tmp_path / "other.pt")
    _save_linearised(tmp_path / "few.pt", params0[:4], params0[:4], arch)
    with pytest.raises(ValueError, match="4 positional model.params tensors"):
        ak.load_state_dict_file(tmp_path / "few.pt")
    _save_linearised(tmp_path / "unknown.pt", params0, params0, "no-such-arch")
    with pytest.raises(ValueError, match="open_clip has no architecture"):
        ak.load_state_dict_file(tmp_path / "unknown.pt")


def test_import_command_reads_published_linearised_files(arch, tmp_path, capsys):
    """`task_vectors import` on a task_vectors-layout folder holding linear_zeroshot.pt and
    <Dataset>/linear_finetuned.pt beside the standard files writes OUT.linear.safetensors with
    tau = params - params0 per image-tower block."""
    from atlas_kernels.task_vectors.cli import main

    enc = _ImageEncoder(arch)
    names = [k for k, _ in enc.named_parameters()]
    params0 = [p.detach().clone() for p in enc.parameters()]
    g = torch.Generator().manual_seed(3)
    params = [p + torch.randn(p.shape, generator=g) * 0.01 for p in params0]
    root = tmp_path / "root"
    (root / "Cars").mkdir(parents=True)
    torch.save(enc.state_dict(), str(root / "zeroshot.pt"))
    torch.save({k: v + 0.01 for k, v in enc.state_dict().items()}, str(root / "Cars" / "finetuned.pt"))
    _save_linearised(root / "linear_zeroshot.pt", params0, params0, arch)
    _save_linearised(root / "Cars" / "linear_finetuned.pt", params0, params, arch)
    out = tmp_path / "tvs.safetensors"
    assert main(["import", str(root), "--model", arch, "--out", str(out)]) == 0, capsys.readouterr().err
    lin = ak.TaskVectors.load(str(tmp_path / "tvs.linear.safetensors"))
    assert lin.names == ["Cars"]
    visual = {n[len("model.visual."):]: i for i, n in enumerate(names) if n.startswith("model.visual.")}
    assert sorted(lin.blocks) == sorted(visual)
    for block, i in visual.items():
        assert torch.equal(lin[block][0], params[i] - params0[i]), block
