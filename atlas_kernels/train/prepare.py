"""Everything a training run builds before its first step: the datasets (scanned and checked),
the task vectors, the model and its patched image tower (or, for ``--objective lm``, the patched
Hugging Face causal LM), the heads, the objective and the data sets, gathered in one
:class:`Setup`; and the forward pass the loop and the evaluation share. Every input error is
raised here, before the first training step.

``--fsdp``: every process reads only its rows of each task-vector slab from the file
(:meth:`atlas_kernels.TaskVectors.load_shard`), so the whole set is never in one process's memory,
and the patched module is sharded (:func:`atlas_kernels.shard`)."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from . import data as D
from .config import ConfigError, TrainConfig, validate_config
from .data import TaskData
from .distributed import Dist, init_distributed, resolve_device, resolve_precision
from .faults import check_finite_tensors
from .model import (
    build_model,
    get_templates,
    get_tokenizer,
    head_logits,
    load_task_heads,
    logit_scale,
    read_classnames,
    register_model_config,
    zero_shot_head,
)
from .objectives import Objective, make_objective
from .state import check_resume, fingerprint, load_checkpoint


def _default_name(path: str) -> str:
    p = Path(path).resolve()
    if p.name.lower() in {"train", "val", "valid", "validation", "test", "images", "unlabelled",
                          "unlabeled"} and p.parent.name:
        return p.parent.name
    return p.name or "data"


def load_tasks(cfg: TrainConfig) -> List[TaskData]:
    """Scan and check every data folder (missing, empty, mismatched classes), apply k-shot
    sampling, and name the datasets. Raises :class:`~atlas_kernels.train.data.DataError`."""
    pairs = list(zip(cfg.train, cfg.val))
    if cfg.objective == "negation":
        pairs.append((cfg.control_train, cfg.control_val))
    roles = (["target", "control"] if cfg.objective == "negation" else
             ["unlabelled" if cfg.objective == "tta" else "train"] * len(pairs))
    tasks = []
    used = set()
    for i, ((tr, va), role) in enumerate(zip(pairs, roles)):
        vrole = "control validation" if role == "control" else "validation"
        if cfg.objective == "tta":
            tr_classes, tr_samples = D.scan_unlabelled_folder(tr, f"{role} (--train)")
            va_classes, va_samples = D.scan_image_folder(va, f"{vrole} (--val)")
            if tr_classes is not None:
                D.check_same_classes(tr_classes, va_classes, tr, va)
            tr_samples = [(p, -1) for p, _ in tr_samples]  # never look at labels
        else:
            flag = "--control-train" if role == "control" else "--train"
            tr_classes, tr_samples = D.scan_image_folder(tr, f"{role} ({flag})")
            va_classes, va_samples = D.scan_image_folder(
                va, f"{vrole} ({'--control-val' if role == 'control' else '--val'})")
            D.check_same_classes(tr_classes, va_classes, tr, va)
            tr_samples = D.k_shot(tr_samples, cfg.shots, cfg.seed + i)
        classes = va_classes
        names = (read_classnames(cfg.classnames[i], classes) if cfg.classnames
                 else D.classnames_from_folders(classes))
        name = cfg.names[i] if cfg.names else _default_name(tr)
        base, k = name, 1
        while name in used:
            k += 1
            name = f"{base}_{k}"
        used.add(name)
        tasks.append(TaskData(name, classes, names, tr_samples, va_samples, str(tr), str(va)))
    return tasks


class Logger:
    """Progress lines on stderr, from the main process only (none with --quiet)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def __call__(self, msg: str) -> None:
        if self.enabled:
            print(f"[atlas_kernels.train] {msg}", file=sys.stderr, flush=True)


@dataclass
class Setup:
    """Everything built before the first step (see :func:`setup`)."""
    cfg: TrainConfig
    dist: Dist
    device: torch.device
    precision: str
    model: Any
    coefs: Dict[str, torch.nn.Parameter]
    tvs: Any
    tasks: List[TaskData]
    heads: List[torch.Tensor]
    scale: float
    objective: Objective
    train_sets: List[D.ImageDataset]
    eval_sets: List[D.ImageDataset]
    fingerprint: Dict[str, Any]
    ckpt: Optional[Dict[str, Any]]
    log: Logger
    tower: Any = None  # the patched module: model.visual (open_clip), or the causal LM itself
    sharded: bool = False  # --fsdp: forwards are collectives (every process runs as many)


