"""atlas_kernels._checks: the shared finite check and prefix hints that task vectors, checkpoints,
PEFT adapters and the linearised export all raise through."""
import pytest
import torch

from atlas_kernels._checks import all_finite, deeper_name, prefix_matches_nothing, require_finite, stripped_prefix


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_require_finite_names_count_and_first_index(dtype):
    t = torch.randn(3, 4, 5).to(dtype)
    require_finite(t, "x")  # finite: no error
    t[1, 2, 3] = float("inf")
    t[2, 0, 1] = float("nan")
    with pytest.raises(ValueError, match=r"^block 'w' holds 2 NaN/inf value\(s\), first at index \(1, 2, 3\); stop$"):
        require_finite(t, "block 'w'", then="; stop")
    assert not all_finite(t)


def test_all_finite_takes_float8_meta_and_empty_tensors():
    f8 = torch.tensor([1.0, -2.0, 448.0]).to(torch.float8_e4m3fn)
    assert all_finite(f8)
    bad = torch.tensor([1.0, float("nan")]).to(torch.float8_e4m3fn)
    assert not all_finite(bad)
    with pytest.raises(ValueError, match=r"first at index \(1,\)"):
        require_finite(bad, "slab")
    assert all_finite(torch.empty(4, 4, device="meta"))  # holds no values: nothing to refuse
    require_finite(torch.empty(4, 4, device="meta"), "meta slab")
    assert all_finite(torch.empty(0))


def test_prefix_hints():
    names = {"transformer.resblocks.0.mlp.c_fc.weight", "ln_post.weight"}
    assert stripped_prefix("visual.transformer.resblocks.0.mlp.c_fc.weight", names) == "visual."
    assert stripped_prefix("model.visual.ln_post.weight", names) == "model.visual."
    assert stripped_prefix("ln_post.bias", names) is None
    deeper = ["token_embedding.weight", "visual.ln_post.weight", "x.visual.ln_post.weight"]
    assert deeper_name("ln_post.weight", deeper) == "visual.ln_post.weight"
    assert deeper_name("ln_post.weight", deeper, fits=lambda n: n.startswith("x.")) == "x.visual.ln_post.weight"
    assert deeper_name("proj", deeper) is None
    msg = prefix_matches_nothing("module_prefix", "vision.", "none of its modules", ["a", "b", "c", "d"], their="they")
    assert msg == "module_prefix 'vision.' matches none of its modules (they look like ['a', 'b', 'c'])"
