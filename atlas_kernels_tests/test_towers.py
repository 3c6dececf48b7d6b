"""Every tower family composes exactly: tiny models built from configs with random weights, in
float64, against ``torch.func.functional_call`` of an unpatched copy with ``theta0 + sum lam tau``
(outputs within 1e-5, coefficient gradients within 1e-4, relative). Plus unpatch keys and values,
partitions=4, blocks="weights", BatchNorm modes, tied weights, verify= and torch.compile.

The reference here is written independently of the library (no atlas module, no ops)."""
import copy
import warnings

import pytest
import torch
import torch.nn as nn
from torch.func import functional_call

import atlas_kernels as ak
from atlas_kernels.partitions import Partition

from ._util import rel_err

N = 2


def _open_clip_vit():
    import open_clip

    vision = {"image_size": 16, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8}
    text = {"context_length": 8, "vocab_size": 50, "width": 16, "heads": 1, "layers": 1}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return open_clip.model.CLIP(embed_dim=16, vision_cfg=vision, text_cfg=text).visual, (1, 3, 16, 16)


def _rn50():
    """open_clip's ModifiedResNet (the RN50/RN101 towers), one bottleneck per stage, width 8."""
    from open_clip.modified_resnet import ModifiedResNet

    return ModifiedResNet([1, 1, 1, 1], output_dim=16, heads=2, image_size=32, width=8), (2, 3, 32, 32)


def _convnext():
    """The timm ConvNeXt that open_clip's ConvNeXt towers wrap (open_clip.timm_model.TimmModel)."""
    from timm.models.convnext import ConvNeXt

    return ConvNeXt(depths=(1, 1, 1, 1), dims=(8, 8, 16, 16), num_classes=4, ls_init_value=0.5), (1, 3, 32, 32)


def _timm_vit():
    from timm.models.vision_transformer import VisionTransformer

    return (VisionTransformer(img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2, num_classes=4),
            (1, 3, 16, 16))


def _hf_clip_vision():
    transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install .[test])")
    cfg = transformers.CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, image_size=16, patch_size=8, projection_dim=8)
    return _FirstOutput(transformers.CLIPVisionModel(cfg)), (1, 3, 16, 16)


class _FirstOutput(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(pixel_values=x).pooler_output


class _TiedLM(nn.Module):
    """GPT-2's layout: ``head.weight`` is ``wte.weight``."""

    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(11, 8)
        self.ln = nn.LayerNorm(8)
        self.head = nn.Linear(8, 11, bias=False)
        self.head.weight = self.wte.weight

    def forward(self, i):
        return self.head(self.ln(self.wte(i)))


def _tied():
    return _TiedLM(), None


class _Logits(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, i):
        return self.inner(input_ids=i).logits


def _hf_gpt2():
    """Hugging Face GPT-2: lm_head.weight is transformer.wte.weight; Conv1D layers (generic path)."""
    transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install .[test])")
    cfg = transformers.GPT2Config(vocab_size=11, n_positions=8, n_embd=16, n_layer=1, n_head=2,
                                  attn_implementation="eager")
    return _Logits(transformers.GPT2LMHeadModel(cfg)), None


def _hf_causal_lm(family, tied):
    """A Hugging Face causal LM of the Llama/Qwen/Mistral families (grouped-query attention: 4 heads,
    2 key/value heads; RMSNorm, rotary embeddings, SwiGLU MLP), 2 layers of width 16."""
    transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install .[test])")
    cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
           "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
           "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM)}[family]
    cfg = cls[0](vocab_size=11, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=16, tie_word_embeddings=tied)
    return _Logits(cls[1](cfg)), None


FAMILIES = {"open_clip_vit": _open_clip_vit, "open_clip_rn50": _rn50, "convnext": _convnext,
            "timm_vit": _timm_vit, "hf_clip_vision": _hf_clip_vision, "tied": _tied, "hf_gpt2_tied": _hf_gpt2,
            "hf_llama": lambda: _hf_causal_lm("llama", False), "hf_qwen2_tied": lambda: _hf_causal_lm("qwen2", True),
            "hf_mistral": lambda: _hf_causal_lm("mistral", False)}


