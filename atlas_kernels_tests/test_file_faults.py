"""Files a careless or hostile user hands in: PEFT config values and patterns, task-vector
metadata, float16 storage overflow, and paths that are directories, symlink loops or empty."""
import json
import os
import time

import pytest
import torch

import atlas_kernels as ak
from atlas_kernels._peft_config import pattern_value
from atlas_kernels.peft import read_peft_adapter, write_peft_adapter


def _adapter(d, b_scale=1.0, **config):
    g = torch.Generator().manual_seed(0)
    f = {"fc1.weight": (torch.randn(2, 5, generator=g), torch.randn(6, 2, generator=g) * b_scale)}
    write_peft_adapter(d, f, r=2, lora_alpha=4, target_modules=["fc1"])
    path = os.path.join(d, "adapter_config.json")
    cfg = json.loads(open(path).read())
    cfg.update(config)
    open(path, "w").write(json.dumps(cfg))
    return d


@pytest.mark.parametrize("changes,match", [
    ({"r": 4.5}, r"key 'r' must be a positive number \(an integer\), got 4.5"),
    ({"lora_alpha": 1e300}, r"key 'lora_alpha' must be a positive number .*1e\+300"),
    ({"use_rslora": "false"}, r"key 'use_rslora' must be true or false.*'false'.*without quotes"),
    ({"use_dora": "false"}, r"key 'use_dora' must be true or false"),
    ({"fan_in_fan_out": "true"}, r"key 'fan_in_fan_out' must be true or false"),
    ({"rank_pattern": {"fc1": 2.5}}, r"rank_pattern\['fc1'\] must be a positive number \(an integer\)"),
    ({"alpha_pattern": {"fc1": float("inf")}}, r"alpha_pattern\['fc1'\] must be a positive number"),
    ({"rank_pattern": {"(a+)+$": 2}}, r"repeats a group that holds a repeat"),
    ({"rank_pattern": {"(a|aa)*b": 2}}, r"repeats a group"),
    ({"rank_pattern": {".*a.*b.*c.*d": 2}}, r"4 unbounded repeats"),
    ({"rank_pattern": {"x" * 300: 2}}, r"longer than 256"),
])
def test_peft_config_values_are_checked_with_the_key_named(tmp_path, changes, match):
    d = _adapter(tmp_path / "ad", **changes)
    t = time.perf_counter()
    with pytest.raises(ValueError, match=match):
        read_peft_adapter(d)
    assert time.perf_counter() - t < 5  # a hostile pattern never hangs the reader


def test_peft_alpha_overflowing_float32_is_blamed_on_the_scaling(tmp_path):
    d = _adapter(tmp_path / "ad", b_scale=1e4, lora_alpha=1e38, r=2)  # finite alpha, B * alpha / r overflows
    with pytest.raises(ValueError, match=r"scaling lora_alpha / r .*overflow float32.*'lora_alpha'"):
        read_peft_adapter(d)


def test_peft_writer_refuses_a_fractional_rank(tmp_path):
    f = {"fc1.weight": (torch.randn(2, 5), torch.randn(6, 2))}
    with pytest.raises(TypeError, match="r must be an integer, got 2.0"):
        write_peft_adapter(tmp_path / "w", f, r=2.0, lora_alpha=4, target_modules=["fc1"])


def test_pattern_matching_is_peft_s_and_fast():
    import re

    paths = ["visual.transformer.resblocks.0.mlp.c_fc", "visual.transformer.resblocks.11.attn", "fc1", "a.fc10"]
    pats = ["fc1", "mlp.c_fc", r"resblocks\.\d+\.attn", "c_fc|attn", "^visual.*fc$", "resblocks.1"]
    for p in paths:
        for pat in pats:
            want = re.match(rf"(.*\.)?({pat})$", p) is not None
            assert (pattern_value({pat: 1}, p, 0) == 1) == want, (pat, p)
    t = time.perf_counter()
    assert pattern_value({r"a*a*b": 1}, "a" * 1000, 0) == 0
    assert time.perf_counter() - t < 2


