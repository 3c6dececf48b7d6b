"""The memory planner: every term against its definition, and the activation and composed-weight
terms against what autograd actually saves (torch.autograd.graph.saved_tensors_hooks) on a patched
open_clip ViT on the CPU.

Tolerance: the planner's activation model is exact on the CPU today (the tests see 0 bytes of
difference); they allow 5% so that a harmless change in what some op saves does not fail them, and
composed weights must match exactly. The GPU peak is compared by the benchmark.
"""
import logging

import pytest
import torch
import torch.nn as nn

import atlas_kernels as ak
from atlas_kernels.planner import MemoryEstimate, estimate_memory

ACT_TOL = 0.05


def _tiny(quick_gelu=False, layers=2, width=64, image=32, patch=8):
    from open_clip.model import CLIPVisionCfg, _build_vision_tower

    cfg = CLIPVisionCfg(layers=layers, width=width, head_width=32, patch_size=patch, image_size=image)
    return _build_vision_tower(32, cfg, quick_gelu=quick_gelu)


def _tvs(tower, n=2, storage="float32"):
    g = torch.Generator().manual_seed(1)
    tv = ak.TaskVectors({k: torch.randn(n, *p.shape, generator=g) * 1e-3 for k, p in tower.named_parameters()})
    return tv.to_storage(storage)