def _input(shape, g):
    if shape is None:
        return torch.randint(0, 11, (3, 5), generator=g)
    return torch.randn(shape, generator=g, dtype=torch.float64)


def _slabs(model, g):
    return {k: 0.05 * torch.randn((N, *p.shape), generator=g, dtype=torch.float64) * (p.detach().abs().mean() + 0.1)
            for k, p in model.named_parameters()}


def _theta(params, slabs, lam, k_parts):
    """theta0 + sum_i lam[i, part(e)] tau[i, e] per adapted block (plain torch, float64)."""
    out = {}
    for k, c in lam.items():
        p = params[k]
        part = Partition.for_block(k, k_parts, "contiguous", 0).index(p.numel())
        c2 = c if c.dim() == 2 else c[:, None]
        out[k] = p.detach() + (c2[:, part] * slabs[k].reshape(N, -1)).sum(0).reshape(p.shape)
    return out


def _run(family, *, partitions=1, blocks=None, compile_backend=None, batchnorm="frozen", train=False):
    g = torch.Generator().manual_seed(0)
    model, shape = FAMILIES[family]()
    model = model.double().train(train)
    reference = copy.deepcopy(model)
    params = dict(model.named_parameters())
    slabs = _slabs(model, g)
    keys = set(model.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # BatchNorm buffers are not in the slabs; nothing else warns
        ak.patch(model, ak.TaskVectors(slabs), partitions=partitions, blocks=blocks, batchnorm=batchnorm)
    coefs = ak.coefficients(model)
    with torch.no_grad():
        for c in coefs.values():
            c.copy_(torch.rand(c.shape, generator=g, dtype=torch.float64) * 2 - 1)
    x = _input(shape, g)
    run = torch.compile(model, backend=compile_backend) if compile_backend else model
    out = run(x)
    w = torch.randn(out.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad((out * w).sum(), list(coefs.values()))

    lam = {k: c.detach().clone().requires_grad_() for k, c in coefs.items()}
    if batchnorm == "frozen":
        reference.eval()  # theta0's statistics, whatever the mode
    ref = functional_call(reference, _theta(params, slabs, lam, partitions), (x,), strict=False)
    ref_grads = torch.autograd.grad((ref * w).sum(), list(lam.values()))

    assert rel_err(out, ref) < 1e-5, f"{family}: output relative error {rel_err(out, ref):.3g}"
    total = torch.cat([r.reshape(-1) for r in ref_grads]).norm()
    for name, got, want in zip(coefs, grads, ref_grads):
        err = (got - want).norm()
        assert err <= 1e-4 * want.norm() + 1e-9 * total, f"{family}: coefficient gradient of {name!r}: {err:.3g}"
    return model, reference, params, slabs, lam, keys, x


@pytest.mark.parametrize("family", ["open_clip_vit", "open_clip_rn50", "convnext", "timm_vit", "hf_clip_vision",
                                    "tied", "hf_gpt2_tied", "hf_llama", "hf_qwen2_tied", "hf_mistral"])
def test_tower_composes_and_unpatches_exactly(family):
    model, reference, params, slabs, lam, keys, x = _run(family)
    theta = _theta(params, slabs, lam, 1)
    ak.unpatch(model)
    assert set(model.state_dict()) == keys
    merged = dict(model.named_parameters())
    for k, v in theta.items():
        assert rel_err(merged[k], v) < 1e-12, k
    assert rel_err(model(x), functional_call(reference, theta, (x,), strict=False)) < 1e-10


@pytest.mark.parametrize("family", ["open_clip_vit", "open_clip_rn50", "timm_vit"])
def test_tower_partitions_and_weights_only(family):
    if family != "open_clip_rn50":  # RN50's blocks are covered by K=4; keep the file short
        _run(family, blocks="weights")
    _run(family, partitions=4)


def _attention_pool():
    from open_clip.modified_resnet import AttentionPool2d

    return AttentionPool2d(spacial_dim=2, embed_dim=8, num_heads=2, output_dim=4), (2, 8, 2, 2)


FAMILIES["attention_pool"] = _attention_pool


def test_rn50_attention_pool_reads_composed_weights_under_compile():
    """RN50's AttentionPool2d reads q/k/v/c_proj.weight and .bias directly
    (F.multi_head_attention_forward), compiled (the whole RN50 compiles the same way; only this
    part reads weights from outside their module, and compiling just it keeps the test short)."""
    _run("attention_pool", compile_backend="aot_eager")


@pytest.mark.parametrize("mode", ["frozen", "train"])
def test_batchnorm_modes(mode):
    """frozen: train mode normalizes with theta0's running statistics and never changes them;
    train: batch statistics, running statistics updated as the unpatched model would."""
    model, reference, *_ = _run("open_clip_rn50", batchnorm=mode, train=True)
    bn = model.bn1
    ref_bn = reference.bn1
    if mode == "frozen":
        assert not bn.training and model.training
        assert torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean)) and int(bn.num_batches_tracked) == 0
        ak.unpatch(model)
        assert model.bn1.training and "train" not in model.bn1.__dict__
    else:
        assert bn.training and int(bn.num_batches_tracked) == 1
        assert rel_err(bn.running_var, ref_bn.running_var) < 1e-10


