"""PEFT LoRA adapters: write, read back with the scaling folded in, every refusal, match_blocks."""
import json
import logging
import math
import os

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

from atlas_kernels.peft import lora_scaling, match_blocks, read_peft_adapter, write_peft_adapter


def _factors(shapes, r, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {b: (torch.randn(r, i, generator=g), torch.randn(o, r, generator=g)) for b, (o, i) in shapes.items()}


def _delta64(a, b, scaling=1.0):
    return scaling * (b.double() @ a.double())


def _rewrite_config(d, **changes):
    path = os.path.join(d, "adapter_config.json")
    with open(path) as fh:
        cfg = json.load(fh)
    cfg.update(changes)
    with open(path, "w") as fh:
        json.dump(cfg, fh)


def _write_raw(d, tensors, **config):
    os.makedirs(d, exist_ok=True)
    save_file(tensors, os.path.join(d, "adapter_model.safetensors"))
    cfg = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["fc"]}
    cfg.update(config)
    with open(os.path.join(d, "adapter_config.json"), "w") as fh:
        json.dump(cfg, fh)
    return d


SHAPES = {"enc.fc1.weight": (6, 5), "enc.fc2.weight": (3, 6)}


# ------------------------------------------------------------------------------------------ reading
def test_roundtrip_folds_scaling_into_b_and_matches_delta_in_float64(tmp_path):
    f = _factors(SHAPES, r=4)
    write_peft_adapter(tmp_path, f, r=4, lora_alpha=16, target_modules=["fc1", "fc2"])
    keys = sorted(json.load(open(tmp_path / "adapter_config.json")))
    assert "peft_type" in keys and "lora_alpha" in keys
    out = read_peft_adapter(tmp_path)
    assert sorted(out) == sorted(SHAPES)
    for block, (a, b) in f.items():
        ra, rb = out[block]
        assert ra.dtype == rb.dtype == torch.float32
        assert torch.equal(ra, a)                      # A unchanged
        assert torch.allclose(rb, b * 4.0)             # B carries lora_alpha / r = 16 / 4
        torch.testing.assert_close(_delta64(ra, rb), _delta64(a, b, 16 / 4), rtol=1e-6, atol=0)


def test_file_path_and_bf16_factors(tmp_path):
    f = _factors(SHAPES, r=2)
    write_peft_adapter(tmp_path, f, r=2, lora_alpha=2, target_modules=["fc1"], dtype=torch.bfloat16)
    out = read_peft_adapter(tmp_path / "adapter_model.safetensors")
    a, b = out["enc.fc1.weight"]
    assert a.dtype == torch.float32
    torch.testing.assert_close(_delta64(a, b), _delta64(f["enc.fc1.weight"][0].bfloat16().float(),
                                                        f["enc.fc1.weight"][1].bfloat16().float()), rtol=1e-6, atol=0)


def test_rslora_scaling(tmp_path):
    f = _factors(SHAPES, r=4)
    write_peft_adapter(tmp_path, f, r=4, lora_alpha=8, target_modules=["fc1"], use_rslora=True)
    out = read_peft_adapter(tmp_path)
    a, b = f["enc.fc2.weight"]
    torch.testing.assert_close(_delta64(*out["enc.fc2.weight"]), _delta64(a, b, 8 / math.sqrt(4)), rtol=1e-6, atol=0)


def test_rank_and_alpha_patterns_per_module(tmp_path):
    f = {"enc.fc1.weight": _factors({"x": (6, 5)}, r=2)["x"], "enc.fc2.weight": _factors({"x": (3, 6)}, r=4)["x"]}
    write_peft_adapter(tmp_path, f, r=4, lora_alpha=8, target_modules=["fc1", "fc2"],
                       rank_pattern={"fc1": 2}, alpha_pattern={"enc.fc1": 3})
    out = read_peft_adapter(tmp_path)
    torch.testing.assert_close(_delta64(*out["enc.fc1.weight"]), _delta64(*f["enc.fc1.weight"], 3 / 2),
                               rtol=1e-6, atol=0)
    torch.testing.assert_close(_delta64(*out["enc.fc2.weight"]), _delta64(*f["enc.fc2.weight"], 8 / 4),
                               rtol=1e-6, atol=0)
    cfg = {"r": 8, "lora_alpha": 16, "rank_pattern": {"fc": 4, "c_fc": 2}}
    # PEFT's rule: the first pattern p with re.match(rf"(.*\.)?({p})$", path): whole trailing segments only.
    assert lora_scaling(cfg, "a.fc") == (4, 4.0)
    assert lora_scaling(cfg, "a.c_fc") == (2, 8.0)   # "fc" does not match the segment "c_fc"
    assert lora_scaling(cfg, "a.b_fc") == (8, 2.0)   # no pattern matches
    assert lora_scaling(dict(cfg, use_rslora=True), "a.b_fc") == (8, 16 / math.sqrt(8))