def test_task_vector_metadata_is_checksummed_and_every_tensor_listed(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    tv = ak.TaskVectors({"a.weight": torch.randn(2, 3, 4), "b.weight": torch.randn(2, 5)}, names=["x", "y"])
    f = tmp_path / "tv.safetensors"
    tv.save(str(f))
    with safe_open(str(f), framework="pt") as h:
        meta = dict(h.metadata())
        tensors = {k: h.get_tensor(k) for k in h.keys()}

    def rewrite(name, **changes):
        m = dict(meta, **changes)
        p = tmp_path / name
        save_file(tensors, str(p), metadata=m)
        return str(p)

    # names swapped in the metadata only: the tensors' CRCs still pass, the metadata's does not
    with pytest.raises(ValueError, match="metadata fails its CRC32 check"):
        ak.TaskVectors.load(rewrite("swap.safetensors", names=json.dumps(["y", "x"])))
    # a block dropped from the 'blocks' list (and the CRC recomputed, as an editor would not)
    from atlas_kernels.task_vectors import _META_CRC, _meta_crc

    m = dict(meta, blocks=json.dumps(["a.weight"]))
    m[_META_CRC] = str(_meta_crc(m))
    p = tmp_path / "drop.safetensors"
    save_file(tensors, str(p), metadata=m)
    with pytest.raises(ValueError, match=r"tensor\(s\) for blocks its metadata 'blocks' does not list.*tau/b.weight"):
        ak.TaskVectors.load(str(p))
    # bad metadata names the file and the key
    m = dict(meta, shapes="{not json")
    m.pop(_META_CRC)
    p = tmp_path / "bad.safetensors"
    save_file(tensors, str(p), metadata=m)
    with pytest.raises(ValueError, match=r"bad.safetensors.*metadata key 'shapes' is not valid JSON"):
        ak.TaskVectors.load(str(p))
    m = dict(meta, n="two")
    m.pop(_META_CRC)
    save_file(tensors, str(p), metadata=m)
    with pytest.raises(ValueError, match=r"bad.safetensors.*metadata key 'n' must be an integer, got 'two'"):
        ak.TaskVectors.load(str(p))
    assert ak.TaskVectors.load(str(f)).names == ["x", "y"]


def test_float16_storage_overflow_names_the_storage_and_the_largest_value():
    pre = {"w": torch.zeros(3, 4)}
    ft = {"w": torch.zeros(3, 4)}
    ft["w"][1, 2] = 7e4
    with pytest.raises(ValueError, match=r"block 'w' .*overflows float16 storage.*70000.*65504.*bfloat16"):
        ak.TaskVectors.from_state_dicts(pre, [ft], storage="float16")
    tv = ak.TaskVectors.from_state_dicts(pre, [ft], storage="float32")
    with pytest.raises(ValueError, match=r"block 'w' of task vector .*overflows float16"):
        tv.to_storage("float16")


def test_paths_that_are_not_files_get_clear_messages(tmp_path):
    d = tmp_path / "dir.safetensors"
    d.mkdir()
    loop = tmp_path / "loop.safetensors"
    os.symlink(loop, loop)
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    empty_pt = tmp_path / "empty.pt"
    empty_pt.write_bytes(b"")
    for fn in (ak.load_state_dict_file, ak.TaskVectors.load):
        with pytest.raises(ValueError, match="is a directory"):
            fn(str(d))
        with pytest.raises(ValueError, match="symbolic link loop"):
            fn(str(loop))
        with pytest.raises(ValueError, match=r"empty \(0 bytes\)"):
            fn(str(empty))
    # convert: an empty or a broken safetensors file is not "a pickled object"
    for src in (empty, empty_pt):
        with pytest.raises(ValueError, match=r"empty \(0 bytes\)") as e:
            ak.convert_checkpoint(str(src), str(tmp_path / "out.safetensors"))
        assert "pickled" not in str(e.value)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")
    with pytest.raises(ValueError, match="not a readable safetensors file") as e:
        ak.convert_checkpoint(str(broken), str(tmp_path / "out.safetensors"))
    assert "pickled" not in str(e.value)
