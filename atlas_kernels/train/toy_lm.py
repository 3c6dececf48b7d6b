"""A tiny causal-LM setup that runs offline on a CPU in seconds (for the README and the tests).

``python -m atlas_kernels.train.toy_lm DIR`` writes:

- ``DIR/base/``: a tiny Llama (``config.json``, ``model.safetensors``: width 32, 2 layers, 4 heads
  of which 2 key/value heads, tied embeddings, a 256-token vocabulary: no tokenizer file, so the
  UTF-8 bytes of a line are its tokens), briefly pre-trained on a mix of both tasks' text;
- ``DIR/data/<task>/{train,val}.txt``: two small text "tasks", one example per line: ``count``
  (runs of consecutive numbers, ``"12 13 14 15 16"``) and ``spell`` (words spelled out,
  ``"cat: c-a-t"``);
- ``DIR/finetuned_<task>/``: full fine-tunes of the base on each task (Hugging Face folders);
- ``DIR/lora_<task>/``: LoRA adapters trained on each task, in PEFT's format
  (``adapter_config.json``, ``adapter_model.safetensors``; rank 4 on the attention and MLP
  projections);
- ``DIR/tvs.safetensors`` (dense, fine-tuned minus pre-trained) and ``DIR/tvs_lora.safetensors``
  (the LoRA adapters, ``TaskVectors.from_peft``: never densified).

It prints the training commands to try next.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, List

import torch

from atlas_kernels._io import atomic_write_text

TASKS = ("count", "spell")
CONFIG = dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True, rms_norm_eps=1e-5)
SEQ_LEN = 32
LORA_TARGETS = ("q_proj", "v_proj", "o_proj", "gate_proj", "down_proj")
LORA_R, LORA_ALPHA = 4, 8
_WORDS = ("cat", "dog", "sun", "tree", "bird", "fish", "road", "lamp", "rain", "milk", "door", "ship", "star",
          "moon", "leaf", "rock", "wind", "snow", "fire", "gold")


def task_lines(task: str, n: int, seed: int) -> List[str]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        if task == "count":
            a = int(torch.randint(0, 90, (), generator=g))
            k = int(torch.randint(4, 7, (), generator=g))
            out.append(" ".join(str(a + i) for i in range(k)))
        elif task == "spell":
            w = _WORDS[int(torch.randint(0, len(_WORDS), (), generator=g))]
            out.append(f"{w}: {'-'.join(w)}")
        else:  # pragma: no cover
            raise ValueError(task)
    return out


def write_texts(data_dir, train_n: int = 48, val_n: int = 16, seed: int = 0) -> Dict[str, Dict[str, Path]]:
    out = {}
    for k, t in enumerate(TASKS):
        d = Path(data_dir) / t
        d.mkdir(parents=True, exist_ok=True)
        out[t] = {}
        for split, n, s in (("train", train_n, 2 * k), ("val", val_n, 2 * k + 1)):
            p = d / f"{split}.txt"
            atomic_write_text(p, "\n".join(task_lines(t, n, seed * 1000 + s)) + "\n")
            out[t][split] = p
    return out


def _batches(lines: List[str], batch: int, g: torch.Generator):
    from . import data as D

    ds = D.TextDataset([D.ByteTokenizer()(t)[:SEQ_LEN] for t in lines], SEQ_LEN)
    while True:
        idx = torch.randint(len(ds), (batch,), generator=g).tolist()
        items = [ds[i] for i in idx]
        yield torch.stack([a for a, _ in items]), torch.tensor([b for _, b in items])


def _train(model, params, lines, steps: int, lr: float, seed: int, loss_fn=None) -> None:
    from .objectives import next_token_losses

    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    it = _batches(lines, 16, g)
    model.train()
    for _ in range(steps):
        ids, lengths = next(it)
        logits = (loss_fn or (lambda x: model(input_ids=x, use_cache=False).logits))(ids)
        loss = next_token_losses(logits, ids, lengths).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def train_lora(model, lines, *, steps: int, lr: float, seed: int):
    """LoRA factors ``{module path: (A [r, in], B [out, r])}`` (PEFT's initialisation: A random,
    B zero; PEFT's scaling ``lora_alpha / r``) trained on ``lines`` with the base model frozen,
    as PEFT trains them, in plain PyTorch."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    scaling = LORA_ALPHA / LORA_R
    factors = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in LORA_TARGETS:
            a = (torch.randn(LORA_R, m.in_features, generator=g) / m.in_features ** 0.5).requires_grad_()
            b = torch.zeros(m.out_features, LORA_R, requires_grad=True)
            factors[name] = (a, b)
    for p in model.parameters():
        p.requires_grad_(False)
    handles = []
    for name, (a, b) in factors.items():
        mod = model.get_submodule(name)
        handles.append(mod.register_forward_hook(
            lambda m, inp, out, a=a, b=b: out + scaling * F.linear(F.linear(inp[0], a), b)))
    try:
        _train(model, [t for ab in factors.values() for t in ab], lines, steps, lr, seed)
    finally:
        for h in handles:
            h.remove()
    return {k: (a.detach(), b.detach()) for k, (a, b) in factors.items()}


def make_demo(directory, *, seed: int = 0, pretrain_steps: int = 60, finetune_steps: int = 40,
              lora_steps: int = 40) -> Dict[str, object]:
    """Write the whole toy LM setup into ``directory``; returns the paths."""
    import time

    import transformers

    t0 = time.perf_counter()

    def stage(what):
        print(f"[toy_lm {time.perf_counter() - t0:5.0f} s] {what}", file=sys.stderr, flush=True)

    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    try:
        return _make_demo(Path(directory), seed, pretrain_steps, finetune_steps, lora_steps, stage)
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()


def _make_demo(d: Path, seed, pretrain_steps, finetune_steps, lora_steps, stage):
    import transformers

    import atlas_kernels as ak

    d.mkdir(parents=True, exist_ok=True)
    stage(f"writing the text data into {d / 'data'}")
    data = write_texts(d / "data", seed=seed)
    texts = {t: Path(data[t]["train"]).read_text(encoding="utf-8").splitlines() for t in TASKS}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        base = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG))
    stage(f"pre-training a tiny Llama on both tasks ({pretrain_steps} steps)")
    mixed = [x for t in TASKS for x in texts[t]]
    _train(base, list(base.parameters()), mixed, pretrain_steps, 3e-3, seed)
    base.save_pretrained(str(d / "base"), safe_serialization=True)
    ft, lora = [], []
    for k, t in enumerate(TASKS):
        stage(f"fine-tuning on {t!r} ({finetune_steps} steps) and training a LoRA adapter ({lora_steps} steps)")
        m = transformers.LlamaForCausalLM.from_pretrained(str(d / "base"), local_files_only=True)
        _train(m, list(m.parameters()), texts[t], finetune_steps, 2e-3, seed + 1 + k)
        m.save_pretrained(str(d / f"finetuned_{t}"), safe_serialization=True)
        ft.append(d / f"finetuned_{t}")
        m = transformers.LlamaForCausalLM.from_pretrained(str(d / "base"), local_files_only=True)
        factors = train_lora(m, texts[t], steps=lora_steps, lr=1e-2, seed=seed + 11 + k)
        ak.write_peft_adapter(d / f"lora_{t}", {f"{p}.weight": ab for p, ab in factors.items()},
                              r=LORA_R, lora_alpha=LORA_ALPHA, target_modules=list(LORA_TARGETS))
        lora.append(d / f"lora_{t}")
    tvs = ak.TaskVectors.from_checkpoints(str(d / "base" / "model.safetensors"),
                                          [str(p / "model.safetensors") for p in ft], names=list(TASKS))
    tvs.save(str(d / "tvs.safetensors"))
    ak.TaskVectors.from_peft([str(p) for p in lora], names=list(TASKS)).save(str(d / "tvs_lora.safetensors"))
    stage("done")
    return {"dir": d, "base": d / "base", "data": data, "finetuned": ft, "lora": lora,
            "task_vectors": d / "tvs.safetensors", "task_vectors_lora": d / "tvs_lora.safetensors"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m atlas_kernels.train.toy_lm",
                                description="Write a tiny offline causal-LM aTLAS setup (a Llama folder, text data, "
                                "full fine-tunes, PEFT LoRA adapters, task vectors) into DIR.")
    p.add_argument("dir")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    r = make_demo(a.dir, seed=a.seed)
    d = r["dir"]
    print(f"wrote {d}: base/, data/count, data/spell, finetuned_*/, lora_*/, tvs.safetensors, tvs_lora.safetensors")
    print("next:\n  python -m atlas_kernels.train --objective lm "
          f"--hf-model {d}/base --task-vectors {d}/tvs_lora.safetensors "
          f"--train {d}/data/count/train.txt --val {d}/data/count/val.txt --seq-len {SEQ_LEN} "
          f"--epochs 4 --batch-size 8 --lr 0.05 --out runs/lm")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