def test_adapter_named_keys_and_base_model_prefix_stripped(tmp_path):
    a, b = torch.randn(2, 5), torch.randn(6, 2)
    _write_raw(tmp_path, {"base_model.model.enc.fc.lora_A.default.weight": a,
                          "base_model.model.enc.fc.lora_B.default.weight": b})
    out = read_peft_adapter(tmp_path)
    assert list(out) == ["enc.fc.weight"]
    torch.testing.assert_close(_delta64(*out["enc.fc.weight"]), _delta64(a, b, 2.0), rtol=1e-6, atol=0)


def test_module_prefix_keeps_and_strips(tmp_path):
    f = _factors({"visual.t.0.fc.weight": (6, 5), "text.t.0.fc.weight": (6, 5)}, r=2)
    write_peft_adapter(tmp_path, f, r=2, lora_alpha=2, target_modules=["fc"])
    assert list(read_peft_adapter(tmp_path, module_prefix="visual.")) == ["t.0.fc.weight"]
    with pytest.raises(ValueError, match=r"module_prefix 'vision\.' matches none.*text\.t\.0\.fc"):
        read_peft_adapter(tmp_path, module_prefix="vision.")


def test_multihead_attention_layout_maps_to_in_proj_and_out_proj(tmp_path):
    f = _factors({"blk.attn.in_proj_weight": (24, 8), "blk.attn.out_proj.weight": (8, 8)}, r=2)
    write_peft_adapter(tmp_path, f, r=2, lora_alpha=2, target_modules=["attn"])
    from safetensors import safe_open

    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as fh:
        keys = set(fh.keys())
    assert "base_model.model.blk.attn.lora_A.weight" in keys           # PEFT's MHA layout
    assert "base_model.model.blk.attn.base_layer.out_proj.lora_B.weight" in keys
    out = read_peft_adapter(tmp_path)
    assert sorted(out) == ["blk.attn.in_proj_weight", "blk.attn.out_proj.weight"]


def test_fan_in_fan_out_transposes(tmp_path):
    f = _factors({"h.0.c_attn.weight": (6, 5)}, r=2)      # PEFT's A [r, 5], B [6, r]; weight stored [5, 6]
    write_peft_adapter(tmp_path, f, r=2, lora_alpha=2, target_modules=["c_attn"])
    _rewrite_config(tmp_path, fan_in_fan_out=True)
    a, b = read_peft_adapter(tmp_path)["h.0.c_attn.weight"]
    assert (b.shape[0], a.shape[1]) == (5, 6)
    torch.testing.assert_close(_delta64(a, b), _delta64(*f["h.0.c_attn.weight"]).t(), rtol=1e-6, atol=0)


def test_bin_state_dict_read_with_weights_only(tmp_path):
    a, b = torch.randn(2, 5), torch.randn(6, 2)
    torch.save({"base_model.model.fc.lora_A.weight": a, "base_model.model.fc.lora_B.weight": b},
               tmp_path / "adapter_model.bin")
    with open(tmp_path / "adapter_config.json", "w") as fh:
        json.dump({"peft_type": "LORA", "r": 2, "lora_alpha": 2}, fh)
    out = read_peft_adapter(tmp_path)
    torch.testing.assert_close(_delta64(*out["fc.weight"]), _delta64(a, b), rtol=1e-6, atol=0)