def setup(cfg: TrainConfig) -> Setup:
    """Check inputs, build the model and heads, patch the image tower. Every input error is
    raised here, before the first training step."""
    import atlas_kernels as ak

    validate_config(cfg)
    if Path(cfg.out).exists() and not Path(cfg.out).is_dir():
        raise ConfigError(f"--out '{cfg.out}' exists and is not a folder; give a new or existing output folder")
    d = init_distributed("cuda" if (cfg.device == "auto" and torch.cuda.is_available())
                         or cfg.device.startswith("cuda") else "cpu")
    log = Logger(d.main and not cfg.quiet)
    device = resolve_device(cfg.device, d)
    precision = resolve_precision(cfg.precision, device)
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("--precision bf16 is not supported by this GPU; use fp16")
    if cfg.batch_size % d.world:
        raise ConfigError(f"--batch-size {cfg.batch_size} (the global batch) is not divisible by "
                          f"the {d.world} processes")
    if cfg.fsdp and d.world == 1:
        raise ConfigError("--fsdp shards over the processes of torchrun (torchrun --nproc-per-node W -m "
                          "atlas_kernels.train --fsdp ...); this is one process: drop --fsdp")
    if cfg.fsdp and cfg.storage is not None:
        raise ConfigError("--storage re-stores the task vectors after loading, which --fsdp cannot do on the "
                          "shards (a 1-D block's int8/fp8 scale spans every process's rows): convert the file once "
                          "(atlas_kernels.TaskVectors.load(path).to_storage(...).save(new)) and pass the new file")
    if cfg.fsdp and cfg.linearised:
        raise ConfigError("--fsdp does not shard the linearised model (forward-mode tangents are not sharded); "
                          "drop --fsdp or --linearised")
    if cfg.objective == "lm":
        return _setup_lm(cfg, d, log, device, precision)

    tasks = load_tasks(cfg)
    ckpt = load_checkpoint(cfg.resume) if cfg.resume else None
    model_name = cfg.model
    if cfg.model_config:
        registered = register_model_config(cfg.model_config)
        model_name = model_name or registered
    get_templates(cfg.templates)  # fail early on a bad templates spec

    p = Path(cfg.task_vectors)
    if not p.exists() and not p.is_symlink():
        raise ConfigError(f"task-vector file '{p}' does not exist")
    tvs = _load_task_vectors(p, cfg)
    if cfg.storage is not None and cfg.storage != tvs.storage:
        tvs = tvs.to_storage(cfg.storage)
    fp = fingerprint(cfg, tasks, tvs)
    fp["model"] = model_name
    if ckpt is not None:
        check_resume(ckpt, fp, cfg.resume)

    objective = make_objective(cfg.objective, n_tasks=len(tasks), augment=cfg.augment,
                               tta_loss=cfg.tta_loss, confidence=cfg.confidence,
                               control_threshold=cfg.control_threshold,
                               control_weight=cfg.control_weight)

    model = build_model(model_name, cfg.weights, seed=cfg.seed, text_tower=not cfg.head)
    if cfg.weights:
        try:
            check_finite_tensors(model.state_dict(), f"--weights '{cfg.weights}'")
        except ValueError as e:
            raise ConfigError(str(e)) from None
    model.requires_grad_(False)
    model.to(device)
    _check_tv_names(p, tvs, model)
    tvs = tvs.to(device)
    blocks = cfg.blocks
    if blocks is not None and len(blocks) == 1 and blocks[0] in ("all", "weights"):
        blocks = blocks[0]
    model.visual = ak.patch(model.visual, tvs, partitions=cfg.partitions,
                            partition_mode=cfg.partition_mode, seed=cfg.seed,
                            backend=cfg.backend, blocks=blocks, linearised=cfg.linearised)
    _log_shards(model.visual, tvs, cfg, log)
    coefs = ak.coefficients(model.visual)
    if not coefs:
        raise ConfigError("patching adapted no block: nothing to train (check --blocks)")
    for prm in model.parameters():
        prm.requires_grad_(False)
    for prm in coefs.values():
        prm.requires_grad_(True)
    model.eval()

    tokenizer = get_tokenizer(model_name)
    templates = get_templates(cfg.templates)
    heads = (load_task_heads(cfg.head, tasks, model, device) if cfg.head else
             [zero_shot_head(model, tokenizer, t.classnames, templates, device) for t in tasks])
    scale = logit_scale(model)

    pre = D.model_preprocess(model)
    train_sets = [D.ImageDataset(t.train, [D.train_transform(pre, v) for v in objective.views(i)])
                  for i, t in enumerate(tasks)]
    eval_sets = [D.ImageDataset(t.val, [pre.eval]) for t in tasks]
    if ckpt is not None:
        names = list(coefs)
        if list(ckpt["coefficients"]) != names or any(
                ckpt["coefficients"][k].shape != coefs[k].shape for k in names):
            raise ConfigError(f"resume file '{cfg.resume}' holds coefficients of other shapes")
    return Setup(cfg, d, device, precision, model, coefs, tvs, tasks, heads, scale, objective,
                 train_sets, eval_sets, fp, ckpt, log, tower=model.visual, sharded=cfg.fsdp)


