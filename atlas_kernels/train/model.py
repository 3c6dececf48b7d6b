"""open_clip model, weights, tokenizer and zero-shot classification heads; Hugging Face causal
LMs for ``--objective lm`` (:func:`build_hf_model`)."""
from __future__ import annotations

import difflib
import json
import logging
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F

Template = Union[str, Callable[[str], str]]


def _require_file(p: Path, what: str) -> None:
    """ValueError unless ``p`` is a readable regular file: saying what it is otherwise (missing, a
    folder, a named pipe, a device such as /dev/zero, a broken link), not only "does not exist"
    (reading a named pipe blocks until something writes to it)."""
    from ..checkpoints import check_file

    try:
        check_file(str(p), what)
    except FileNotFoundError as e:
        raise ValueError(str(e)) from None


def register_model_config(path) -> str:
    """Register an open_clip model config file (JSON with ``embed_dim``, ``vision_cfg``,
    ``text_cfg``) and return the model name it registers (the file's stem)."""
    import open_clip

    p = Path(path)
    _require_file(p, "model config file")
    try:
        cfg = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"model config file '{p}' is not valid JSON: {e}") from None
    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in cfg]
    if missing:
        raise ValueError(f"model config file '{p}' lacks {missing} (an open_clip model config "
                         "has embed_dim, vision_cfg and text_cfg)")
    _check_config_values(cfg, p)
    open_clip.add_model_config(p)
    return p.stem


# Integer fields of an open_clip config and the largest value a real model uses, with margin: a
# value past the bound would try to allocate an absurd model rather than fail cleanly.
_INT_FIELDS = {"embed_dim": 1 << 15, "width": 1 << 15, "layers": 1024, "heads": 1024, "head_width": 1 << 13,
               "patch_size": 1024, "image_size": 1 << 14, "context_length": 1 << 14, "vocab_size": 1 << 22}


def _check_config_values(cfg: dict, p: Path) -> None:
    """Types and ranges of the numeric fields open_clip builds from (a string width, a zero patch
    size or an absurd width would otherwise fail deep inside open_clip, or exhaust memory)."""
    def check(key, v, where):
        bound = _INT_FIELDS[key]
        vals = v if key == "image_size" and isinstance(v, (list, tuple)) else [v]
        for x in vals:
            if isinstance(x, bool) or not isinstance(x, int) or not 1 <= x <= bound:
                raise ValueError(f"model config file '{p}': {where}{key} must be an integer in [1, {bound}], "
                                 f"got {x!r}")

    if "embed_dim" in cfg:
        check("embed_dim", cfg["embed_dim"], "")
    for tower in ("vision_cfg", "text_cfg"):
        sub = cfg.get(tower)
        if not isinstance(sub, dict):
            raise ValueError(f"model config file '{p}': {tower} must be a JSON object, got {type(sub).__name__}")
        for key, v in sub.items():
            if key in _INT_FIELDS:
                check(key, v, f"{tower}.")
        if "mlp_ratio" in sub:
            v = sub["mlp_ratio"]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 64:
                raise ValueError(f"model config file '{p}': {tower}.mlp_ratio must be a number in (0, 64], got {v!r}")
    vis = cfg["vision_cfg"]
    ps, size = vis.get("patch_size"), vis.get("image_size")
    if isinstance(ps, int) and isinstance(size, int) and size % ps:
        raise ValueError(f"model config file '{p}': vision_cfg.image_size {size} is not a multiple of "
                         f"patch_size {ps}")


def _check_model_name(name: str) -> None:
    import open_clip

    if name.startswith(("hf-hub:", "local-dir:")):
        return
    known = open_clip.list_models()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=5)
        raise ValueError(f"unknown open_clip model {name!r}"
                         + (f"; did you mean {', '.join(close)}?" if close else "")
                         + " (or give a config file with --model-config)")


def load_state_dict_file(path) -> Dict[str, torch.Tensor]:
    """A state dict (safetensors, or a torch file: a state dict or a pickled whole module, read
    without running code) via :func:`atlas_kernels.load_state_dict_file`, with a DataParallel
    ``module.`` prefix removed."""
    from atlas_kernels import load_state_dict_file as _load

    p = Path(path)
    _require_file(p, "weights file")
    sd = _load(str(p))
    for wrapper in ("module.", "model."):  # DataParallel; the papers' ImageEncoder (model.visual.*)
        if sd and all(k.startswith(wrapper) for k in sd):
            sd = {k[len(wrapper):]: v for k, v in sd.items()}
    return sd