def test_from_peft_builds_lora_task_vectors(tmp_path):
    import atlas_kernels as ak

    dirs = []
    for i in range(2):
        d = tmp_path / f"task{i}"
        write_peft_adapter(d, _factors(SHAPES, r=2, seed=i), r=2, lora_alpha=4, target_modules=["fc1", "fc2"])
        dirs.append(d)
    tvs = ak.TaskVectors.from_peft(dirs)
    assert tvs.names == ["task0", "task1"] and len(tvs) == 2
    a, b = read_peft_adapter(dirs[1])["enc.fc2.weight"]
    torch.testing.assert_close(tvs.dense("enc.fc2.weight", 1), b @ a)


# ------------------------------------------------------------------------------------------ refusals
def test_missing_path_and_missing_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_peft_adapter(tmp_path / "nope")
    with pytest.raises(ValueError, match="holds neither adapter_model.safetensors nor adapter_model.bin"):
        read_peft_adapter(tmp_path)


def test_missing_config_refused(tmp_path):
    write_peft_adapter(tmp_path, _factors(SHAPES, r=2), r=2, lora_alpha=2, target_modules=["fc1"])
    os.remove(tmp_path / "adapter_config.json")
    with pytest.raises(ValueError, match=r"adapter_config\.json' not found.*lora_alpha / r"):
        read_peft_adapter(tmp_path)


@pytest.mark.parametrize("changes,match", [
    ({"peft_type": "IA3"}, r"key 'peft_type' is 'IA3'; only LoRA"),
    ({"use_dora": True}, r"key 'use_dora' is true"),
    ({"r": 0}, r"key 'r' must be a positive number"),
    ({"lora_alpha": "x"}, r"key 'lora_alpha' must be a positive number"),
    ({"rank_pattern": {"fc(": 2}}, r"rank_pattern pattern 'fc\(' is not a regular expression"),
])
def test_bad_config_refused(tmp_path, changes, match):
    write_peft_adapter(tmp_path, _factors(SHAPES, r=2), r=2, lora_alpha=2, target_modules=["fc1"])
    _rewrite_config(tmp_path, **changes)
    with pytest.raises(ValueError, match=match) as exc:
        read_peft_adapter(tmp_path)
    assert "adapter_config.json" in str(exc.value)


def test_config_not_json_refused(tmp_path):
    write_peft_adapter(tmp_path, _factors(SHAPES, r=2), r=2, lora_alpha=2, target_modules=["fc1"])
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="adapter_config.json' is not readable JSON"):
        read_peft_adapter(tmp_path)


@pytest.mark.parametrize("missing", ["A", "B"])
def test_unpaired_factor_refused(tmp_path, missing):
    present = "B" if missing == "A" else "A"
    t = torch.randn(2, 5) if present == "A" else torch.randn(6, 2)
    _write_raw(tmp_path, {f"base_model.model.enc.fc.lora_{present}.weight": t})
    with pytest.raises(ValueError, match=rf"adapter_model.safetensors'.*key 'base_model.model.enc.fc.lora_{present}"
                                         rf"\.weight' has no matching lora_{missing}"):
        read_peft_adapter(tmp_path)


def test_rank_mismatch_between_a_and_b_refused(tmp_path):
    _write_raw(tmp_path, {"base_model.model.fc.lora_A.weight": torch.randn(2, 5),
                          "base_model.model.fc.lora_B.weight": torch.randn(6, 3)})
    with pytest.raises(ValueError, match=r"ranks disagree: 'base_model.model.fc.lora_A.weight' has shape \(2, 5\) "
                                         r"\(rank 2\), 'base_model.model.fc.lora_B.weight' has shape \(6, 3\)"):
        read_peft_adapter(tmp_path)


def test_rank_disagreeing_with_config_refused(tmp_path):
    _write_raw(tmp_path, {"base_model.model.fc.lora_A.weight": torch.randn(3, 5),
                          "base_model.model.fc.lora_B.weight": torch.randn(6, 3)}, r=2)
    with pytest.raises(ValueError, match=r"'base_model.model.fc.lora_A.weight' has rank 3, but adapter_config.json "
                                         r"gives module 'fc' r=2"):
        read_peft_adapter(tmp_path)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_refused(tmp_path, bad):
    b = torch.randn(6, 2)
    b[4, 1] = bad
    _write_raw(tmp_path, {"base_model.model.fc.lora_A.weight": torch.randn(2, 5),
                          "base_model.model.fc.lora_B.weight": b})
    with pytest.raises(ValueError, match=r"key 'base_model.model.fc.lora_B.weight' holds 1 NaN/inf value\(s\), "
                                         r"first at index \(4, 1\)"):
        read_peft_adapter(tmp_path)