def _load_task_vectors(p: Path, cfg: TrainConfig):
    """The task-vector file: whole, or (``--fsdp``) this process's rows of every block only."""
    import atlas_kernels as ak

    if cfg.fsdp:
        return ak.TaskVectors.load_shard(str(p))
    return ak.TaskVectors.load(str(p))  # says what a path that is not a regular file is


def _log_shards(module, tvs, cfg: TrainConfig, log: Logger) -> None:
    """``--fsdp``: patching with the loaded rows sharded the module; say what this process holds."""
    if not cfg.fsdp:
        return
    from ..plan import plan_of
    from ..sharding import local_bytes

    plan = plan_of(module)
    held = local_bytes(module)
    log(f"{plan.summary()}: this process holds "
        f"{held['slabs'] + held['scales'] + held['lora_a'] + held['lora_b']:,} bytes of the task vectors' "
        f"{tvs.whole_nbytes:,} and {held['theta0']:,} bytes of theta0's adapted blocks")


def _setup_lm(cfg: TrainConfig, d: Dist, log: Logger, device: torch.device, precision: str) -> Setup:
    """:func:`setup` for ``--objective lm``: a Hugging Face causal LM from ``--hf-model``, patched as
    a whole (task-vector blocks are its parameter names), one text file to train on and one to
    validate on (one example per line)."""
    import atlas_kernels as ak

    from .model import build_hf_model
    from .objectives import LanguageModel
    from .state import file_digest

    model = build_hf_model(cfg.hf_model, seed=cfg.seed)
    vocab = int(getattr(model.config, "vocab_size", 0) or model.get_input_embeddings().num_embeddings)
    tok = D.load_tokenizer(cfg.hf_model, vocab)
    train = D.read_text_examples(cfg.train[0], "train (--train)", tok, cfg.seq_len)
    val = D.read_text_examples(cfg.val[0], "validation (--val)", tok, cfg.seq_len)
    name = cfg.names[0] if cfg.names else _default_name(str(Path(cfg.train[0]).with_suffix("")))

    def samples(examples):  # what the run's fingerprint hashes: the token ids, not the file's path
        import hashlib

        return [(f"{i}:{hashlib.sha1(str(e).encode()).hexdigest()[:12]}", -1) for i, e in enumerate(examples)]

    tasks = [TaskData(name, [], [], samples(train), samples(val), str(cfg.train[0]), str(cfg.val[0]))]
    ckpt = load_checkpoint(cfg.resume) if cfg.resume else None
    p = Path(cfg.task_vectors)
    if not p.exists() and not p.is_symlink():
        raise ConfigError(f"task-vector file '{p}' does not exist")
    tvs = _load_task_vectors(p, cfg)
    if cfg.storage is not None and cfg.storage != tvs.storage:
        tvs = tvs.to_storage(cfg.storage)
    fp = fingerprint(cfg, tasks, tvs)
    folder = Path(cfg.hf_model)
    fp["model"] = {f: file_digest(folder / f) for f in ("config.json", "model.safetensors")
                   if (folder / f).is_file()}
    fp["tokenizer"] = repr(tok)
    if ckpt is not None:
        check_resume(ckpt, fp, cfg.resume)
    model.requires_grad_(False)
    model.to(device)
    tvs = tvs.to(device)
    blocks = cfg.blocks
    if blocks is not None and len(blocks) == 1 and blocks[0] in ("all", "weights"):
        blocks = blocks[0]
    ak.patch(model, tvs, partitions=cfg.partitions, partition_mode=cfg.partition_mode, seed=cfg.seed,
             backend=cfg.backend, blocks=blocks)
    _log_shards(model, tvs, cfg, log)
    coefs = ak.coefficients(model)
    if not coefs:
        raise ConfigError("patching adapted no block: nothing to train (check --blocks)")
    for prm in coefs.values():
        prm.requires_grad_(True)
    model.eval()
    if ckpt is not None:
        names = list(coefs)
        if list(ckpt["coefficients"]) != names or any(
                ckpt["coefficients"][k].shape != coefs[k].shape for k in names):
            raise ConfigError(f"resume file '{cfg.resume}' holds coefficients of other shapes")
    log(f"language model {type(model).__name__} from {cfg.hf_model}: {len(train)} training and {len(val)} validation "
        f"examples of up to {cfg.seq_len} tokens ({tok!r})")
    return Setup(cfg, d, device, precision, model, coefs, tvs, tasks, [], 1.0, LanguageModel(),
                 [D.TextDataset(train, cfg.seq_len)], [D.TextDataset(val, cfg.seq_len)], fp, ckpt, log,
                 tower=model, sharded=cfg.fsdp)