def _saved_bytes(tower, x, precision, batch, backward=True):
    """(activation bytes, composed-weight bytes) saved for backward by one forward of a patched tower.

    Unique storages, excluding the module's own parameters and buffers (theta0, slabs, scales).
    Activations all carry the batch dimension; the batch is chosen (5) so that no weight's size is a
    multiple of it, which tells the two apart."""
    own = {t.untyped_storage().data_ptr() for t in list(tower.parameters()) + list(tower.buffers())}
    saved = []

    def pack(t):
        saved.append(t)
        return t

    ctx = (torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16"
           else torch.autocast("cpu", enabled=False))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), ctx:
        out = tower(x)
    storages = {}
    for t in saved:
        s = t.untyped_storage()
        if s.data_ptr() not in own:
            storages[s.data_ptr()] = (s.nbytes(), t.element_size())
    act = sum(nb for nb, es in storages.values() if (nb // es) % batch == 0)
    comp = sum(nb for nb, es in storages.values() if (nb // es) % batch != 0)
    if backward:
        out.float().sum().backward()  # the graph is complete and usable
    return act, comp


@pytest.mark.parametrize("quick_gelu", [False, True], ids=["gelu", "quickgelu"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_activations_and_composed_match_saved_tensors(precision, quick_gelu):
    torch.manual_seed(0)
    tower = _tiny(quick_gelu)
    tvs = _tvs(tower)
    batch = 5
    est = estimate_memory(tower, tvs, batch, precision=precision, device="cpu")
    ak.patch(tower, tvs, backend="torch")
    tower.train()
    act, comp = _saved_bytes(tower, torch.randn(batch, 3, 32, 32), precision, batch)
    assert abs(est.activations - act) <= ACT_TOL * act, (est.activations, act, est.detail)
    assert est.composed == comp


@pytest.fixture(scope="module")
def clip_b32():
    import open_clip

    logging.getLogger().setLevel(logging.ERROR)
    torch.manual_seed(0)
    return open_clip.create_model("ViT-B-32", pretrained=None)


def test_vit_b32_geometry_activations_match_saved_tensors():
    """ViT-B/32's geometry (width 768, MLP 3072, 12 heads, 32-pixel patches at 224: 50 tokens from
    the positional embedding), cut to 2 blocks to keep the CPU time short."""
    import open_clip
    from open_clip.model import CLIPVisionCfg, _build_vision_tower

    cfg = open_clip.get_model_config("ViT-B-32")
    tower = _build_vision_tower(cfg["embed_dim"], CLIPVisionCfg(**dict(cfg["vision_cfg"], layers=2)))
    tvs = ak.TaskVectors({k: torch.zeros(1, *p.shape) for k, p in tower.named_parameters()})
    sizes = [p.numel() for p in tower.parameters()]
    batch = next(b for b in (5, 7, 11, 13) if all(s % b for s in sizes))
    est = estimate_memory(tower, tvs, batch, precision="bf16", device="cpu")
    assert (est.tokens, est.width, est.layers, est.heads, est.mlp_width) == (50, 768, 2, 12, 3072)
    ak.patch(tower, tvs, backend="torch")
    tower.train()
    act, comp = _saved_bytes(tower, torch.randn(batch, 3, 224, 224), "bf16", batch, backward=False)
    assert abs(est.activations - act) <= ACT_TOL * act, (est.activations, act)
    assert est.composed == comp


def test_terms_against_their_definitions():
    tower = _tiny()
    params = dict(tower.named_parameters())
    for storage in ("float32", "bfloat16", "int8"):
        tvs = _tvs(tower, n=3, storage=storage)
        est = estimate_memory(tower, tvs, 4, precision="bf16", partitions=2)
        assert isinstance(est, MemoryEstimate)
        assert est.theta0 == sum(p.numel() * p.element_size() for p in tower.parameters())
        assert est.task_vectors == tvs.nbytes
        # The (N, storage) shorthand counts the same bytes without building anything.
        assert estimate_memory(tower, (3, storage), 4).task_vectors == tvs.nbytes
        assert est.coefficients == 4 * 4 * 3 * 2 * len(params)  # N x K per block: value, grad, 2 AdamW moments
        assert est.inputs == 4 * 3 * 32 * 32 * 4
        assert est.total == sum(getattr(est, t) for t in MemoryEstimate.TERMS)
        assert est.n == 3 and est.storage == storage and est.blocks == len(params)
    # composed: matrices and the convolution in the compute dtype, LayerNorm in fp32 (CUDA autocast),
    # biases and embeddings 0.
    kept = {}
    for name, p in params.items():
        owner = name.rpartition(".")[0]
        if name in ("class_embedding", "positional_embedding") or name.endswith("bias") and "ln" not in owner:
            kept[name] = 0
        elif "ln" in owner:
            kept[name] = p.numel() * 4
        else:
            kept[name] = p.numel() * 2
    est = estimate_memory(tower, (3, "bfloat16"), 4, precision="bf16")
    assert est.composed == sum(kept.values())
    rec = estimate_memory(tower, (3, "bfloat16"), 4, precision="bf16", recompute=True)
    assert rec.composed == max(kept.values())
    # transient: G of the largest block (bf16 + its fp32 copy) + fp32 accumulator + one widened chunk
    # (N x numel fp32 here) + c_proj's input gradient.
    big = max(p.numel() for p in params.values() if p.dim() >= 2)
    assert est.transient == big * (2 + 4) + big * 4 + 3 * big * 4 + 4 * 17 * 256 * 2
    # No task vectors: the plain model's step.
    plain = estimate_memory(tower, None, 4, precision="bf16")
    assert plain.task_vectors == plain.composed == plain.coefficients == 0
    assert plain.activations == est.activations


def test_cuda_autocast_keeps_layernorm_inputs_in_fp32():
    tower = _tiny()
    cpu = estimate_memory(tower, None, 4, precision="bf16", device="cpu")
    cuda = estimate_memory(tower, None, 4, precision="bf16", device="cuda")
    n_ln = 2 * 2 + 2  # two per block, ln_pre, ln_post
    assert cuda.activations - cpu.activations == n_ln * 4 * 17 * 64 * (4 - 2)
    fp32 = estimate_memory(tower, None, 4, precision="fp32", device="cuda")
    assert fp32.activations == estimate_memory(tower, None, 4, precision="fp32", device="cpu").activations
    assert fp32.inputs == 0  # the convolution keeps the caller's fp32 batch itself


def test_tokens_image_size_and_whole_clip(clip_b32):
    v = clip_b32.visual
    assert estimate_memory(v, None, 2).tokens == 50
    assert estimate_memory(v, None, 2, image_size=448).tokens == 14 * 14 + 1
    assert estimate_memory(v, None, 2, image_size=(224, 448)).tokens == 7 * 14 + 1
    assert estimate_memory(v, None, 2, tokens=10).tokens == 10
    whole = estimate_memory(clip_b32, (21, "int8"), 8)
    assert whole == estimate_memory(v, (21, "int8"), 8)
    assert whole.blocks == 152 and abs(sum(p.numel() for p in v.parameters()) - 87.8e6) < 0.1e6
    text = str(whole)
    for label in ("theta0", "task vectors", "composed", "activations", "transient", "coefficients", "total", "GiB"):
        assert label in text
    assert f"{whole.total / 2**30:.3f}" in text


def test_meta_tower_plans_without_memory():
    import open_clip
    from open_clip.model import CLIPVisionCfg, _build_vision_tower

    cfg = open_clip.get_model_config("ViT-L-14")
    with torch.device("meta"):
        tower = _build_vision_tower(cfg["embed_dim"], CLIPVisionCfg(**cfg["vision_cfg"]))
    est = estimate_memory(tower, (30, "int8"), 32)
    assert est.tokens == 257 and est.layers == 24 and est.blocks == 296
    fp32 = estimate_memory(tower, (30, "float32"), 32)
    assert est.task_vectors <= 0.30 * fp32.task_vectors  # int8 with its per-row scales (docs/STORAGE_ERROR.md)
    assert est.total < fp32.total


def test_refusals():
    tower = _tiny()
    with pytest.raises(ValueError, match="precision must be one of"):
        estimate_memory(tower, None, 2, precision="int8")
    with pytest.raises(ValueError, match="batch must be a positive int"):
        estimate_memory(tower, None, 0)
    with pytest.raises(ValueError, match="device must be 'cuda' or 'cpu'"):
        estimate_memory(tower, None, 2, device="tpu")
    with pytest.raises(ValueError, match="models open_clip ViT image towers"):
        estimate_memory(nn.Sequential(nn.Linear(2, 2)), None, 2)
    with pytest.raises(ValueError, match="block 'nope.weight', which the tower does not have"):
        estimate_memory(tower, ak.TaskVectors({"nope.weight": torch.zeros(1, 2, 2)}), 2)
    with pytest.raises(ValueError, match="N must be a positive int"):
        estimate_memory(tower, (0, "int8"), 2)
    with pytest.raises(TypeError, match="task_vectors must be"):
        estimate_memory(tower, "int8", 2)
    ak.patch(tower, _tvs(tower))
    with pytest.raises(ValueError, match="before patch"):
        estimate_memory(tower, None, 2)


# ------------------------------------------------------------------------------------------- sharded
def _rank0_bytes(tvs, tower, world):
    """Rank 0's theta0 and task-vector bytes, from the tensors atlas_kernels.sharding cuts."""
    from atlas_kernels.sharding import rows_of, take_rows

    theta0 = slabs = 0
    params = dict(tower.named_parameters())
    for b in tvs.blocks:
        rows = rows_of(params[b].shape[0], 0, world)
        theta0 += take_rows(params[b].detach(), 0, rows).nbytes
        if tvs.is_lora(b):
            a, bb = tvs.lora(b)
            slabs += a.nbytes + take_rows(bb, 1, rows).nbytes
            continue
        slabs += take_rows(tvs[b], 1, rows).nbytes
        sc = tvs.scale(b)
        if sc is not None:
            slabs += (take_rows(sc, 1, rows, fill=1.0) if params[b].dim() >= 2 else sc).nbytes
    return theta0, slabs


@pytest.mark.parametrize("storage", ["float32", "int8"])
@pytest.mark.parametrize("world", [2, 4])
def test_sharded_theta0_and_task_vectors_per_rank(storage, world):
    tower = _tiny()
    tvs = _tvs(tower, n=3, storage=storage)
    est = estimate_memory(tower, tvs, 5, precision="fp32", device="cpu", world=world)
    whole = estimate_memory(tower, tvs, 5, precision="fp32", device="cpu")
    theta0, slabs = _rank0_bytes(tvs, tower, world)
    assert est.task_vectors == slabs
    assert est.theta0 == theta0 + sum(b.nbytes for b in tower.buffers())
    assert est.activations == whole.activations and est.world == world
    assert est.task_vectors < whole.task_vectors / world * 1.05
    assert "per process of" in str(est) and "gathered blocks" in str(est)
    assert est.detail["sharded_layer_unit_values"] > 0 and est.detail["sharded_root_values"] > 0
    with pytest.raises(ValueError, match="world must be a positive int"):
        estimate_memory(tower, tvs, 5, world=0)


def _llama(dtype=torch.float32, **kw):
    transformers = pytest.importorskip("transformers")
    cfg = dict(vocab_size=40, hidden_size=24, intermediate_size=40, num_hidden_layers=3, num_attention_heads=6,
               num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=True,
               attn_implementation="sdpa")
    cfg.update(kw)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).to(dtype)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_causal_lm_activations_match_saved_tensors(precision):
    """A Llama (another shape than the ones the formula was measured on) with the next-token loss:
    the planner's activations equal the bytes autograd saves (unique storages, weights excluded)."""
    from atlas_kernels.train.objectives import next_token_losses

    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    model = _llama(dtype)
    for p in model.parameters():
        p.requires_grad_(True)
    B, T = 3, 7
    ids = torch.randint(0, 40, (B, T))
    own = {p.untyped_storage()._cdata for p in model.parameters()}
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        if s._cdata not in own:
            seen[s._cdata] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(input_ids=ids, use_cache=False).logits
        next_token_losses(logits.float(), ids, torch.full((B,), T)).sum()
    est = estimate_memory(model, (2, "float32"), B, tokens=T, precision=precision, device="cpu")
    # exact but for the loss's bookkeeping of token ids and masks (modelled as 24 bytes per token)
    assert abs(est.activations - sum(seen.values())) <= 16 * B * T, (est.activations, sum(seen.values()))
    assert est.layers == 3 and est.kind == "LlamaForCausalLM"


def test_readme_configs_on_meta():
    """The README's per-process numbers, from configs on the meta device: ViT-bigG/14 with N = 21 and
    Llama-3-8B with N = 8, bf16 task vectors, on 8 processes."""
    import open_clip
    from open_clip.model import CLIPVisionCfg, _build_vision_tower

    transformers = pytest.importorskip("transformers")
    cfg = open_clip.get_model_config("ViT-bigG-14")
    with torch.device("meta"):
        big_g = _build_vision_tower(cfg["embed_dim"], CLIPVisionCfg(**cfg["vision_cfg"]))
        llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
            num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False)).to(torch.bfloat16)
    for model, kw in ((big_g, dict(task_vectors=(21, "bfloat16"), batch=16)),
                      (llama, dict(task_vectors=(8, "bfloat16"), batch=1, tokens=2048))):
        one = estimate_memory(model, precision="bf16", **kw)
        eight = estimate_memory(model, precision="bf16", world=8, **kw)
        assert eight.task_vectors <= one.task_vectors / 8 * 1.01
        assert eight.theta0 < one.theta0 / 4 and eight.total < one.total / 2