@pytest.mark.parametrize("key,match", [
    ("base_model.model.fc.bias", "not a LoRA factor"),
    ("base_model.model.head.modules_to_save.default.weight", "modules_to_save"),
    ("base_model.model.emb.lora_embedding_A.weight", "embedding"),
    ("base_model.model.fc.lora_magnitude_vector.weight", "DoRA"),
])
def test_non_lora_keys_refused(tmp_path, key, match):
    _write_raw(tmp_path, {"base_model.model.fc.lora_A.weight": torch.randn(2, 5),
                          "base_model.model.fc.lora_B.weight": torch.randn(6, 2), key: torch.randn(6)})
    with pytest.raises(ValueError, match=match) as exc:
        read_peft_adapter(tmp_path)
    assert key in str(exc.value) and "adapter_model.safetensors" in str(exc.value)


def test_conv_lora_refused(tmp_path):
    _write_raw(tmp_path, {"base_model.model.conv.lora_A.weight": torch.randn(2, 3, 3, 3),
                          "base_model.model.conv.lora_B.weight": torch.randn(8, 2, 1, 1)})
    with pytest.raises(ValueError, match=r"key 'base_model.model.conv.lora_A.weight' has shape \(2, 3, 3, 3\); only "
                                         r"LoRA on linear layers"):
        read_peft_adapter(tmp_path)


def test_not_safetensors_refused(tmp_path):
    write_peft_adapter(tmp_path, _factors(SHAPES, r=2), r=2, lora_alpha=2, target_modules=["fc1"])
    (tmp_path / "adapter_model.safetensors").write_bytes(b"\x00" * 7 + b"garbage, not a safetensors header")
    with pytest.raises(ValueError, match=r"adapter_model.safetensors' could not be read as a safetensors file"):
        read_peft_adapter(tmp_path)


def test_pickled_object_refused(tmp_path):
    torch.save(nn.Linear(2, 2), tmp_path / "adapter_model.bin")  # a whole module: unpickling would run code
    with open(tmp_path / "adapter_config.json", "w") as fh:
        json.dump({"peft_type": "LORA", "r": 2, "lora_alpha": 2}, fh)
    # Read without running code (the restricted reader recovers the module's tensors), then refused:
    # a Linear's weight/bias are not LoRA factors.
    with pytest.raises(ValueError, match=r"adapter_model.bin'.*key 'weight': it is not a LoRA factor"):
        read_peft_adapter(tmp_path)


def test_writer_checks_rank(tmp_path):
    with pytest.raises(ValueError, match=r"factors\['enc.fc1.weight'\] has rank 2, the config gives r=4"):
        write_peft_adapter(tmp_path, _factors(SHAPES, r=2), r=4, lora_alpha=2, target_modules=["fc1"])


# ------------------------------------------------------------------------------------------ match_blocks
class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Module()
        self.enc.fc1 = nn.Linear(5, 6)
        self.enc.fc2 = nn.Linear(6, 3)


def test_match_blocks_tiny_module_in_parameter_order():
    f = _factors(SHAPES, r=2)
    out = match_blocks({"enc.fc2.weight": f["enc.fc2.weight"], "enc.fc1.weight": f["enc.fc1.weight"]}, _Tiny())
    assert list(out) == ["enc.fc1.weight", "enc.fc2.weight"]


def test_match_blocks_shape_mismatch_names_block_and_shapes():
    f = {"enc.fc1.weight": (torch.randn(2, 4), torch.randn(6, 2))}
    with pytest.raises(ValueError, match=r"block 'enc.fc1.weight': the module's parameter 'enc.fc1.weight' has shape "
                                         r"\(6, 5\), the LoRA factors give a \(6, 4\) update"):
        match_blocks(f, _Tiny())


def test_match_blocks_unknown_name_hints_prefix():
    f = _factors({"visual.enc.fc1.weight": (6, 5)}, r=2)
    with pytest.raises(ValueError, match=r"block 'visual.enc.fc1.weight': the module has no parameter of that name; "
                                         r"without the prefix 'visual.' it would match: read the adapter with "
                                         r"module_prefix='visual.'"):
        match_blocks(f, _Tiny())
    with pytest.raises(ValueError, match=r"no parameter of that name \(its parameters look like"):
        match_blocks(_factors({"dec.fc.weight": (6, 5)}, r=2), _Tiny())


