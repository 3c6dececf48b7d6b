"""Rough edges a new user meets: each refused or explained at the point of the mistake."""
import os
import warnings

import pytest
import torch
import torch.nn as nn

import atlas_kernels as ak


def _model():
    return nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 3))


def _tvs(model, prefix="", n=2):
    return ak.TaskVectors({prefix + k: 0.01 * torch.randn(n, *p.shape) for k, p in model.named_parameters()})


def test_triton_backend_on_cpu_tensors_is_refused_at_patch_time(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    m = _model()
    with pytest.raises(ValueError, match=r"backend='triton' needs the module on a CUDA device.*'0.weight' is on cpu"
                                         r".*backend='torch'.*TRITON_INTERPRET=1"):
        ak.patch(m, _tvs(m), backend="triton")
    assert not ak.is_patched(m)


class _Clip(nn.Module):
    def __init__(self):
        super().__init__()
        self.visual = _model()
        self.transformer = nn.Linear(3, 3)  # a text-tower key that sorts before "visual."


def test_whole_model_task_vectors_on_the_tower_say_prefix_visual():
    clip = _Clip()
    with pytest.raises(ValueError, match=r"whole-model task vectors.*prefix='visual\.'"):
        ak.patch(clip.visual, _tvs(clip))


def test_undotted_prefix_is_named():
    m = _model()
    tvs = _tvs(m, prefix=".")  # what prefix="visual" (no dot) leaves after stripping
    with pytest.raises(ValueError, match=r"lacked its trailing dot.*prefix='visual\.'"):
        ak.patch(m, tvs)


def test_coefficients_of_a_parent_name_the_patched_submodule():
    clip = _Clip()
    ak.patch(clip.visual, _tvs(clip.visual))
    with pytest.raises(RuntimeError, match=r"submodules were: module\.visual.*coefficients\(model\.visual\)"):
        ak.coefficients(clip)


def test_auto_on_cpu_is_decided_at_patch_and_recorded():
    """backend="auto" on CPU resolves, once, to the built extension or else torch (a fresh install),
    records it, and groups the blocks that do not run their own op."""
    from atlas_kernels import ops
    from atlas_kernels.plan import plan_of

    m = _model()
    ak.patch(m, _tvs(m), backend="auto")
    want = "ext" if ops.unavailable("ext", torch.device("cpu")) is None else "torch"
    assert ak.PatchConfig.of(m).resolved_backend == want
    assert plan_of(m).groups and {g.backend.name for g in plan_of(m).groups} == {want}


def test_save_coefficients_warns_on_a_pt_name(tmp_path):
    m = _model()
    ak.patch(m, _tvs(m))
    with pytest.warns(UserWarning, match=r"writes a safetensors file.*does not end in \.safetensors"):
        ak.save_coefficients(m, tmp_path / "c.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ak.save_coefficients(m, tmp_path / "c.safetensors")
    ak.load_coefficients(m, tmp_path / "c.pt")  # still a valid coefficient file


def test_task_vectors_to_a_dtype_points_to_to_storage():
    m = _model()
    tvs = _tvs(m)
    for bad in (torch.bfloat16, "int8"):
        with pytest.raises(TypeError, match=r"to_storage\('(bfloat16|int8)'\)"):
            tvs.to(bad)
    assert tvs.to("cpu").storage == "float32"


def test_composed_weight_reads_from_outside_the_module():
    m = _model()
    tvs = _tvs(m)
    ak.patch(m, tvs)
    c = ak.coefficients(m)["0.weight"]
    with torch.no_grad():
        c.copy_(torch.tensor([0.5, -2.0]))
    want = m[0]._theta0("weight") + 0.5 * tvs["0.weight"][0] - 2.0 * tvs["0.weight"][1]
    assert torch.allclose(m[0].weight, want, rtol=0, atol=1e-6)
    m[0].weight.sum().backward()
    assert torch.allclose(c.grad, tvs["0.weight"].sum(dim=(1, 2)), rtol=1e-5)
    assert "0.weight" in m.state_dict() and torch.equal(m.state_dict()["0.weight"], m[0]._theta0("weight"))


def test_gitignore_covers_newcomer_output():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, ".gitignore")) as f:
        lines = f.read().split()
    assert {"/demo/", "/runs/", "bench/results/*"} <= set(lines)
