"""patch(..., linearised=True) against an independent float64 reference: torch.func.jvp of
functional_call at theta0 with tangent D(lam) (attention on the math path, train mode), and
backward through it for the coefficient gradients."""
import copy
import warnings

import pytest
import torch
import torch.nn as nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

import atlas_kernels as ak
from atlas_kernels import reference

from ._util import assert_close, make_tiny_vit, rel_err

pytest.importorskip("open_clip")


pytestmark = pytest.mark.usefixtures("one_thread")


def _taus64(tvs, name, n):
    """The ``[N, *shape]`` float64 task vectors of a block (LoRA densified, budgets zero-filled)."""
    if tvs.is_lora(name):
        a, b = tvs.lora(name)
        held = torch.stack([b[j].double() @ a[j].double() for j in range(a.shape[0])])
    else:
        held = reference.dequantize(tvs[name], tvs.scale(name))
    idx = tvs.index(name)
    if idx is None:
        return held
    full = torch.zeros((n, *held.shape[1:]), dtype=torch.float64)
    full[idx] = held
    return full


def _reference(model, tvs, coefs, x, partitions=1, mode="contiguous", seed=0):
    m = copy.deepcopy(model).double().train()
    params = {k: p.detach() for k, p in m.named_parameters()}
    c64 = {k: c.detach().double().requires_grad_(True) for k, c in coefs.items()}
    tangents = []
    for k, p in params.items():
        if k in c64:
            part = ak.Partition.for_block(k, partitions, mode, seed)
            tangents.append(reference.compose(torch.zeros_like(p), _taus64(tvs, k, len(tvs)), c64[k], part))
        else:
            tangents.append(torch.zeros_like(p))
    names = list(params)

    def f(*vals):
        return functional_call(m, dict(zip(names, vals)), (x.double(),))

    with sdpa_kernel(SDPBackend.MATH):
        out, tan = torch.func.jvp(f, tuple(params.values()), tuple(tangents))
    return out + tan, c64


def _random_coefs(coefs, seed=1, scale=0.7):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for c in coefs.values():
            c.copy_(torch.randn(c.shape, generator=g, dtype=c.dtype) * scale)