def build_model(name: str, weights: Optional[str] = None, *, seed: int = 0, text_tower: bool = True):
    """An open_clip model on the CPU in float32: random weights (seeded) or ``weights``.
    ``text_tower=False`` (heads come from files) accepts weights without the text tower, as the
    published ImageEncoder checkpoints are; its blocks then stay random and unused."""
    import open_clip

    _check_model_name(name)
    level = logging.root.manager.disable
    logging.disable(logging.WARNING)  # open_clip warns "initialized randomly" on the root logger
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = open_clip.create_model(name, pretrained=None)
    except (TypeError, ValueError, ZeroDivisionError, RuntimeError, AssertionError) as e:
        raise ValueError(f"open_clip could not build model {name!r} from its config: "
                         f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    finally:
        logging.disable(level)
    if weights:
        sd = load_state_dict_file(weights)
        shapes = model.state_dict()
        wrong = [(k, tuple(v.shape), tuple(shapes[k].shape)) for k, v in sd.items()
                 if k in shapes and tuple(v.shape) != tuple(shapes[k].shape)]
        if wrong:
            k, got, want = wrong[0]
            raise ValueError(f"weights '{weights}' do not fit open_clip model {name!r}: {len(wrong)} tensor(s) "
                             f"of another shape, e.g. {k!r} is {got} in the file, {want} in the model "
                             f"(weights of another model?)")
        missing, unexpected = model.load_state_dict(sd, strict=False)
        text = [k for k in missing if not k.startswith("visual.")]
        if text and not text_tower and len(text) == len(missing):
            missing = []
        elif text and len(text) == len(missing) and not unexpected:
            raise ValueError(f"weights '{weights}' have no text tower ({len(text)} keys missing, e.g. "
                             f"{text[:2]}), so zero-shot heads cannot be built: give --head files")
        # buffers such as attn_mask are not persistent; anything else is a real mismatch
        if missing or unexpected:
            raise ValueError(
                f"weights '{weights}' do not fit open_clip model {name!r}: "
                f"{len(missing)} missing keys (e.g. {missing[:3]}), "
                f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})")
    model.eval()
    return model


def get_tokenizer(name: str):
    import open_clip

    return open_clip.get_tokenizer(name)


def get_templates(spec: str) -> List[Template]:
    """``'openai'`` (open_clip's 80 ImageNet templates), ``'simple'`` (open_clip's short set),
    ``'photo'`` (``'a photo of a {}.'``) or a text file with one template per line holding ``{}``."""
    from open_clip import zero_shot_metadata as z

    if spec == "openai":
        return list(z.OPENAI_IMAGENET_TEMPLATES)
    if spec == "simple":
        return list(z.SIMPLE_IMAGENET_TEMPLATES)
    if spec == "photo":
        return ["a photo of a {}."]
    p = Path(spec)
    if not p.exists() and not p.is_symlink():
        raise ValueError(f"--templates: {spec!r} is neither 'openai', 'simple', 'photo' nor a file")
    _require_file(p, "--templates file")
    lines = [ln.strip() for ln in p.read_text().splitlines() if ln.strip()]
    bad = [ln for ln in lines if "{}" not in ln]
    if not lines or bad:
        raise ValueError(f"templates file '{p}': every line must hold '{{}}' for the class name"
                         + (f" (not: {bad[0]!r})" if bad else " (the file is empty)"))
    return lines


def read_classnames(path, classes: Sequence[str]) -> List[str]:
    """Class names for the sorted class folders ``classes``: a JSON object folder -> name, a JSON
    list, or a text file with one name per line (both in folder order)."""
    p = Path(path)
    _require_file(p, "class-names file")
    text = p.read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if isinstance(data, dict):
        missing = [c for c in classes if c not in data]
        if missing:
            raise ValueError(f"class-names file '{p}' has no name for folder(s) {missing[:5]}")
        return [str(data[c]) for c in classes]
    if len(data) != len(classes):
        raise ValueError(f"class-names file '{p}' has {len(data)} names for {len(classes)} "
                         "class folders")
    return [str(x) for x in data]


