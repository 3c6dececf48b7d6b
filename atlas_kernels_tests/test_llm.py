"""Causal LMs (Llama, Qwen2, Mistral families, tiny, built from configs offline): LoRA task vectors
from PEFT adapters against a float64 reference (never densified), a real PEFT adapter where peft is
installed, and ``python -m atlas_kernels.train --objective lm`` on the toy LM (train, resume,
coefficient files, bad input). The dense full-fine-tune composition of these families is in
test_towers.py (hf_llama, hf_qwen2_tied, hf_mistral)."""
import copy
import json
from pathlib import Path

import pytest
import torch
from torch.func import functional_call

import atlas_kernels as ak
from atlas_kernels.train import ConfigError, DataError, TrainConfig, run, setup

from ._util import rel_err

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install .[test])")

pytestmark = pytest.mark.usefixtures("one_thread")

N = 3
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _lm(family="llama", tied=True, dtype=torch.float64):
    cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
           "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
           "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM)}[family]
    cfg = cls[0](vocab_size=13, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=16, tie_word_embeddings=tied)
    torch.manual_seed(0)
    return cls[1](cfg).to(dtype).eval()


def _adapters(model, tmp_path, g, r=(2, 3, 4)):
    """N PEFT adapter folders on every projection of ``model`` (ranks 2, 3, 4 and lora_alpha 8, so
    the scalings differ): ``(folders, raw factors per adapter)``."""
    folders, raw = [], []
    for i in range(N):
        f = {}
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS:
                f[name + ".weight"] = (torch.randn(r[i], m.in_features, generator=g, dtype=torch.float64) * 0.3,
                                       torch.randn(m.out_features, r[i], generator=g, dtype=torch.float64) * 0.3)
        ak.write_peft_adapter(tmp_path / f"a{i}", f, r=r[i], lora_alpha=8, target_modules=list(TARGETS))
        folders.append(tmp_path / f"a{i}")
        raw.append({k: (a, b, 8 / r[i]) for k, (a, b) in f.items()})
    return folders, raw


@pytest.mark.parametrize("family,tied", [("llama", True), ("qwen2", False), ("mistral", True)])
def test_peft_lora_task_vectors_match_float64_and_stay_factored(tmp_path, family, tied):
    """N = 3 PEFT adapters of ranks 2/3/4: the patched LM's logits and coefficient gradients equal
    functional_call of the plain model with theta0 + sum_i lam_i s_i B_i A_i (float64, written here
    without the library), and the blocks hold the factors, not a dense slab."""
    g = torch.Generator().manual_seed(1)
    model = _lm(family, tied)
    reference = copy.deepcopy(model)
    folders, raw = _adapters(model, tmp_path, g)
    tvs = ak.TaskVectors.from_peft(folders)
    assert all(tvs.is_lora(b) for b in tvs.blocks) and len(tvs.blocks) == 2 * len(TARGETS)
    params = dict(model.named_parameters())
    ak.patch(model, tvs)
    q = model.model.layers[0].self_attn.q_proj
    assert q._buffers["weight_tau"] is None and q._buffers["weight_lora_a"].shape == (N, 4, 16)  # padded to r=4
    coefs = ak.coefficients(model)
    with torch.no_grad():
        for c in coefs.values():
            c.copy_(torch.rand(c.shape, generator=g) * 2 - 1)
    x = torch.randint(0, 13, (2, 7), generator=g)
    out = model(input_ids=x).logits
    w = torch.randn(out.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad((out * w).sum(), list(coefs.values()))

    lam = {k: c.detach().double().clone().requires_grad_() for k, c in coefs.items()}
    theta = {k: params[k].detach() + sum(lam[k][i] * raw[i][k][2] * (raw[i][k][1] @ raw[i][k][0]) for i in range(N))
             for k in lam}
    ref = functional_call(reference, theta, (), {"input_ids": x}, strict=False).logits
    ref_grads = torch.autograd.grad((ref * w).sum(), list(lam.values()))
    assert rel_err(out, ref) < 1e-6, rel_err(out, ref)  # LoRA factors are stored in float32
    for k, got, want in zip(coefs, grads, ref_grads):
        assert rel_err(got, want) < 1e-5, (k, rel_err(got, want))


def test_a_real_peft_adapter_is_its_merged_model(tmp_path):
    """An adapter saved by PEFT itself (get_peft_model + save_pretrained) at coefficient 1 gives
    PEFT's merge_and_unload model."""
    peft = pytest.importorskip("peft", reason="peft is not installed")
    base = _lm("llama", True, torch.float32)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(TARGETS)))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    pm.save_pretrained(str(tmp_path / "peft"))
    merged = pm.merge_and_unload().eval()
    ak.patch(base, ak.TaskVectors.from_peft([tmp_path / "peft"]))
    with torch.no_grad():
        for c in ak.coefficients(base).values():
            c.fill_(1.0)
    x = torch.randint(0, 13, (2, 7), generator=g)
    assert rel_err(base(input_ids=x).logits, merged(input_ids=x).logits) < 1e-5


# ------------------------------------------------------------------------------------------- the CLI
@pytest.fixture(scope="session")
def lm_demo(tmp_path_factory):
    from atlas_kernels.train import toy_lm

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return toy_lm.make_demo(tmp_path_factory.mktemp("toy_lm"), pretrain_steps=30, finetune_steps=20,
                                lora_steps=20)
    finally:
        torch.set_num_threads(n)


