"""TaskVectors: construction, storage, files, and every bad input with its message."""

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

import atlas_kernels as ak
from atlas_kernels.task_vectors import quantize


def _sds(n=2, prefix=""):
    pre = {prefix + "a.weight": torch.randn(6, 5), prefix + "a.bias": torch.randn(6),
           prefix + "ln.weight": torch.randn(5), prefix + "steps": torch.tensor(3)}
    fts = []
    for _ in range(n):
        ft = {k: (v + 0.1 * torch.randn_like(v) if v.is_floating_point() else v) for k, v in pre.items()}
        fts.append(ft)
    return pre, fts


def test_from_state_dicts_stacks_differences_and_skips_integer_buffers():
    pre, fts = _sds(3)
    tv = ak.TaskVectors.from_state_dicts(pre, fts, names=["x", "y", "z"])
    assert len(tv) == 3 and tv.names == ["x", "y", "z"]
    assert tv.blocks == ["a.weight", "a.bias", "ln.weight"]
    assert tv["a.weight"].shape == (3, 6, 5)
    assert torch.equal(tv["a.bias"][1], fts[1]["a.bias"] - pre["a.bias"])
    assert tv.nbytes == 3 * (30 + 6 + 5) * 4
    assert tv.numel == 41


def test_prefix_selects_and_strips():
    pre, fts = _sds(2, prefix="visual.")
    pre["text.w"] = torch.randn(3)
    for ft in fts:
        ft["text.w"] = torch.randn(3)
    tv = ak.TaskVectors.from_state_dicts(pre, fts, prefix="visual.")
    assert tv.blocks == ["a.weight", "a.bias", "ln.weight"]


@pytest.mark.parametrize("storage,bound", [("float32", 0), ("bfloat16", 2 ** -8), ("float16", 2 ** -11),
                                           ("int8", 0.5 / 127), ("float8_e4m3fn", 2 ** -4)])
def test_storage_dtypes_within_their_error(storage, bound):
    pre, fts = _sds(2)
    tv = ak.TaskVectors.from_state_dicts(pre, fts, storage=storage)
    assert tv.storage == storage
    for b in tv.blocks:
        for i in range(2):
            exact = fts[i][b].float() - pre[b].float()
            got = tv.dense(b, i)
            # per-row relative to the row's max magnitude (compact storage), or elementwise
            rowmax = exact.reshape(exact.shape[0] if exact.dim() > 1 else 1, -1).abs().amax(1, keepdim=True)
            err = (got - exact).reshape(rowmax.shape[0], -1).abs()
            assert (err <= bound * rowmax + 1e-12).all(), (storage, b, err.max())


def test_int8_storage_is_compact():
    t = torch.randn(4, 768, 3072)
    q, s = quantize(t[0], "int8")
    tv = ak.TaskVectors({"w": torch.stack([quantize(x, "int8")[0] for x in t])},
                        scales={"w": torch.stack([quantize(x, "int8")[1] for x in t])})
    assert tv.nbytes <= 0.3 * t.numel() * 4
    assert s.shape == (768,)


def test_save_load_round_trip_is_exact(tmp_path):
    pre, fts = _sds(2)
    for storage in ("float32", "bfloat16", "int8"):
        tv = ak.TaskVectors.from_state_dicts(pre, fts, names=["p", "q"], storage=storage)
        path = tmp_path / f"tv_{storage}.safetensors"
        tv.save(path)
        back = ak.TaskVectors.load(path)
        assert back.names == ["p", "q"] and back.blocks == tv.blocks and back.storage == storage
        for b in tv.blocks:
            assert torch.equal(back[b], tv[b])
            assert (back.scale(b) is None) == (tv.scale(b) is None)
            if tv.scale(b) is not None:
                assert torch.equal(back.scale(b), tv.scale(b))


def test_from_checkpoints_reads_safetensors_and_torch_files(tmp_path):
    pre, fts = _sds(2)
    save_file({k: v for k, v in pre.items()}, str(tmp_path / "pre.safetensors"))
    torch.save(fts[0], tmp_path / "cars.pt")
    torch.save({"state_dict": fts[1]}, tmp_path / "dtd.pt")
    tv = ak.TaskVectors.from_checkpoints(tmp_path / "pre.safetensors", [tmp_path / "cars.pt", tmp_path / "dtd.pt"])
    assert tv.names == ["cars", "dtd"]
    assert torch.allclose(tv["a.weight"][1], fts[1]["a.weight"] - pre["a.weight"])


# ---------------------------------------------------------------------------------------- bad input
def test_finetuned_lacks_a_block():
    pre, fts = _sds(2)
    del fts[1]["a.bias"]
    with pytest.raises(ValueError, match=r"finetuned\[1\] lacks 1 block.*a\.bias"):
        ak.TaskVectors.from_state_dicts(pre, fts)


def test_finetuned_has_an_extra_block():
    pre, fts = _sds(2)
    fts[0]["extra.w"] = torch.randn(2)
    with pytest.raises(ValueError, match=r"finetuned\[0\] has 1 block.*pre-trained state dict lacks.*extra\.w"):
        ak.TaskVectors.from_state_dicts(pre, fts)


