"""``python -m atlas_kernels.train``: learn aTLAS coefficients for an open_clip model or a Hugging Face causal LM."""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

# Only the config here: torch and the training loop are imported after the arguments are parsed,
# so that --help answers at once.
from .config import OBJECTIVES, PARTITION_MODES, PRECISIONS, SELECTS, TTA_LOSSES, TrainConfig

PROG = "python -m atlas_kernels.train"

EPILOG = """\
objectives and their data:
  fewshot   --train DIR --val DIR            cross-entropy against the zero-shot head (--shots K)
  tta       --train DIR --val DIR            unsupervised on --train (labels never read; a flat
                                             folder of images is fine); --val reports accuracy
  negation  --train T --val TV --control-train C --control-val CV
                                             lower accuracy on T, keep C within
                                             --control-threshold of its zero-shot accuracy
  addition  --train A B ... --val AV BV ...  one set of coefficients for all datasets
  lm        --hf-model DIR --train T.txt --val V.txt
                                             next-token cross-entropy of a causal LM (Llama, Qwen,
                                             Mistral, ...): one example per line of UTF-8 text

Data folders use the ImageFolder layout DIR/<class>/<image>; class names for the prompts are the
folder names with '_' as spaces (or --classnames). For lm, each non-empty line of a text file
is one example, tokenised by the tokenizer in --hf-model (else its UTF-8 bytes are the token ids)
and cut to --seq-len tokens. Under torchrun the same command runs data-parallel (--batch-size is
the global batch); add --fsdp to hold 1/W of theta0 and of every task vector per process.

outputs in --out: coefficients.safetensors, metrics.json, coefficients.png, checkpoint.pt
"""


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig(task_vectors="", out="")
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("``: ", 1)[-1],
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model and task vectors")
    g.add_argument("--model", default=None,
                   help="open_clip model name, e.g. ViT-B-32 (default: the --model-config name)")
    g.add_argument("--model-config", default=None, metavar="JSON",
                   help="an open_clip model config file to register (its stem is the model name)")
    g.add_argument("--weights", default=None, metavar="FILE",
                   help="pre-trained weights: a state dict (safetensors or a torch file), or a pickled whole "
                   "module as the task-vector papers released them (torch files are read without running "
                   "code); default: random weights (seeded by --seed)")
    g.add_argument("--hf-model", default=None, metavar="DIR",
                   help="objective lm: a Hugging Face causal LM folder (config.json; model.safetensors = theta0, "
                   "else random weights seeded by --seed; a tokenizer, else UTF-8 bytes as token ids). Task-vector "
                   "block names are the model's parameter names (model.layers.0.self_attn.q_proj.weight, ...)")
    g.add_argument("--head", nargs="+", default=None, metavar="FILE",
                   help="classification heads, one per dataset, in place of zero-shot heads from the text "
                   "tower: the papers' head_<Dataset>.pt or import --heads output (class i = sorted "
                   "class folder i)")
    g.add_argument("--task-vectors", required=True, metavar="FILE",
                   help="task-vector file from python -m atlas_kernels.task_vectors build")
    g.add_argument("--partitions", type=int, default=d.partitions, metavar="K",
                   help="coefficients per block and task vector (aTLAS x K; default 1)")
    g.add_argument("--partition-mode", choices=PARTITION_MODES, default=d.partition_mode)
    g.add_argument("--blocks", nargs="+", default=None, metavar="NAME",
                   help="adapt only these blocks (parameter names of model.visual), or 'weights' (matrices "
                   "and convolutions only); the others stay frozen (default: all)")
    g.add_argument("--storage", default=d.storage,
                   choices=("float32", "bfloat16", "float16", "int8", "float8_e4m3fn"),
                   help="store the task vectors in this dtype after loading (int8/float8_e4m3fn: a float32 scale "
                   "per row, dequantized in the kernels; default: as stored in the file)")
    g.add_argument("--backend", default=d.backend, choices=("auto", "torch", "triton", "ext", "cuda"),
                   help="atlas_kernels backend: auto (decided per device when the model is patched: triton on "
                   "CUDA; the compiled extension on the CPU when it is built, else torch), torch, triton (CUDA), "
                   "ext (the compiled extension; 'cuda' is its old name) (default auto)")
    g.add_argument("--cuda-graph", default=d.cuda_graph, choices=("auto", "on", "off"),
                   help="capture each optimizer step once in a CUDA graph and replay it: auto (default) wherever "
                   "it applies (a CUDA device, bf16/fp32, one process, no --accum-steps); on (refuse to run "
                   "otherwise); off")
    g.add_argument("--linearised", action="store_true",
                   help="train the linearised model (task vectors in the tangent space of the pre-trained "
                   "model: f(x; theta0) + J f . D); --export-merged then writes export_linearised's file")

    g = p.add_argument_group("objective and data")
    g.add_argument("--objective", required=True, choices=OBJECTIVES)
    g.add_argument("--train", nargs="+", default=[], metavar="DIR", required=True)
    g.add_argument("--val", nargs="+", default=[], metavar="DIR", required=True)
    g.add_argument("--control-train", default=None, metavar="DIR")
    g.add_argument("--control-val", default=None, metavar="DIR")
    g.add_argument("--names", nargs="+", default=None, metavar="NAME",
                   help="dataset names (default: folder names)")
    g.add_argument("--classnames", nargs="+", default=None, metavar="FILE",
                   help="one file per dataset: JSON {folder: name}, a JSON list, or one name per "
                   "line in sorted folder order")
    g.add_argument("--templates", default=d.templates,
                   help="prompt templates: openai (80), simple, photo, or a file with one "
                   "template per line holding {} (default openai)")
    g.add_argument("--shots", type=int, default=None, metavar="K",
                   help="k images per class of each training set, drawn with --seed")
    g.add_argument("--augment", action="store_true",
                   help="random resized crops and flips for labelled training images")
    g.add_argument("--seq-len", type=int, default=d.seq_len, metavar="L",
                   help="objective lm: tokens per example (longer lines are cut; default 128)")
    g.add_argument("--tta-loss", choices=TTA_LOSSES, default=d.tta_loss,
                   help="tta: confident pseudo-labels from a weak view for a strong view, or "
                   "entropy minimisation (default pseudo)")
    g.add_argument("--confidence", type=float, default=d.confidence,
                   help="tta pseudo-label confidence threshold (default 0.95)")
    g.add_argument("--control-threshold", type=float, default=d.control_threshold,
                   help="negation: keep control accuracy >= this x zero-shot (default 0.95)")
    g.add_argument("--control-weight", type=float, default=d.control_weight,
                   help="negation: weight of the control cross-entropy (default 1)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=d.epochs)
    g.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="global batch per dataset and micro-step (split over processes)")
    g.add_argument("--eval-batch-size", type=int, default=None)
    g.add_argument("--accum-steps", type=int, default=d.accum_steps,
                   help="micro-batches per optimizer step (gradient accumulation)")
    g.add_argument("--lr", type=float, default=d.lr, help="AdamW learning rate (default 1e-2)")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    g.add_argument("--warmup-steps", type=int, default=d.warmup_steps,
                   help="linear warm-up before the cosine schedule (optimizer steps)")
    g.add_argument("--clip-grad", type=float, default=d.clip_grad,
                   help="gradient-norm clipping (0 disables; default 1)")
    g.add_argument("--precision", choices=PRECISIONS, default=d.precision,
                   help="autocast: auto (bf16 on GPUs that have it, else fp16; fp32 on CPUs), "
                   "fp32, bf16, fp16 (with a grad scaler)")
    g.add_argument("--select", choices=SELECTS, default=d.select,
                   help="which evaluated coefficients to keep: best (by the objective's rule), "
                   "last; auto = best, except last for tta")
    g.add_argument("--seed", type=int, default=d.seed)

    g = p.add_argument_group("run")
    g.add_argument("--out", required=True, metavar="DIR", help="output folder")
    g.add_argument("--device", default=d.device, help="auto (cuda if available), cpu, cuda, cuda:N")
    g.add_argument("--workers", type=int, default=d.workers, help="data-loader workers")
    g.add_argument("--resume", default=None, metavar="CKPT",
                   help="continue from a checkpoint.pt of the same run")
    g.add_argument("--save-every", type=int, default=d.save_every, metavar="STEPS",
                   help="also checkpoint every this many optimizer steps (always at epoch ends)")
    g.add_argument("--stop-after-steps", type=int, default=None, metavar="STEPS",
                   help="checkpoint and stop after this many optimizer steps (resume later)")
    g.add_argument("--log-every", type=int, default=d.log_every, metavar="STEPS")
    g.add_argument("--export-merged", default=None, metavar="FILE",
                   help="also write the merged plain model's state dict (safetensors)")
    g.add_argument("--quiet", action="store_true", help="no progress lines")
    g.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard theta0 and the task vectors over the processes (each holds 1/W of "
                   "every adapted block, read lazily from the file; blocks are composed from the local rows and "
                   "all-gathered for the forward); the coefficients stay whole. Same results and files as one "
                   "process")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(**{k: v for k, v in vars(args).items()})


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the CLI; returns the exit status (0 ok, also after --stop-after-steps; 2 input error;
    3 the run diverged: a non-finite loss, gradient or coefficient)."""
    parser = build_parser()
    args = parser.parse_args(None if argv is None else list(argv))
    cfg = config_from_args(args)
    from .faults import DivergedError
    from .loop import run

    try:
        run(cfg)
    except DivergedError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 3
    except (ValueError, OSError, MemoryError) as e:
        # Input errors (ConfigError, DataError, files that are not what they should be): one line,
        # no traceback.
        print(f"{PROG}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    return 0


def _one_line(e: BaseException) -> str:
    msg = str(e) or type(e).__name__
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        msg = f"{e.filename}: {e.strerror}"
    out = ""
    for part in (p.strip() for p in msg.splitlines() if p.strip()):  # a list in the message: one line
        out += (" " if not out or out.endswith(":") else "; ") + part
    return out.strip()
