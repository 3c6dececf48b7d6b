"""patch / unpatch / coefficients on open_clip ViT-B/32 (random weights), and bad input."""
import copy
import warnings

import pytest
import torch
import torch.nn as nn

import atlas_kernels as ak
from atlas_kernels import reference

from ._util import assert_close, coefficient_gradient_errors, float64_reference, rel_err

open_clip = pytest.importorskip("open_clip")


@pytest.fixture(scope="module")
def vit():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = open_clip.create_model("ViT-B-32", pretrained=None)
    return model.visual.eval()


def _tvs(module, n, seed=0, std=0.02):
    g = torch.Generator().manual_seed(seed)
    return ak.TaskVectors({k: torch.randn((n, *p.shape), generator=g) * std for k, p in module.named_parameters()})


@pytest.mark.parametrize("partitions,mode", [(1, "contiguous"), (3, "contiguous")])
def test_whole_vit_b32_against_float64_reference(vit, partitions, mode):
    n = 3
    tvs = _tvs(vit, n)
    patched = ak.patch(copy.deepcopy(vit), tvs, partitions=partitions, partition_mode=mode, seed=11, backend="torch")
    coefs = ak.coefficients(patched)
    assert len(coefs) == 152 and set(coefs) == {k for k, _ in vit.named_parameters()}
    trainable = [p for p in patched.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(c) for c in coefs.values()}
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for c in coefs.values():
            c.copy_(torch.randn(c.shape, generator=g) * 0.5)
    x = torch.randn(1, 3, 224, 224, generator=g)
    out = patched(x)

    ref, c64 = float64_reference(vit, tvs, coefs, x, partitions, mode, 11)
    assert rel_err(out, ref) < 1e-5
    assert_close(out, ref, rtol=1e-3, atol=1e-4 * ref.abs().max().item())
    worst = max(coefficient_gradient_errors(out, ref, coefs, c64, g).values())
    assert worst < 1e-4, worst


def test_patch_backend_auto_uses_torch_on_cpu_and_unpatch_round_trip_is_exact(vit):
    original = copy.deepcopy(vit)
    tvs = _tvs(vit, 2)
    m = ak.patch(copy.deepcopy(vit), tvs)  # coefficients start at 0: the pre-trained model
    with torch.no_grad():
        x = torch.randn(1, 3, 224, 224)
        assert_close(m(x), original(x), rtol=1e-5, atol=1e-5)
    ak.unpatch(m)
    assert not ak.is_patched(m)
    assert type(m.transformer.resblocks[0].attn) is nn.MultiheadAttention
    sd, ref = m.state_dict(), original.state_dict()
    assert sd.keys() == ref.keys()
    for k in ref:
        assert torch.equal(sd[k], ref[k]), k  # zero coefficients merge back to exactly theta0
    assert all(p.requires_grad for p in m.parameters())


def test_unpatch_merges_in_float32(vit):
    tvs = _tvs(vit, 2)
    m = ak.patch(copy.deepcopy(vit), tvs, partitions=2)
    coefs = ak.coefficients(m)
    with torch.no_grad():
        for c in coefs.values():
            c.normal_()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        y = m(x)
    expect = {k: reference.compose(p, tvs[k], coefs[k].detach(), ak.Partition.for_block(k, 2)).float()
              for k, p in vit.named_parameters()}
    ak.unpatch(m)
    for k, p in m.named_parameters():
        assert_close(p, expect[k], rtol=1e-6, atol=1e-6, what=k)
    with torch.no_grad():
        assert_close(m(x), y, rtol=1e-4, atol=1e-4)


def test_partial_task_vectors_and_blocks_filter(vit):
    params = dict(vit.named_parameters())
    names = ["transformer.resblocks.0.mlp.c_fc.weight", "transformer.resblocks.0.ln_1.bias", "proj"]
    tvs = ak.TaskVectors({k: torch.randn(2, *params[k].shape) * 0.01 for k in names})
    m = ak.patch(copy.deepcopy(vit), tvs)
    assert sorted(ak.coefficients(m)) == sorted(names)
    m2 = ak.patch(copy.deepcopy(vit), tvs, blocks="weights")
    assert sorted(ak.coefficients(m2)) == ["proj", "transformer.resblocks.0.mlp.c_fc.weight"]
    m3 = ak.patch(copy.deepcopy(vit), tvs, blocks=["proj"])
    assert list(ak.coefficients(m3)) == ["proj"]
    with pytest.raises(ValueError, match=r"blocks: \['nope'\] are not blocks"):
        ak.patch(copy.deepcopy(vit), tvs, blocks=["nope"])


