"""The run's configuration (:class:`TrainConfig`) and the checks made before anything loads."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

OBJECTIVES = ("fewshot", "tta", "negation", "addition", "lm")
TTA_LOSSES = ("pseudo", "entropy")

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
PARTITION_MODES = ("contiguous", "hash")
SELECTS = ("auto", "best", "last")


class ConfigError(ValueError):
    """A command line or configuration that cannot run; raised before any training."""


@dataclass
class TrainConfig:
    """Everything a run needs. Field names match the command-line options (``--batch-size`` ->
    ``batch_size``)."""

    task_vectors: str
    out: str
    objective: str = "fewshot"
    train: List[str] = field(default_factory=list)
    val: List[str] = field(default_factory=list)
    control_train: Optional[str] = None
    control_val: Optional[str] = None
    names: Optional[List[str]] = None
    classnames: Optional[List[str]] = None
    model: Optional[str] = None
    model_config: Optional[str] = None
    hf_model: Optional[str] = None  # --objective lm: a Hugging Face causal LM folder (config.json, weights)
    seq_len: int = 128
    weights: Optional[str] = None
    head: Optional[List[str]] = None
    templates: str = "openai"
    shots: Optional[int] = None
    augment: bool = False
    tta_loss: str = "pseudo"
    confidence: float = 0.95
    control_threshold: float = 0.95
    control_weight: float = 1.0
    epochs: int = 10
    batch_size: int = 32
    eval_batch_size: Optional[int] = None
    accum_steps: int = 1
    lr: float = 1e-2
    weight_decay: float = 0.0
    warmup_steps: int = 0
    clip_grad: float = 1.0
    precision: str = "auto"
    partitions: int = 1
    partition_mode: str = "contiguous"
    backend: str = "auto"
    cuda_graph: str = "auto"
    storage: Optional[str] = None  # re-store the task vectors (e.g. int8) after loading; None: as in the file
    linearised: bool = False
    blocks: Optional[List[str]] = None
    select: str = "auto"
    seed: int = 0
    device: str = "auto"
    workers: int = 2
    resume: Optional[str] = None
    save_every: int = 0
    stop_after_steps: Optional[int] = None
    log_every: int = 10
    export_merged: Optional[str] = None
    quiet: bool = False
    fsdp: bool = False  # under torchrun: each process holds 1/W of theta0 and of every task vector (ak.shard)


# fields that may differ between a run and its resumption (they do not change the result)
_NOT_FINGERPRINTED = {"out", "resume", "save_every", "stop_after_steps", "log_every",
                      "export_merged", "workers", "device", "eval_batch_size", "quiet", "backend", "cuda_graph",
                      "train", "val", "control_train", "control_val", "weights", "task_vectors",
                      "model_config", "hf_model", "fsdp"}


# ----------------------------------------------------------------------------------------------
# checks


def validate_config(cfg: TrainConfig) -> None:
    """Raise :class:`ConfigError` for an unusable configuration (no file is read here)."""
    def bad(msg):
        raise ConfigError(msg)

    if cfg.objective not in OBJECTIVES:
        bad(f"unknown objective {cfg.objective!r}; choose one of {', '.join(OBJECTIVES)}")
    if not cfg.task_vectors:
        bad("--task-vectors is required")
    if cfg.objective == "lm":
        _validate_lm(cfg, bad)
    elif cfg.hf_model:
        bad("--hf-model (a Hugging Face causal LM) is for --objective lm; the image objectives take an open_clip "
            "--model or --model-config")
    elif not cfg.model and not cfg.model_config:
        bad("give an open_clip model name with --model (or a config file with --model-config)")
    nt, nv = len(cfg.train), len(cfg.val)
    if cfg.objective in ("fewshot", "tta", "negation", "lm") and (nt != 1 or nv != 1):
        bad(f"objective {cfg.objective!r} takes one --train and one --val "
            f"{'text file' if cfg.objective == 'lm' else 'folder'} "
            f"(got {nt} and {nv})")
    if cfg.objective == "addition" and (nt < 1 or nv != nt):
        bad(f"objective 'addition' takes one --val folder per --train folder (got {nt} --train, "
            f"{nv} --val)")
    if cfg.objective == "negation":
        if not cfg.control_train or not cfg.control_val:
            bad("objective 'negation' needs --control-train and --control-val (the control set "
                "whose accuracy is held)")
    elif cfg.control_train or cfg.control_val:
        bad("--control-train/--control-val are for objective 'negation' only")
    n_tasks = nt + (1 if cfg.objective == "negation" else 0)
    if cfg.names is not None and len(cfg.names) != n_tasks:
        bad(f"--names has {len(cfg.names)} names for {n_tasks} dataset(s)")
    if cfg.names is not None and len(set(cfg.names)) != len(cfg.names):
        bad(f"--names must be distinct (got {cfg.names})")
    if cfg.head is not None and len(cfg.head) != n_tasks:
        bad(f"--head has {len(cfg.head)} files for {n_tasks} dataset(s) (one per dataset)")
    if cfg.classnames is not None and len(cfg.classnames) != n_tasks:
        bad(f"--classnames has {len(cfg.classnames)} files for {n_tasks} dataset(s)")
    for k in ("epochs", "batch_size", "accum_steps", "partitions", "log_every", "seq_len"):
        if int(getattr(cfg, k)) < 1:
            bad(f"--{k.replace('_', '-')} must be at least 1 (got {getattr(cfg, k)})")
    if cfg.eval_batch_size is not None and cfg.eval_batch_size < 1:
        bad("--eval-batch-size must be at least 1")
    for k in ("warmup_steps", "save_every", "workers"):
        if int(getattr(cfg, k)) < 0:
            bad(f"--{k.replace('_', '-')} must not be negative")
    if cfg.shots is not None and cfg.shots < 0:
        bad("--shots must not be negative")
    if cfg.shots and cfg.objective == "tta":
        bad("--shots is for labelled objectives; tta uses all of its unlabelled images")
    if cfg.stop_after_steps is not None and cfg.stop_after_steps < 1:
        bad("--stop-after-steps must be at least 1")
    for k in ("lr", "weight_decay", "clip_grad", "confidence", "control_threshold", "control_weight"):
        v = getattr(cfg, k)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or v in (float("inf"), float("-inf")):
            bad(f"--{k.replace('_', '-')} must be a finite number (got {v!r})")
    if not cfg.lr > 0:
        bad("--lr must be positive")
    if cfg.weight_decay < 0 or cfg.clip_grad < 0:
        bad("--weight-decay and --clip-grad must not be negative")
    if cfg.precision not in PRECISIONS:
        bad(f"unknown precision {cfg.precision!r}; choose one of {PRECISIONS}")
    if cfg.partition_mode not in PARTITION_MODES:
        bad(f"unknown partition mode {cfg.partition_mode!r}; choose one of {PARTITION_MODES}")
    if cfg.select not in SELECTS:
        bad(f"unknown --select {cfg.select!r}; choose one of {SELECTS}")
    if cfg.tta_loss not in TTA_LOSSES:
        bad(f"unknown --tta-loss {cfg.tta_loss!r}; choose one of {TTA_LOSSES}")
    if not 0.0 < cfg.confidence <= 1.0:
        bad("--confidence must be in (0, 1]")
    if not 0.0 <= cfg.control_threshold <= 1.0:
        bad("--control-threshold must be in [0, 1] (a fraction of the zero-shot accuracy)")


def _validate_lm(cfg: TrainConfig, bad) -> None:
    """--objective lm: a Hugging Face causal LM folder, and none of the image-only options."""
    if not cfg.hf_model:
        bad("objective 'lm' needs --hf-model DIR: a Hugging Face causal LM folder holding config.json (and "
            "model.safetensors with the pre-trained weights; a tokenizer, else UTF-8 bytes are the tokens)")
    image_only = {"model": "--model", "model_config": "--model-config", "head": "--head",
                  "classnames": "--classnames", "shots": "--shots", "weights": "--weights"}
    given = [flag for k, flag in image_only.items() if getattr(cfg, k)]
    if cfg.augment:
        given.append("--augment")
    if cfg.linearised:
        given.append("--linearised")
    if given:
        bad(f"objective 'lm' takes its model and weights from --hf-model; {', '.join(given)} "
            f"{'is' if len(given) == 1 else 'are'} for the image objectives")
