"""Round 3 of the adversarial review (issue 24): the cases it found bad, each with a test that failed
before its fix. Tampered task-vector files (a negative scale, a block listed twice), duplicate
task-vector names, and coefficients loaded onto another model."""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import atlas_kernels as ak


def _int8_tvs():
    g = torch.Generator().manual_seed(0)
    return ak.TaskVectors({"w": torch.randn(2, 4, 3, generator=g), "b": torch.randn(2, 4, generator=g)},
                          names=["a", "b"]).to_storage("int8")


def _rewrite(path, out, tensors=None, meta=None, drop_crc=True):
    """Copy a task-vector file with some tensors and metadata entries replaced (and, as a tamperer
    would, without the checksums that would give it away)."""
    with safe_open(str(path), framework="pt") as f:
        t = {k: f.get_tensor(k) for k in f.keys()}
        m = dict(f.metadata())
    t.update(tensors or {})
    m.update(meta or {})
    if drop_crc:
        m.pop("metadata_crc32", None)
        m["crc32"] = "{}"
    save_file(t, str(out), metadata=m)


def test_a_negative_int8_scale_is_refused_not_a_flipped_task_vector(tmp_path):
    tvs = _int8_tvs()
    p = tmp_path / "tv.safetensors"
    tvs.save(p)
    bad = tvs.scale("w").clone()
    bad[1, 2] = -bad[1, 2]
    _rewrite(p, tmp_path / "neg.safetensors", {"scale/w": bad})
    with pytest.raises(ValueError, match=r"block 'w': int8 scales must be positive.*task vector 1, row 2"):
        ak.TaskVectors.load(tmp_path / "neg.safetensors", verify=False)
    with pytest.raises(ValueError, match="must be positive"):  # and from memory, not only from files
        ak.TaskVectors({"w": tvs["w"]}, scales={"w": bad})
    zero = tvs.scale("w").clone()
    zero[0, 0] = 0.0
    with pytest.raises(ValueError, match="must be positive"):
        ak.TaskVectors({"w": tvs["w"]}, scales={"w": zero})


def test_a_block_listed_twice_in_the_metadata_is_refused(tmp_path):
    tvs = _int8_tvs()
    p = tmp_path / "tv.safetensors"
    tvs.save(p)
    _rewrite(p, tmp_path / "twice.safetensors", meta={"blocks": json.dumps(["w", "b", "w"])})
    with pytest.raises(ValueError, match=r"lists block\(s\) \['w'\] more than once"):
        ak.TaskVectors.load(tmp_path / "twice.safetensors", verify=False)


def test_duplicate_task_vector_names_are_refused():
    with pytest.raises(ValueError, match=r"names must be distinct.*\['cars'\]"):
        ak.TaskVectors({"w": torch.randn(2, 3)}, names=["cars", "cars"])


def _tower(patch_size, seed=0):
    import warnings

    import open_clip

    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vision = {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": patch_size}
        return open_clip.model._build_vision_tower(16, vision).eval()


def _tvs_for(model, seed, names=("cars", "dtd")):
    g = torch.Generator().manual_seed(seed)
    return ak.TaskVectors({k: torch.randn((len(names), *p.shape), generator=g) * 0.01
                           for k, p in model.named_parameters()}, names=list(names))


def test_coefficients_onto_another_architecture_are_refused(tmp_path):
    """Coefficients saved from a ViT-B/32-like tower loaded into a ViT-B/16-like one patched with task
    vectors of the same names: the file records the blocks' shapes, and the load says what differs."""
    b32, b16 = _tower(8), _tower(4)
    ak.patch(b32, _tvs_for(b32, 1))
    with torch.no_grad():
        for c in ak.coefficients(b32).values():
            c.fill_(0.3)
    path = tmp_path / "c.safetensors"
    ak.save_coefficients(b32, path)
    ak.patch(b16, _tvs_for(b16, 1))
    with pytest.raises(ValueError, match=r"trained on another architecture.*'(conv1.weight|positional_embedding)' "
                                         r"has shape"):
        ak.load_coefficients(b16, path)
    with pytest.raises(ValueError, match="another architecture"):
        ak.load_coefficients(b16, path, strict=False)  # never, whatever strict says
    assert all(bool((c == 0).all()) for c in ak.coefficients(b16).values())  # nothing was loaded


def test_coefficients_onto_other_task_vectors_or_another_base_are_refused(tmp_path):
    m = _tower(8)
    ak.patch(m, _tvs_for(m, 1))
    path = tmp_path / "c.safetensors"
    ak.save_coefficients(m, path)
    same = _tower(8)
    ak.patch(same, _tvs_for(same, 1).to_storage("int8"))  # the same task vectors in another storage: fine
    ak.load_coefficients(same, path)
    other = _tower(8)
    ak.patch(other, _tvs_for(other, 2))  # same names and shapes, other task vectors
    with pytest.raises(ValueError, match=r"task vectors differ from those they were trained with.*\|tau\|"):
        ak.load_coefficients(other, path)
    with pytest.warns(UserWarning, match="task vectors differ"):
        ak.load_coefficients(other, path, strict=False)
    base = _tower(8, seed=5)  # another pre-trained model of the same architecture
    ak.patch(base, _tvs_for(base, 1))
    with pytest.raises(ValueError, match=r"pre-trained weights differ.*\|theta0\|"):
        ak.load_coefficients(base, path)


def test_more_partitions_than_a_block_has_elements_is_refused():
    m = torch.nn.Sequential(torch.nn.Linear(3, 2))
    tvs = ak.TaskVectors({"0.weight": torch.randn(1, 2, 3), "0.bias": torch.randn(1, 2)})
    with pytest.raises(ValueError, match=r"partitions=100 but block '0.bias' has only 2 element.*partitions <= 2"):
        ak.patch(m, tvs, partitions=100)
    ak.patch(m, tvs, partitions=2)  # every part owns an element


def test_an_fp16_composed_weight_that_overflows_is_named():
    m = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    tvs = ak.TaskVectors({"0.weight": torch.randn(2, 3, 4), "1.weight": torch.randn(2, 3)})
    ak.patch(m, tvs, backend="torch")
    m.half()
    assert ak.overflowing_blocks(m) == {}
    with torch.no_grad():
        ak.coefficients(m)["0.weight"].fill_(1e5)  # 1e5 * tau: past fp16's 65504
    bad = ak.overflowing_blocks(m)
    assert list(bad) == ["0.weight"] and bad["0.weight"] > 65504
    assert list(ak.overflowing_blocks(m, torch.float32)) == []  # fits float32