def _check_tv_names(path: Path, tvs, model) -> None:
    """ConfigError, in the command line's words, when the task-vector file names blocks that
    model.visual (the image tower this command adapts) lacks: which prefix the file was built
    with, and the command that rebuilds it (patch()'s own error speaks of the Python API)."""
    from .._patch_guards import tv_prefix_hint

    names = {n for n, _ in model.visual.named_parameters(remove_duplicate=False)}
    names |= {n for n, _ in model.visual.named_buffers()}
    missing = [b for b in tvs.blocks if b not in names]
    if not missing:
        return
    rebuild = "python -m atlas_kernels.task_vectors build --pretrained P --finetuned F ... --prefix"
    found = tv_prefix_hint(missing, names)
    dotted = [b for b in missing if b.startswith(".") and b[1:] in names]
    if found:
        pre, fits, whole = found
        why = (f"{len(fits)} of them are image-tower names behind a {pre!r} prefix"
               + (" and the others are outside the image tower (whole-model task vectors)" if whole else ""))
        fix = f"rebuild it with: {rebuild} {pre}"
    elif dotted:
        why = f"names such as {dotted[0]!r} start with a dot (built with a prefix lacking its trailing dot)"
        fix = f"rebuild it with: {rebuild} visual. (with the dot)"
    else:
        why = f"model.visual's names look like {sorted(names)[:3]}"
        fix = "build it from checkpoints of this --model, with --prefix visual. (or import ... --prefix auto)"
    raise ConfigError(f"task-vector file '{path}' names {len(missing)} block(s) that the image tower (model.visual, "
                      f"the part this command adapts) lacks, e.g. {missing[:3]}: {why}; {fix}")


def make_forward(s: Setup):
    """``forward(images, task) -> logits`` (float32): the patched image tower under autocast,
    normalised features against the task's head (zero-shot, or a --head file). For
    ``--objective lm``: ``forward(token ids, task) -> next-token logits [B, L, V]`` (float32)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(s.precision)
    if s.objective.name == "lm":
        def forward_lm(ids: torch.Tensor, task: int) -> torch.Tensor:
            with torch.autocast(s.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                logits = s.model(input_ids=ids, use_cache=False).logits
            return logits.float()
        return forward_lm

    def forward(images: torch.Tensor, task: int) -> torch.Tensor:
        with torch.autocast(s.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            feats = s.model.visual(images)
        return head_logits(s.heads[task], feats, s.scale)
    return forward
