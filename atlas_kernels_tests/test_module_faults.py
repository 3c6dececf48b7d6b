"""The module API under careless use: dtype conversion after patch, requires_grad_(True),
strict load_state_dict of a plain state dict, coefficient files for other task vectors, and
coefficient names through torch.compile / DataParallel / DistributedDataParallel wrappers."""
import pytest
import torch
import torch.nn as nn

import atlas_kernels as ak
from atlas_kernels.plan import plan_of
from atlas_kernels_tests._util import make_tiny_vit


def _patched(storage="float32", names=("a", "b"), seed=0):
    torch.manual_seed(seed)
    m = make_tiny_vit("cpu")
    pre = {k: v.detach().clone() for k, v in m.named_parameters()}
    fts = [{k: v + 0.01 * torch.randn_like(v) for k, v in pre.items()} for _ in names]
    tv = ak.TaskVectors.from_state_dicts(pre, fts, names=list(names), storage=storage)
    plain = {k: v.detach().clone() for k, v in m.state_dict().items()}
    ak.patch(m, tv, backend="torch")
    return m, plain


@pytest.mark.parametrize("storage,to", [("int8", torch.float16), ("bfloat16", torch.bfloat16),
                                        ("float8_e4m3fn", torch.float16)])
def test_dtype_conversion_keeps_coefficients_and_scales_fp32(storage, to):
    m, _ = _patched(storage)
    with torch.no_grad():
        for c in ak.coefficients(m).values():
            c.copy_(torch.randn_like(c) * 0.3 + 1e-4)  # not representable in fp16/bf16
    before = {k: v.detach().clone() for k, v in ak.coefficients(m).items()}
    taus = {n: (b.dtype, b.clone()) for n, b in m.named_buffers() if n.endswith(("tau", "scale"))}
    m.half() if to is torch.float16 else m.to(to)
    after = ak.coefficients(m)
    for k, v in after.items():
        assert v.dtype == torch.float32 and torch.equal(v.detach(), before[k]), k
        assert isinstance(v, nn.Parameter)
    for n, b in m.named_buffers():
        if n in taus:
            assert b.dtype == taus[n][0] and torch.equal(b, taus[n][1]), n
    theta = [b for n, b in m.named_buffers() if not n.endswith(("_tau", "_scale", "_index", "_lora_a", "_lora_b"))]
    assert theta and all(b.dtype == to for b in theta)  # theta0 follows the dtype
    y = m(torch.randn(2, 3, 32, 32).to(to))
    assert y.dtype == to and torch.isfinite(y).all()
    # the optimizer steps float32 coefficients
    opt = torch.optim.AdamW(list(after.values()), lr=1e-3)
    y.float().pow(2).sum().backward()
    opt.step()
    assert all(torch.isfinite(v).all() and v.dtype == torch.float32 for v in after.values())


def test_requires_grad_true_does_not_leave_theta0_silently_gradientless():
    m, _ = _patched()
    # theta0 is a buffer of every patched module: requires_grad_(True) makes trainable exactly what
    # parameters() lists (the coefficients), and a theta0 made to require grad by hand is refused.
    m.requires_grad_(True)
    assert {id(p) for p in m.parameters()} == {id(c) for c in ak.coefficients(m).values()}
    m(torch.randn(1, 3, 32, 32)).sum().backward()
    theta0 = m.conv1._buffers["weight"]
    theta0.requires_grad_(True)
    with pytest.raises(RuntimeError, match=r"theta0.*requires grad.*requires_grad_\(False\)"):
        plan_of(m).values = None  # outside a grouped forward: the block composes on its own
        m.conv1.weight
    theta0.requires_grad_(False)
    m.requires_grad_(False)
    with torch.no_grad():  # no gradients wanted: fine
        m.requires_grad_(True)
        m(torch.randn(1, 3, 32, 32))
    m.requires_grad_(False)
    for c in ak.coefficients(m).values():
        c.requires_grad_(True)
    m(torch.randn(1, 3, 32, 32)).sum().backward()
    assert all(c.grad is not None for c in ak.coefficients(m).values())


