"""PatchConfig: what patch() records on a patched module and writes into coefficient files; the
per-module constructors patch() swaps in with. Tiny modules, CPU, torch backend."""
import dataclasses
import json

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

import atlas_kernels as ak
from atlas_kernels.modules import AtlasLinear, AtlasMultiheadAttention, AtlasParameter
from atlas_kernels.partitions import Partition


def _tiny(seed=0):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))
    g = torch.Generator().manual_seed(seed + 1)
    tvs = ak.TaskVectors({"0.weight": torch.randn(2, 3, 4, generator=g), "1.bias": torch.randn(2, 3, generator=g)},
                         names=["a", "b"])
    return m, tvs


def test_patch_config_records_the_call_and_is_frozen():
    m, tvs = _tiny()
    ak.patch(m, tvs, partitions=2, partition_mode="hash", seed=5, backend="torch", batchnorm="train",
             grouped=False, fused_linear=False, fused_max_m=8)
    cfg = ak.PatchConfig.of(m)
    assert cfg == ak.PatchConfig(names=("a", "b"), blocks=("0.weight", "1.bias"), partitions=2,
                                 partition_mode="hash", seed=5, backend="torch", grouped=False, fused_linear=False,
                                 fused_max_m=8, batchnorm="train", linearised=False, resolved_backend="torch")
    assert cfg.n == 2
    assert ak.PatchConfig.of(nn.DataParallel(m)) is cfg  # read through wrappers, as coefficients() is
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 6
    ak.unpatch(m)
    assert not ak.is_patched(m)
    with pytest.raises(RuntimeError, match="not patched by atlas_kernels.patch"):
        ak.PatchConfig.of(m)


def test_coefficient_files_record_the_config_and_files_without_it_still_load(tmp_path):
    m, tvs = _tiny()
    ak.patch(m, tvs, partitions=2, partition_mode="hash", seed=5, backend="torch")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for c in ak.coefficients(m).values():
            c.copy_(torch.rand(c.shape, generator=g) * 2 - 1)
    want = {k: c.detach().clone() for k, c in ak.coefficients(m).items()}
    path = tmp_path / "c.safetensors"
    ak.save_coefficients(m, path)
    with safe_open(str(path), "pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    assert json.loads(meta["patch_config"]) == json.loads(ak.PatchConfig.of(m).to_json())
    assert json.loads(meta["patch_config"])["names"] == ["a", "b"]
    # the keys a load checks are still written on their own (older readers, and older files, use them)
    assert (meta["n"], meta["partitions"], meta["partition_mode"], meta["seed"]) == ("2", "2", "hash", "5")
    assert json.loads(meta["names"]) == ["a", "b"] and meta["linearised"] == "0"

    del meta["patch_config"]  # a file written before the key existed
    old = tmp_path / "old.safetensors"
    save_file(tensors, str(old), metadata=meta)
    fresh, _ = _tiny()
    ak.patch(fresh, tvs, partitions=2, partition_mode="hash", seed=5, backend="torch")
    ak.load_coefficients(fresh, old)
    for k, c in ak.coefficients(fresh).items():
        assert torch.equal(c, want[k])
    # the name/order check still reads the old key: reversed names are refused
    meta["names"] = json.dumps(["b", "a"])
    save_file(tensors, str(old), metadata=meta)
    with pytest.raises(ValueError, match="another order"):
        ak.load_coefficients(fresh, old)


def test_from_module_constructors():
    torch.manual_seed(0)
    lin, mha = nn.Linear(4, 3), nn.MultiheadAttention(4, 2)
    spec = ak.TaskVectors({"w": torch.randn(2, 3, 4)}).block_spec("w", Partition(1))
    a = AtlasLinear.from_module(lin, {"weight": spec}, backend="torch")
    assert type(a) is AtlasLinear and a._atlas_original is lin and set(a.adapted_blocks()) == {"weight"}
    assert AtlasLinear.supports(lin) and not AtlasLinear.supports(mha) and not AtlasMultiheadAttention.supports(lin)

    out_spec = ak.TaskVectors({"o": torch.randn(2, 4, 4)}).block_spec("o", Partition(1))
    b = AtlasMultiheadAttention.from_module(mha, {"out_proj.weight": out_spec}, backend="torch")
    assert set(b.adapted_blocks()) == set() and set(b.out_proj.adapted_blocks()) == {"weight"}

    ln1, ln2 = nn.LayerNorm(3), nn.LayerNorm(3)
    tied = ak.TaskVectors({"b": torch.randn(2, 3)}).block_spec("b", Partition(1))
    assert AtlasParameter.adopt(ln1, {"bias": tied}, backend="torch") is ln1
    AtlasParameter.adopt(ln2, {}, backend="torch", aliases={"bias": (ln1, "bias")})
    assert isinstance(ln1, AtlasParameter) and isinstance(ln2, nn.LayerNorm)
    assert type(ln1) is type(ln2).__mro__[0] or type(ln1).__name__ == "AtlasLayerNorm"
    assert set(ln1._atlas_adapted()) == {"bias"} and not ln2._atlas_adapted()  # one set of coefficients
    with torch.no_grad():
        ln1.bias_coef.fill_(0.5)
    torch.testing.assert_close(ln2.bias, ln1.bias)  # both owners read the one composed value


def test_unpatch_through_a_wrapper_unpatches_the_module_inside_whole():
    m, tvs = _tiny()
    flags = {n: p.requires_grad for n, p in m.named_parameters()}
    want = m[0].weight.detach().double() + 0.5 * tvs["0.weight"].double().sum(0)
    ak.patch(m, tvs, backend="torch")
    with torch.no_grad():
        for c in ak.coefficients(m).values():
            c.fill_(0.5)
    w = nn.DataParallel(m)
    assert ak.unpatch(w) is w
    assert not ak.is_patched(m) and type(m[0]) is nn.Linear
    assert {n: p.requires_grad for n, p in m.named_parameters()} == flags
    torch.testing.assert_close(m[0].weight.double(), want, rtol=1e-6, atol=1e-6)