def test_coefficient_files_round_trip_and_refusals(vit, tmp_path):
    tvs = _tvs(vit, 3)
    m = ak.patch(copy.deepcopy(vit), tvs, partitions=2, partition_mode="hash", seed=4)
    with torch.no_grad():
        for c in ak.coefficients(m).values():
            c.normal_()
    path = tmp_path / "coef.safetensors"
    ak.save_coefficients(m, path)
    fresh = ak.patch(copy.deepcopy(vit), tvs, partitions=2, partition_mode="hash", seed=4)
    ak.load_coefficients(fresh, path)
    for k, c in ak.coefficients(m).items():
        assert torch.equal(ak.coefficients(fresh)[k], c)

    other_k = ak.patch(copy.deepcopy(vit), tvs, partitions=3, partition_mode="hash", seed=4)
    with pytest.raises(ValueError, match=r"partitions: file 2, model 3"):
        ak.load_coefficients(other_k, path)
    other_seed = ak.patch(copy.deepcopy(vit), tvs, partitions=2, partition_mode="hash", seed=5)
    with pytest.raises(ValueError, match=r"seed: file 4, model 5"):
        ak.load_coefficients(other_seed, path)
    other_n = ak.patch(copy.deepcopy(vit), _tvs(vit, 2), partitions=2, partition_mode="hash", seed=4)
    with pytest.raises(ValueError, match=r"n: file 3, model 2"):
        ak.load_coefficients(other_n, path)
    fewer = ak.patch(copy.deepcopy(vit), tvs.subset(tvs.blocks[:10]), partitions=2, partition_mode="hash", seed=4)
    with pytest.raises(ValueError, match=r"the file has 142 block\(s\) the model lacks"):
        ak.load_coefficients(fewer, path)

    # NaN in a file: refused, and nothing half-loaded
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(str(path), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    tensors["proj"][1, 0] = float("nan")
    save_file(tensors, str(tmp_path / "nan.safetensors"), metadata=meta)
    target = ak.patch(copy.deepcopy(vit), tvs, partitions=2, partition_mode="hash", seed=4)
    with pytest.raises(ValueError, match=r"block 'proj' are not finite"):
        ak.load_coefficients(target, tmp_path / "nan.safetensors")
    assert all((c == 0).all() for c in ak.coefficients(target).values())
    (tmp_path / "trunc.safetensors").write_bytes(path.read_bytes()[:-16])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        ak.load_coefficients(target, tmp_path / "trunc.safetensors")


def test_nonfinite_coefficients_are_never_merged_or_saved(vit, tmp_path):
    m = ak.patch(copy.deepcopy(vit), _tvs(vit, 2))
    with torch.no_grad():
        ak.coefficients(m)["conv1.weight"][0] = float("inf")
    with pytest.raises(ValueError, match=r"block 'conv1\.weight' hold NaN or inf; not saving"):
        ak.save_coefficients(m, tmp_path / "c.safetensors")
    with pytest.raises(ValueError, match=r"block 'conv1\.weight' hold NaN or inf; refusing to merge"):
        ak.unpatch(m)
    assert ak.is_patched(m)  # still whole


def test_bad_patch_input(vit):
    params = dict(vit.named_parameters())
    m = copy.deepcopy(vit)
    wrong_name = ak.TaskVectors({"visual.proj": torch.randn(2, *params["proj"].shape)})
    with pytest.raises(ValueError, match=r"does not have.*visual\.proj.*prefix='visual\.'"):
        ak.patch(m, wrong_name)
    wrong_shape = ak.TaskVectors({"proj": torch.randn(2, 512, 768)})
    with pytest.raises(ValueError, match=r"block 'proj'.*shape \(768, 512\).*\(512, 768\)"):
        ak.patch(m, wrong_shape)
    other_device = ak.TaskVectors({"proj": torch.randn(2, 768, 512, device="meta")})
    with pytest.raises(ValueError, match=r"block 'proj': task vectors are on meta.*on cpu.*\.to\('cpu'\)"):
        ak.patch(m, other_device)
    ok = ak.TaskVectors({"proj": torch.randn(2, 768, 512)})
    with pytest.raises(ValueError, match="partitions must be an integer >= 1"):
        ak.patch(m, ok, partitions=0)
    with pytest.raises(ValueError, match="partition_mode must be one of"):
        ak.patch(m, ok, partition_mode="random")
    with pytest.raises(ValueError, match="backend must be one of"):
        ak.patch(m, ok, backend="jax")
    assert not ak.is_patched(m)
    ak.patch(m, ok)
    with pytest.raises(RuntimeError, match="already patched"):
        ak.patch(m, ok)
    with pytest.raises(RuntimeError, match="was not patched"):
        ak.unpatch(copy.deepcopy(vit))
    with pytest.raises(RuntimeError, match="was not patched"):
        ak.coefficients(copy.deepcopy(vit))


def test_ext_backend_not_built_is_refused_at_patch():
    if ak.ops.unavailable("ext", torch.device("cpu")) is None:
        pytest.skip("the compiled extension is built here (test_backends.py covers the unbuilt case too)")
    lin = nn.Sequential(nn.Linear(4, 3))
    with pytest.raises(ValueError, match="backend='ext' cannot run.*needs the optional compiled extension"):
        ak.patch(lin, ak.TaskVectors({"0.weight": torch.randn(1, 3, 4)}), backend="ext")
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="backend='ext' cannot run"):
        ak.patch(lin, ak.TaskVectors({"0.weight": torch.randn(1, 3, 4)}), backend="cuda")


def test_training_moves_coefficients_only(vit):
    m = ak.patch(copy.deepcopy(vit), _tvs(vit, 2))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    opt = torch.optim.AdamW(ak.coefficients(m).values(), lr=1e-2)
    loss = m(torch.randn(2, 3, 224, 224)).square().mean()
    loss.backward()
    opt.step()
    after = m.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.endswith("_coef") or ("parametrizations." in k and k.endswith(".coef")) for k in changed)


def test_buffers_in_task_vectors_are_skipped_with_a_warning():
    # State dicts of BatchNorm models hold running statistics beside the parameters.
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    pre = {k: v.clone() for k, v in model.state_dict().items()}
    ft = {k: (v + 0.1 if v.is_floating_point() else v) for k, v in pre.items()}
    tvs = ak.TaskVectors.from_state_dicts(pre, [ft])
    assert "1.running_mean" in tvs.blocks and "1.num_batches_tracked" not in tvs.blocks
    with pytest.warns(UserWarning, match=r"name 2 buffer\(s\).*1\.running_mean.*not parameters"):
        ak.patch(model, tvs)
    assert sorted(ak.coefficients(model)) == ["0.bias", "0.weight", "1.bias", "1.weight"]
    model(torch.randn(2, 3, 5, 5))