def test_failed_strict_load_state_dict_overwrites_nothing():
    m, plain = _patched()
    new = {k: v + 1.0 for k, v in plain.items()}
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(RuntimeError, match=r"(?s)Nothing was loaded.*plain \(unpatched\) state dict.*"
                                           r"same keys.*_coef.*unpatch.*load_plain_state_dict"):
        m.load_state_dict(new)
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} was overwritten by a failed load"
    # a shape mismatch is refused before copying, strict or not
    bad = dict(before)
    bad["transformer.resblocks.0.mlp.c_fc.weight"] = torch.zeros(3, 3)
    with pytest.raises(RuntimeError, match="another shape"):
        m.load_state_dict(bad, strict=False)
    assert torch.equal(m.state_dict()["conv1.weight"], before["conv1.weight"])
    # the helper loads a plain state dict into theta0 and keeps the coefficients
    with torch.no_grad():
        for c in ak.coefficients(m).values():
            c.fill_(0.25)
    ak.load_plain_state_dict(m, new)
    assert torch.equal(m.state_dict()["conv1.weight"], new["conv1.weight"])
    assert torch.equal(m.state_dict()["transformer.resblocks.0.mlp.c_fc.weight"],
                       new["transformer.resblocks.0.mlp.c_fc.weight"])
    assert all(bool((c == 0.25).all()) for c in ak.coefficients(m).values())
    with pytest.raises(RuntimeError, match="missing key"):
        ak.load_plain_state_dict(m, {k: v for k, v in new.items() if k != "proj"})
    # the patched module's own state dict round-trips, and unpatch removes the guard
    m.load_state_dict(m.state_dict())
    ak.unpatch(m)
    m.load_state_dict(new)


def test_load_coefficients_compares_task_vector_names_and_order(tmp_path):
    m, _ = _patched(names=("cars", "dtd"))
    with torch.no_grad():
        for c in ak.coefficients(m).values():
            c.copy_(torch.tensor([0.1, 0.7]))
    f = tmp_path / "c.safetensors"
    ak.save_coefficients(m, f)
    swapped, _ = _patched(names=("dtd", "cars"))
    with pytest.raises(ValueError, match=r"another order.*\['cars', 'dtd'\].*\['dtd', 'cars'\]"):
        ak.load_coefficients(swapped, f)
    with pytest.raises(ValueError, match="another order"):
        ak.load_coefficients(swapped, f, strict=False)  # never a reorder
    assert all(bool((c == 0).all()) for c in ak.coefficients(swapped).values())
    renamed, _ = _patched(names=("cars_v2", "dtd"))
    with pytest.raises(ValueError, match=r"names differ.*strict=False"):
        ak.load_coefficients(renamed, f)
    ak.load_coefficients(renamed, f, strict=False)  # a rename, same order
    assert all(torch.equal(c.detach(), torch.tensor([0.1, 0.7])) for c in ak.coefficients(renamed).values())
    moved, _ = _patched(names=("dtd", "x"))
    with pytest.raises(ValueError, match="other positions"):
        ak.load_coefficients(moved, f, strict=False)


def _ddp_like(m):
    """A DistributedDataParallel holding ``m`` without a process group (constructing a real one
    needs gloo and takes seconds; what matters here is the wrapper's type and its ``.module``)."""
    ddp = nn.parallel.DistributedDataParallel.__new__(nn.parallel.DistributedDataParallel)
    nn.Module.__init__(ddp)
    ddp.module = m
    return ddp


def test_wrappers_give_the_same_coefficient_names(tmp_path):
    m, _ = _patched()
    names = list(ak.coefficients(m))
    ddp = _ddp_like(m)
    wrapped = {"compile": torch.compile(m), "DataParallel": nn.DataParallel(m), "DDP": ddp,
               "compile(DDP)": torch.compile(ddp)}
    assert any(k.startswith("_orig_mod.") for k, _ in wrapped["compile"].named_parameters())
    f = tmp_path / "ref.safetensors"
    ak.save_coefficients(m, f)
    for what, w in wrapped.items():
        assert list(ak.coefficients(w)) == names, what
        assert ak.is_patched(w), what
        g = tmp_path / f"{what.replace('(', '_').replace(')', '')}.safetensors"
        ak.save_coefficients(w, g)
        ak.load_coefficients(w, f)
        ak.load_coefficients(m, g)