def _dense_tvs(model, n, seed=0, std=0.05, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return ak.TaskVectors({k: torch.randn((n, *p.shape), generator=g, dtype=dtype) * std
                           for k, p in model.named_parameters()})


def _check(model, tvs, x, *, partitions=1, mode="contiguous", seed=0, backend="torch", dtype=torch.float64,
           rtol=1e-9, grad_tol=1e-6, check_primal=True, **patch_kwargs):
    # grad_tol: the coefficients (and so their gradients) are float32 parameters
    patched = ak.patch(copy.deepcopy(model).to(dtype).train(), tvs, partitions=partitions, partition_mode=mode,
                       seed=seed, backend=backend, linearised=True, **patch_kwargs)
    coefs = ak.coefficients(patched)
    assert coefs and all(c.requires_grad for c in coefs.values())
    _random_coefs(coefs)
    out = patched(x.to(dtype))
    ref, c64 = _reference(model, tvs, coefs, x, partitions, mode, seed)
    # the tangent matters: the linearised output differs from the primal by far more than the tolerance
    if check_primal:
        with torch.no_grad():
            primal = copy.deepcopy(model).double()(x.double())
        assert rel_err(ref, primal) > 1e-3
    assert rel_err(out, ref) < rtol, rel_err(out, ref)
    w = torch.randn(ref.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    (out * w.to(dtype)).sum().backward()
    (ref * w).sum().backward()
    for k, c in coefs.items():
        assert c.grad is not None, k
        err = rel_err(c.grad, c64[k].grad)
        assert err < grad_tol, (k, err)
    return patched


@pytest.fixture(scope="module")
def vit_cpu():
    # module-scoped fixtures are built before the per-test seed is set: seed here, so the weights
    # do not depend on which tests ran first
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        return make_tiny_vit("cpu")


@pytest.mark.parametrize("partitions,mode", [(1, "contiguous"), (3, "contiguous"), (2, "hash")])
def test_tiny_vit_matches_jvp_reference(vit_cpu, partitions, mode):
    x = torch.randn(2, 3, 32, 32)
    _check(vit_cpu, _dense_tvs(vit_cpu, 3), x, partitions=partitions, mode=mode, seed=7)


def test_rn50_attention_pool_reads_linearised_blocks():
    """open_clip's AttentionPool2d (RN50/RN101) reads ``q_proj.weight`` etc. directly instead of
    calling the projections: on a linearised patch that read must carry the tangent D, and its
    primal must be theta0 (not theta0 + D), or the pool is linearised at the wrong point."""
    from open_clip.modified_resnet import ModifiedResNet

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(4321)
        model = ModifiedResNet([1, 1, 1, 1], output_dim=16, heads=2, image_size=32, width=8)
    # BatchNorm without running statistics (batch statistics on both sides): the jvp reference
    # cannot update running buffers in place, and the attention pool is what this test is about.
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.track_running_stats = False
            m.running_mean = m.running_var = m.num_batches_tracked = None
    x = torch.randn(4, 3, 32, 32)
    _check(model, _dense_tvs(model, 2), x, batchnorm="train")


def test_tiny_vit_int8_storage(vit_cpu):
    x = torch.randn(2, 3, 32, 32)
    tvs = _dense_tvs(vit_cpu, 2, dtype=torch.float32).to_storage("int8")
    _check(vit_cpu, tvs, x, partitions=2, mode="hash", seed=3)


def test_tiny_vit_lora_task_vectors(vit_cpu):
    g = torch.Generator().manual_seed(2)
    linears = {k: p for k, p in vit_cpu.named_parameters() if k.endswith("weight") and p.dim() == 2}
    factors = [{k: (torch.randn(2, p.shape[1], generator=g) * 0.1, torch.randn(p.shape[0], 2, generator=g) * 0.1)
                for k, p in linears.items()} for _ in range(3)]
    tvs = ak.TaskVectors.from_lora(factors)
    x = torch.randn(2, 3, 32, 32)
    # the LoRA products run in float32 (as in the standard mode), hence rtol 1e-6 and gradients to
    # 1e-5 (measured over 8 seeds of the tower: at most 1.5e-8 and 1.3e-6)
    _check(vit_cpu, tvs, x, rtol=1e-6, grad_tol=1e-5)
    _check(vit_cpu, tvs, x, partitions=2, mode="hash", seed=1, rtol=1e-6, grad_tol=1e-5)


def test_tiny_vit_budget_ragged_blocks(vit_cpu):
    """A per-block budget (a block keeps a subset of the N task vectors) as in the standard mode."""
    tvs = _dense_tvs(vit_cpu, 3)
    names = tvs.blocks
    tvs = tvs.keep({names[0]: [2], names[3]: [0, 2], "transformer.resblocks.0.mlp.c_fc.weight": [1],
                    "transformer.resblocks.0.attn.in_proj_weight": [0, 1]})
    _check(vit_cpu, tvs, torch.randn(2, 3, 32, 32))


@pytest.mark.parametrize("fused", [True, False])
def test_triton_backend_under_interpreter(vit_cpu, monkeypatch, fused):
    pytest.importorskip("triton")

    from ._util import DEV

    # M = 2 images x 17 tokens = 34 rows: the fused GEMM at threshold 64, compose + matmul at 0

    x = torch.randn(2, 3, 32, 32, device=DEV)
    model = copy.deepcopy(vit_cpu).to(DEV)
    tvs = _dense_tvs(model, 2, dtype=torch.float32).to(DEV)
    tvs64 = ak.TaskVectors({k: tvs[k].cpu().double() for k in tvs.blocks})
    patched = ak.patch(copy.deepcopy(model).train(), tvs, partitions=2, partition_mode="hash", seed=4,
                       backend="triton", linearised=True, fused_max_m=64 if fused else 0)
    coefs = ak.coefficients(patched)
    _random_coefs(coefs)
    out = patched(x)
    ref, c64 = _reference(vit_cpu, tvs64, {k: c.cpu() for k, c in coefs.items()}, x.cpu(), 2, "hash", 4)
    assert rel_err(out, ref) < 1e-4
    assert_close(out, ref, rtol=1e-3, atol=1e-4 * ref.abs().max().item())
    w = torch.randn(ref.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    (out * w.to(out.device, out.dtype)).sum().backward()
    (ref * w).sum().backward()
    worst = max(rel_err(c.grad, c64[k].grad) for k, c in coefs.items())
    assert worst < 1e-4, worst


class _Cross(nn.Module):
    """Cross-attention with masks and weights: the projections of different inputs, a key padding
    mask and a float attention mask, sequence-first (batch_first=False)."""

    def __init__(self):
        super().__init__()
        self.pre = nn.Linear(8, 8)
        self.mha = nn.MultiheadAttention(8, 2)

    def forward(self, q, kv):
        kv = self.pre(kv)
        pad = torch.zeros(kv.shape[1], kv.shape[0], dtype=torch.bool)
        pad[0, -1] = True
        mask = torch.randn(q.shape[0], kv.shape[0], generator=torch.Generator().manual_seed(9))
        out, weights = self.mha(q, kv, kv, key_padding_mask=pad, attn_mask=mask, need_weights=True)
        return out * 2 + weights.sum()


def test_cross_attention_masks_and_weights():
    net = _Cross().double()
    q, kv = torch.randn(3, 2, 8, dtype=torch.float64), torch.randn(5, 2, 8, dtype=torch.float64)
    tvs = _dense_tvs(net, 2, std=0.2)
    patched = ak.patch(copy.deepcopy(net).train(), tvs, backend="torch", linearised=True)
    coefs = ak.coefficients(patched)
    _random_coefs(coefs)
    out = patched(q, kv)
    m = copy.deepcopy(net).train()
    c64 = {k: c.detach().clone().requires_grad_(True) for k, c in coefs.items()}
    params = {k: p.detach() for k, p in m.named_parameters()}
    tangents = tuple(reference.compose(torch.zeros_like(p), tvs[k], c64[k]) for k, p in params.items())
    out_ref, tan = torch.func.jvp(lambda *v: functional_call(m, dict(zip(params, v)), (q, kv)),
                                  tuple(params.values()), tangents)
    ref = out_ref + tan
    assert rel_err(out, ref) < 1e-10
    (out * ref.detach()).sum().backward()
    (ref * ref.detach()).sum().backward()
    assert max(rel_err(c.grad, c64[k].grad) for k, c in coefs.items()) < 1e-10


def test_primal_activations_carry_no_graph(vit_cpu):
    """Only the tangent is differentiated: with every coefficient frozen the output has no graph,
    and a submodule of the linearised model cannot be called on its own."""
    tvs = _dense_tvs(vit_cpu, 2)
    patched = ak.patch(copy.deepcopy(vit_cpu).double(), tvs, backend="torch", linearised=True)
    for c in ak.coefficients(patched).values():
        c.requires_grad_(False)
    out = patched(torch.randn(1, 3, 32, 32, dtype=torch.float64))
    assert not out.requires_grad and out.grad_fn is None
    with pytest.raises(RuntimeError, match="inside a forward of the patched module"):
        patched.transformer.resblocks[0].mlp.c_fc(torch.randn(1, 64, dtype=torch.float64))


@pytest.mark.slow
def test_whole_vit_b32_matches_jvp_reference():
    import open_clip

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vit = open_clip.create_model("ViT-B-32", pretrained=None).visual.eval()
    x = torch.randn(1, 3, 224, 224)
    # N = 1, K = 1 keep it cheap (partitions, storage and LoRA are covered on the tiny tower)
    _check(vit, _dense_tvs(vit, 1, std=0.01, dtype=torch.float32), x, rtol=1e-8, check_primal=False)


def test_coefficient_files_record_the_mode(vit_cpu, tmp_path):
    tvs = _dense_tvs(vit_cpu, 2, dtype=torch.float32)
    lin = ak.patch(copy.deepcopy(vit_cpu), tvs, backend="torch", linearised=True)
    std = ak.patch(copy.deepcopy(vit_cpu), tvs, backend="torch")
    _random_coefs(ak.coefficients(lin))
    ak.save_coefficients(lin, tmp_path / "lin.safetensors")
    ak.save_coefficients(std, tmp_path / "std.safetensors")
    other = ak.patch(copy.deepcopy(vit_cpu), tvs, backend="torch", linearised=True)
    ak.load_coefficients(other, tmp_path / "lin.safetensors")
    assert all(torch.equal(ak.coefficients(other)[k], c) for k, c in ak.coefficients(lin).items())
    with pytest.raises(ValueError, match="learned by a standard model; this module is patched linearised"):
        ak.load_coefficients(other, tmp_path / "std.safetensors")
    with pytest.raises(ValueError, match="learned by a linearised .* this module is patched standard"):
        ak.load_coefficients(std, tmp_path / "lin.safetensors")


def test_unpatch_of_linearised_names_export(vit_cpu):
    lin = ak.patch(copy.deepcopy(vit_cpu), _dense_tvs(vit_cpu, 1, dtype=torch.float32), backend="torch",
                   linearised=True)
    with pytest.raises(RuntimeError, match="export_linearised"):
        ak.unpatch(lin)
    assert ak.is_patched(lin)
    with pytest.raises(TypeError, match="linearised must be True or False"):
        ak.patch(copy.deepcopy(vit_cpu), _dense_tvs(vit_cpu, 1, dtype=torch.float32), linearised="yes")


def test_export_and_load_linearised(vit_cpu, tmp_path):
    tvs = _dense_tvs(vit_cpu, 3, dtype=torch.float32)
    lin = ak.patch(copy.deepcopy(vit_cpu), tvs, partitions=2, partition_mode="hash", backend="torch",
                   linearised=True)
    _random_coefs(ak.coefficients(lin))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = lin(x)
    with pytest.raises(ValueError, match="unpatch"):
        ak.export_linearised(ak.patch(copy.deepcopy(vit_cpu), tvs, backend="torch"), tmp_path / "std.safetensors")
    ak.export_linearised(lin, tmp_path / "lin.safetensors")
    fresh = make_tiny_vit("cpu")  # other random weights: theta0 must come from the file
    back = ak.load_linearised(tmp_path / "lin.safetensors", fresh, backend="torch")
    assert all(not c.requires_grad for c in ak.coefficients(back).values())
    out = back(x)
    assert out.grad_fn is None
    assert_close(out, expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="another architecture"):
        ak.load_linearised(tmp_path / "lin.safetensors", nn.Linear(3, 4))


def test_bf16_autocast_runs_and_stays_close(vit_cpu):
    tvs = _dense_tvs(vit_cpu, 2, dtype=torch.float32)
    lin = ak.patch(copy.deepcopy(vit_cpu), tvs, backend="torch", linearised=True)
    _random_coefs(ak.coefficients(lin))
    x = torch.randn(2, 3, 32, 32)
    ref = lin(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = lin(x)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, ref) < 3e-2  # bf16 matmuls (8 mantissa bits)
    out.float().sum().backward()
    assert all(c.grad is not None and torch.isfinite(c.grad).all() for c in ak.coefficients(lin).values())


def test_a_failed_forward_leaves_no_dual_level(vit_cpu):
    import torch.autograd.forward_ad as fwAD

    lin = ak.patch(copy.deepcopy(vit_cpu), _dense_tvs(vit_cpu, 1, dtype=torch.float32), backend="torch",
                   linearised=True)
    with pytest.raises(RuntimeError):
        lin(torch.randn(2, 3, 31, 32))  # not a multiple of the patch size
    assert fwAD._current_level == -1
    assert lin(torch.randn(2, 3, 32, 32)).shape == (2, 32)