def test_tied_weights_are_one_block():
    model, _ = _tied()
    g = torch.Generator().manual_seed(0)
    slabs = _slabs(model, g)
    slabs["head.weight"] = slabs["wte.weight"].clone()  # both names of the tied tensor, agreeing
    ak.patch(model.double(), ak.TaskVectors({k: v for k, v in slabs.items()}))
    assert list(ak.coefficients(model)) == ["wte.weight", "ln.weight", "ln.bias"]
    assert model.head._atlas_alias["weight"] == (model.wte, "weight")  # read from the one holder
    x = torch.randint(0, 10, (2, 3))
    out = model(x)
    assert model.head.weight is model.wte.weight or torch.equal(model.head.weight, model.wte.weight)
    assert "head.weight" in model.state_dict() and "wte.weight" in model.state_dict()
    ak.unpatch(model)
    torch.testing.assert_close(model(x), out)
    assert model.head.weight is model.wte.weight
    slabs["head.weight"] = slabs["head.weight"] + 1e-3
    with pytest.raises(ValueError, match=r"'wte.weight' and 'head.weight' are one tied tensor.*task vector 0"):
        ak.patch(_TiedLM().double(), ak.TaskVectors(slabs))


def test_verify_catches_a_parent_reading_a_child_weight():
    class Reads(nn.Module):  # a custom head: reads fc.weight directly, never calls fc
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 4)
            self.p = nn.Parameter(torch.randn(4))

        def forward(self, x):
            return x @ self.fc.weight.t() * self.p

    g = torch.Generator().manual_seed(0)
    m = Reads().double()
    x = torch.randn(3, 6, dtype=torch.float64, generator=g)
    ak.patch(m, ak.TaskVectors(_slabs(m, g)), verify=x)  # composed on read: passes
    ak.unpatch(m)
    # A module whose swap misses a read: simulate by hiding the composed attribute.
    from atlas_kernels import modules

    saved = modules.AtlasLinear.weight
    try:
        def frozen_read(self):  # the bug this guard exists for: reading theta0 from outside
            if "weight" not in self.__dict__.get("_buffers", {}):
                raise AttributeError("weight")
            return self._theta0("weight")

        modules.AtlasLinear.weight = property(frozen_read)
        with pytest.raises(RuntimeError, match="does not compute the composed model"):
            ak.patch(m, ak.TaskVectors(_slabs(m, g)), verify=x)
        assert not ak.is_patched(m) and isinstance(m.fc, nn.Linear)  # left as it was
    finally:
        modules.AtlasLinear.weight = saved


def test_verify_true_builds_its_probe_from_the_config():
    model, _ = _open_clip_vit()
    g = torch.Generator().manual_seed(0)
    ak.patch(model, ak.TaskVectors({k: v.float() for k, v in _slabs(model, g).items()}), verify=True)
    with pytest.raises(ValueError, match="verify=True needs to know the module's input"):
        ak.patch(_TiedLM(), ak.TaskVectors({"ln.weight": torch.randn(1, 8)}), verify=True)