def _cfg(demo, out, **kw):
    base = dict(task_vectors=str(demo["task_vectors"]), out=str(out), objective="lm", hf_model=str(demo["base"]),
                train=[str(demo["data"]["count"]["train"])], val=[str(demo["data"]["count"]["val"])],
                seq_len=32, workers=0, quiet=True, epochs=2, batch_size=8, lr=0.1)
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("which", ["task_vectors", "task_vectors_lora"])
def test_lm_objective_learns_and_writes_loadable_coefficients(lm_demo, tmp_path, which):
    res = run(_cfg(lm_demo, tmp_path / "lm", task_vectors=str(lm_demo[which]), epochs=3))
    m = json.loads((tmp_path / "lm" / "metrics.json").read_text())
    assert m["objective"] == "lm" and m["datasets"][0]["name"] == "count"
    assert res["selected"]["metrics"]["count"]["loss"] < res["zero_shot"]["count"]["loss"] - 0.01, res["history"]
    model = transformers.LlamaForCausalLM.from_pretrained(str(lm_demo["base"]), local_files_only=True)
    ak.patch(model, ak.TaskVectors.load(str(lm_demo[which])))
    ak.load_coefficients(model, str(tmp_path / "lm" / "coefficients.safetensors"))
    assert any(float(c.detach().abs().max()) > 0.01 for c in ak.coefficients(model).values())


def test_lm_resume_is_exact(lm_demo, tmp_path):
    full = run(_cfg(lm_demo, tmp_path / "full"))
    part = run(_cfg(lm_demo, tmp_path / "part", stop_after_steps=3))
    assert part["stopped"]
    res = run(_cfg(lm_demo, tmp_path / "part", resume=str(tmp_path / "part" / "checkpoint.pt")))
    from safetensors.torch import load_file

    a, b = (load_file(str(tmp_path / d / "coefficients.safetensors")) for d in ("full", "part"))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert res["history"] == full["history"]


def test_lm_bad_input(lm_demo, tmp_path):
    with pytest.raises(ConfigError, match="needs --hf-model"):
        setup(_cfg(lm_demo, tmp_path / "o", hf_model=None))
    with pytest.raises(ConfigError, match="--shots is for the image objectives"):
        setup(_cfg(lm_demo, tmp_path / "o", shots=4))
    with pytest.raises(ConfigError, match="--hf-model .* is for --objective lm"):
        setup(_cfg(lm_demo, tmp_path / "o", objective="fewshot", model_config="x.json"))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(DataError, match="holds no example"):
        setup(_cfg(lm_demo, tmp_path / "o", train=[str(empty)]))
    short = tmp_path / "short.txt"
    short.write_text("hello\nx\n")
    with pytest.raises(DataError, match=r"line 2: 1 token\(s\)"):
        setup(_cfg(lm_demo, tmp_path / "o", train=[str(short)]))
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"ok line\n\xff\xfe\n")
    with pytest.raises(DataError, match="line 2: not UTF-8"):
        setup(_cfg(lm_demo, tmp_path / "o", val=[str(binary)]))
    with pytest.raises(ValueError, match="is not a folder"):
        setup(_cfg(lm_demo, tmp_path / "o", hf_model=str(tmp_path / "nope")))
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((Path(lm_demo["base"]) / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="pickled weights"):
        setup(_cfg(lm_demo, tmp_path / "o", hf_model=str(pickled)))
    # task vectors of the image tower for an LM: named blocks it lacks
    other = tmp_path / "other.safetensors"
    ak.TaskVectors({"conv1.weight": torch.zeros(1, 4, 3, 2, 2)}).save(str(other))
    with pytest.raises(ValueError, match="conv1.weight"):
        setup(_cfg(lm_demo, tmp_path / "o", task_vectors=str(other)))
    assert not (tmp_path / "o").exists()


def test_a_tokenizer_in_the_model_folder_is_used(lm_demo, tmp_path):
    """A folder with a tokenizer: it tokenises the lines (here a word-level one built offline);
    one with more ids than the model's vocabulary is refused."""
    import shutil

    from tokenizers import Tokenizer, models, pre_tokenizers

    from atlas_kernels.train import data as D

    folder = tmp_path / "with_tok"
    shutil.copytree(lm_demo["base"], folder)
    vocab = {"[UNK]": 0, **{str(i): i + 1 for i in range(100)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(str(folder))
    t = D.load_tokenizer(folder, 256)
    assert isinstance(t, D.HFTokenizer) and t("3 4 5") == [4, 5, 6]
    with pytest.raises(DataError, match="101 token ids, the model's vocabulary only 64"):
        D.load_tokenizer(folder, 64)
    assert isinstance(D.load_tokenizer(lm_demo["base"], 256), D.ByteTokenizer)


def test_task_vectors_cli_builds_lora_sets_from_peft_folders(lm_demo, tmp_path, capsys):
    from atlas_kernels.task_vectors.cli import main

    out = tmp_path / "lora.safetensors"
    assert main(["peft", *map(str, lm_demo["lora"]), "--out", str(out), "--names", "a", "b"]) == 0
    tvs = ak.TaskVectors.load(str(out))
    assert tvs.names == ["a", "b"] and all(tvs.is_lora(b) for b in tvs.blocks)
    assert main(["peft", str(lm_demo["lora"][0]), "--out", str(tmp_path / "x.pt")]) == 2
    assert "safetensors" in capsys.readouterr().err