def test_misshaped_block():
    pre, fts = _sds(2)
    fts[0]["a.weight"] = torch.randn(5, 6)
    with pytest.raises(ValueError, match=r"block 'a\.weight'.*shape \(5, 6\).*\(6, 5\)"):
        ak.TaskVectors.from_state_dicts(pre, fts)


def test_n_differs_between_blocks():
    with pytest.raises(ValueError, match=r"same number of task vectors.*'a'.*N=2.*'b'.*N=3"):
        ak.TaskVectors({"a": torch.randn(2, 4), "b": torch.randn(3, 4)})


def test_non_float_data():
    with pytest.raises(TypeError, match=r"block 'a'.*int64"):
        ak.TaskVectors({"a": torch.ones(2, 4, dtype=torch.int64)})
    pre, fts = _sds(1)
    fts[0]["a.weight"] = "not a tensor"
    with pytest.raises(TypeError, match=r"not a state dict.*'a\.weight'.*str"):
        ak.TaskVectors.from_state_dicts(pre, fts)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_task_vectors(bad):
    t = torch.randn(2, 4, 3)
    t[1, 2, 0] = bad
    with pytest.raises(ValueError, match=r"block 'w'.*NaN/inf.*\(1, 2, 0\)"):
        ak.TaskVectors({"w": t})
    pre, fts = _sds(1)
    fts[0]["a.bias"][3] = bad
    with pytest.raises(ValueError, match=r"block 'a\.bias'.*NaN/inf"):
        ak.TaskVectors.from_state_dicts(pre, fts)


def test_prefix_that_matches_nothing():
    pre, fts = _sds(2)
    with pytest.raises(ValueError, match=r"prefix 'visual\.' matches no floating tensor"):
        ak.TaskVectors.from_state_dicts(pre, fts, prefix="visual.")


def test_single_mapping_instead_of_a_sequence():
    pre, fts = _sds(1)
    with pytest.raises(TypeError, match="sequence of state dicts"):
        ak.TaskVectors.from_state_dicts(pre, fts[0])


def test_checkpoint_that_is_not_a_state_dict(tmp_path):
    torch.save([torch.randn(3)], tmp_path / "list.pt")
    with pytest.raises(ValueError, match=r"list\.pt.*not a state dict.*list"):
        ak.load_state_dict_file(tmp_path / "list.pt")
    torch.save({"a": torch.randn(3), "epoch": 3}, tmp_path / "mixed.pt")
    with pytest.raises(ValueError, match=r"not a state dict.*'epoch' holds a int"):
        ak.load_state_dict_file(tmp_path / "mixed.pt")


def test_pickled_whole_module_is_read_without_running_code(tmp_path):
    m = nn.Sequential(nn.Linear(3, 2), nn.LayerNorm(2))
    for legacy in (False, True):
        torch.save(m, tmp_path / "module.pt", _use_new_zipfile_serialization=not legacy)
        sd = ak.load_state_dict_file(tmp_path / "module.pt")
        assert list(sd) == list(m.state_dict())
        assert all(torch.equal(sd[k], v) for k, v in m.state_dict().items())
    got = ak.convert_checkpoint(tmp_path / "module.pt", tmp_path / "out.safetensors")
    assert torch.equal(ak.load_state_dict_file(tmp_path / "out.safetensors")["0.weight"], m[0].weight.detach())
    assert set(got) == set(m.state_dict())
    torch.save(nn.ReLU(), tmp_path / "relu.pt")
    with pytest.raises(ValueError,
                       match=r"relu\.pt.*holds none.*module torch\.nn\.modules\.activation\.ReLU holding no tensors"):
        ak.load_state_dict_file(tmp_path / "relu.pt")


def test_truncated_and_corrupted_files(tmp_path):
    pre, fts = _sds(2)
    tv = ak.TaskVectors.from_state_dicts(pre, fts)
    path = tmp_path / "tv.safetensors"
    tv.save(path)
    data = path.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) - 40])
    with pytest.raises(ValueError, match=r"trunc\.safetensors.*not a readable safetensors file"):
        ak.TaskVectors.load(tmp_path / "trunc.safetensors")
    flipped = bytearray(data)
    flipped[-9] ^= 0x40  # a bit in the last tensor's data
    (tmp_path / "flip.safetensors").write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match=r"flip\.safetensors.*CRC32.*corrupted"):
        ak.TaskVectors.load(tmp_path / "flip.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        ak.TaskVectors.load(tmp_path / "junk.safetensors")
    save_file({"w": torch.randn(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not an atlas_kernels task-vector file"):
        ak.TaskVectors.load(tmp_path / "other.safetensors")
    torch.save(fts[0], tmp_path / "ft.pt")
    raw = (tmp_path / "ft.pt").read_bytes()
    (tmp_path / "ft_trunc.pt").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match=r"ft_trunc\.pt.*could not be read"):
        ak.load_state_dict_file(tmp_path / "ft_trunc.pt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ak.load_state_dict_file(tmp_path / "nope.pt")