@pytest.fixture(scope="module")
def clip_b32():
    import open_clip

    logging.getLogger().setLevel(logging.ERROR)
    torch.manual_seed(0)
    return open_clip.create_model("ViT-B-32", pretrained=None)


def _clip_adapter(d):
    shapes = {
        "visual.transformer.resblocks.0.attn.in_proj_weight": (3 * 768, 768),
        "visual.transformer.resblocks.0.attn.out_proj.weight": (768, 768),
        "visual.transformer.resblocks.0.mlp.c_fc.weight": (3072, 768),
        "visual.transformer.resblocks.11.mlp.c_proj.weight": (768, 3072),
        "transformer.resblocks.0.mlp.c_fc.weight": (2048, 512),  # the text tower
    }
    f = _factors(shapes, r=4)
    write_peft_adapter(d, f, r=4, lora_alpha=8, target_modules=["attn", "c_fc", "c_proj"])
    return f


def test_match_blocks_open_clip_visual(tmp_path, clip_b32):
    _clip_adapter(tmp_path)
    f = read_peft_adapter(tmp_path, module_prefix="visual.")
    out = match_blocks(f, clip_b32.visual)
    assert list(out) == ["transformer.resblocks.0.attn.in_proj_weight", "transformer.resblocks.0.attn.out_proj.weight",
                         "transformer.resblocks.0.mlp.c_fc.weight", "transformer.resblocks.11.mlp.c_proj.weight"]
    # The whole CLIP also matches when read without a prefix (text tower included).
    assert len(match_blocks(read_peft_adapter(tmp_path), clip_b32)) == 5


def test_match_blocks_open_clip_hints(tmp_path, clip_b32):
    _clip_adapter(tmp_path)
    # Read without the prefix, the text tower's 'transformer.resblocks.0.mlp.c_fc' lands on the image tower's.
    with pytest.raises(ValueError, match=r"block 'transformer.resblocks.0.mlp.c_fc.weight': the module's parameter .* "
                                         r"has shape \(3072, 768\), the LoRA factors give a \(2048, 512\) update.*"
                                         r"Other blocks carry the prefix 'visual.'.*module_prefix='visual.'"):
        match_blocks(read_peft_adapter(tmp_path), clip_b32.visual)
    no_text = {k: v for k, v in read_peft_adapter(tmp_path).items() if k.startswith("visual.")}
    with pytest.raises(ValueError, match=r"block 'visual.transformer.resblocks.0.attn.(out|in)_proj.weight'.*"
                                         r"module_prefix='visual.'"):
        match_blocks(no_text, clip_b32.visual)
    visual_only = read_peft_adapter(tmp_path, module_prefix="visual.")
    visual_only.pop("transformer.resblocks.0.attn.in_proj_weight")
    visual_only.pop("transformer.resblocks.0.attn.out_proj.weight")
    visual_only.pop("transformer.resblocks.0.mlp.c_fc.weight")
    # The whole CLIP where its image tower was meant: the text tower has the same names, other shapes.
    with pytest.raises(ValueError, match=r"parameter 'transformer.resblocks.11.mlp.c_proj.weight' has shape "
                                         r"\(512, 2048\).*The module holds 'visual.transformer.resblocks.11.mlp.c_proj"
                                         r".weight' of that shape: pass the submodule instead \(module.visual\)"):
        match_blocks(visual_only, clip_b32)
    with pytest.raises(ValueError, match=r"the module holds it as 'visual.ln_post.weight': "
                                         r"pass the submodule instead \(module.visual"):
        match_blocks({"ln_post.weight": (torch.randn(1, 768), torch.randn(768, 1))}, clip_b32)


def test_match_blocks_maps_mha_weight_to_in_proj(clip_b32):
    a, b = torch.randn(4, 768), torch.randn(3 * 768, 4)
    out = match_blocks({"transformer.resblocks.3.attn.weight": (a, b)}, clip_b32.visual)
    assert list(out) == ["transformer.resblocks.3.attn.in_proj_weight"]
