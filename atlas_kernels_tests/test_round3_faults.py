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