@torch.no_grad()
def zero_shot_head(model, tokenizer, classnames: Sequence[str], templates: Sequence[Template],
                   device, batch_size: int = 256) -> torch.Tensor:
    """Zero-shot classifier ``[D, C]`` (float32): per class, the normalised mean of the normalised
    text embeddings of its prompts."""
    texts = [t.format(c) if isinstance(t, str) else t(c) for c in classnames for t in templates]
    embs = []
    for i in range(0, len(texts), batch_size):
        tok = tokenizer(texts[i:i + batch_size]).to(device)
        embs.append(F.normalize(model.encode_text(tok).float(), dim=-1))
    e = torch.cat(embs).reshape(len(classnames), len(templates), -1).mean(1)
    return F.normalize(e, dim=-1).T.contiguous()


def logit_scale(model) -> float:
    """CLIP's temperature, ``exp(logit_scale)`` capped at 100 as in training."""
    return float(model.logit_scale.detach().float().exp().clamp(max=100.0))


def load_task_heads(paths: Sequence[str], tasks, model, device) -> list:
    """Classification heads from files (``--head``, one per dataset), in place of zero-shot heads
    built from the text tower (the published ImageEncoder checkpoints have theirs deleted). Each is
    an :class:`atlas_kernels.Head` (weight ``[classes, features]``, bias, normalize), read without
    running code; its class ``i`` is the dataset's class folder ``i`` in sorted order."""
    from atlas_kernels import load_head

    if len(paths) != len(tasks):
        raise ValueError(f"--head takes one file per dataset: {len(paths)} for {len(tasks)} dataset(s)")
    dim = getattr(model.visual, "output_dim", None)
    heads = []
    for p, t in zip(paths, tasks):
        try:
            h = load_head(p)
        except FileNotFoundError as e:
            raise ValueError(str(e)) from None
        if h.weight.shape[0] != len(t.classnames):
            raise ValueError(f"--head {p!r} has {h.weight.shape[0]} classes; dataset {t.name!r} has "
                             f"{len(t.classnames)} class folders")
        if dim is not None and h.weight.shape[1] != dim:
            raise ValueError(f"--head {p!r} takes {h.weight.shape[1]} features; the image tower gives {dim}")
        heads.append(type(h)(h.weight.to(device), h.bias.to(device), h.normalize))
    return heads


def head_logits(head, feats: torch.Tensor, scale: float) -> torch.Tensor:
    """Logits (float32) of image features under a head: a zero-shot head ``[D, C]`` gives
    ``scale * normalize(feats) @ head``; a file head gives ``normalize?(feats) @ W^T + b`` (its
    weight already carries the temperature)."""
    feats = feats.float()
    if isinstance(head, torch.Tensor):
        return scale * F.normalize(feats, dim=-1) @ head
    x = F.normalize(feats, dim=-1) if head.normalize else feats
    return x @ head.weight.T + head.bias


_HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
_HF_PICKLES = ("pytorch_model.bin", "pytorch_model.bin.index.json")


def build_hf_model(path, *, seed: int = 0):
    """A Hugging Face causal LM (Llama, Qwen, Mistral, ... any ``AutoModelForCausalLM`` family the
    installed transformers knows) from a local folder, offline: ``config.json``, and
    ``model.safetensors`` (or a sharded ``model.safetensors.index.json``) for the pre-trained
    weights theta0; without weights, random weights seeded by ``seed``. Pickled weights
    (``pytorch_model.bin``) are refused (loading them runs code from the file), and so is a config
    that needs code from the folder (``trust_remote_code``). In eval mode."""
    d = Path(path)
    if not d.is_dir():
        raise ValueError(f"--hf-model '{d}' is not a folder (a Hugging Face model folder holding config.json)")
    _require_file(d / "config.json", "Hugging Face model config (config.json)")
    has_weights = any((d / f).is_file() for f in _HF_WEIGHTS)
    if not has_weights and any((d / f).is_file() for f in _HF_PICKLES):
        raise ValueError(f"--hf-model '{d}' holds pickled weights (pytorch_model.bin), which load by running code "
                         f"from the file: save them as safetensors (model.save_pretrained(dir, "
                         f"safe_serialization=True))")
    import transformers

    level = logging.root.manager.disable
    logging.disable(logging.WARNING)
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()  # "Loading weights" on stderr, for a tiny model too
    try:
        cfg = transformers.AutoConfig.from_pretrained(str(d), local_files_only=True)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if has_weights:
                model = transformers.AutoModelForCausalLM.from_pretrained(str(d), local_files_only=True,
                                                                          use_safetensors=True)
            else:
                model = transformers.AutoModelForCausalLM.from_config(cfg)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"--hf-model '{d}': transformers could not build a causal LM from it ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from None
    finally:
        logging.disable(level)
        if bars:
            transformers.utils.logging.enable_progress_bar()
    model.eval()
    return model
