"""Command line of ``python -m atlas_kernels.task_vectors``.

Subcommands::

    import   ROOT --model ViT-B-32 --out tvs.safetensors [--datasets Cars DTD ...]
             [--storage float16] [--heads DIR] [--prefix auto]
    build    --pretrained P --finetuned F1 F2 ... --out tvs.safetensors
             [--storage float32|bfloat16|float16|int8|float8_e4m3fn] [--prefix visual.|auto] [--names A B ...]
    convert  OLD.pt NEW.safetensors [--prefix auto]
    info     tvs.safetensors

Every command reads checkpoints without running code from them: safetensors, and torch files
(state dicts and the task-vector papers' pickled whole modules) through a restricted reader that
imports and calls nothing from the file.

Exit status: 0 on success, 2 on a usage or input error (the message says what to fix).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

PROG = "python -m atlas_kernels.task_vectors"


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024.0
    return f"{n:.1f} GiB"  # pragma: no cover


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Build task-vector files from checkpoints (state dicts, or the pickled "
        "whole-module checkpoints of the task-vector papers, read without running code).",
    )
    sub = p.add_subparsers(dest="command", metavar="{import,build,peft,convert,info}")
    sub.required = True

    m = sub.add_parser(
        "import",
        help="a folder of published checkpoints -> one task-vector file",
        description="Import a folder of published checkpoints: ROOT/zeroshot.pt with "
        "ROOT/<Dataset>/finetuned.pt (task_vectors), or ROOT/<Dataset>Val/{zeroshot,finetuned}.pt "
        "(the aTLAS code). Checks every image tower against --model, prints each task vector's "
        "norm and size, warns about identical task vectors. Nothing in the files is run.",
    )
    m.add_argument("root", metavar="ROOT", help="checkpoint folder (one backbone)")
    m.add_argument("--model", default=None, help="open_clip model name the checkpoints belong to, e.g. ViT-B-32")
    m.add_argument("--model-config", default=None, metavar="JSON",
                   help="an open_clip model config file to register (its stem is the model name)")
    m.add_argument("--out", required=True, metavar="OUT", help="output task-vector file (.safetensors)")
    m.add_argument("--datasets", nargs="+", default=None, metavar="NAME",
                   help="only these datasets, in this order (default: every folder, sorted)")
    m.add_argument("--storage", choices=("float32", "bfloat16", "float16"), default=None,
                   help="dtype the task vectors are stored in (default float32)")
    m.add_argument("--heads", default=None, metavar="DIR",
                   help="also write each dataset's classification head as DIR/head_<Dataset>.safetensors "
                   "(for the training CLI's --head)")
    m.add_argument("--prefix", default="auto",
                   help="image-tower prefix in the checkpoints (default auto: visual., model.visual. ...)")

    b = sub.add_parser(
        "build",
        help="fine-tuned minus pre-trained, for each fine-tuned checkpoint, into one file",
        description="Write one task-vector file: for every fine-tuned checkpoint, fine-tuned minus "
        "pre-trained, block by block. Checkpoints are state dicts (safetensors, or torch files "
        "read without running code).",
    )
    b.add_argument("--pretrained", required=True, metavar="P", help="pre-trained state dict")
    b.add_argument("--finetuned", required=True, nargs="+", metavar="F",
                   help="fine-tuned state dicts, one per task vector")
    b.add_argument("--out", required=True, metavar="OUT", help="output file (.safetensors)")
    b.add_argument("--storage", choices=("float32", "bfloat16", "float16", "int8", "float8_e4m3fn"), default=None,
                   help="dtype the task vectors are stored in (default float32; int8 and float8_e4m3fn keep a "
                   "float32 scale per row and are dequantized inside the kernels)")
    b.add_argument("--prefix", default=None,
                   help="keep only keys starting with this prefix and strip it, e.g. 'visual.' for "
                   "an open_clip image tower, 'model.visual.' for the papers' ImageEncoder files, or "
                   "'auto' to find the image tower (default: every key)")
    b.add_argument("--names", nargs="+", default=None, metavar="NAME",
                   help="one name per fine-tuned checkpoint (default: derived from file names)")

    f = sub.add_parser(
        "peft",
        help="PEFT LoRA adapter folders -> one task-vector file (LoRA factors, never densified)",
        description="Write one task-vector file of LoRA task vectors, one per PEFT adapter folder "
        "(adapter_config.json + adapter_model.safetensors), with PEFT's lora_alpha / r folded into B. "
        "Block names are the base model's parameter names (base_model.model. is stripped).",
    )
    f.add_argument("adapters", nargs="+", metavar="ADAPTER_DIR")
    f.add_argument("--out", required=True, metavar="OUT", help="output file (.safetensors)")
    f.add_argument("--module-prefix", default=None,
                   help="keep only modules under this prefix and strip it (e.g. 'visual.' for an adapter trained "
                   "on a whole CLIP, to patch model.visual)")
    f.add_argument("--storage", choices=("float32", "bfloat16", "float16"), default=None,
                   help="dtype the LoRA factors are stored in (default float32)")
    f.add_argument("--names", nargs="+", default=None, metavar="NAME",
                   help="one name per adapter (default: the folder names)")

    c = sub.add_parser(
        "convert",
        help="any checkpoint (also a pickled whole module) -> safetensors state dict",
        description="Convert a checkpoint (a state dict, or a module saved with torch.save(module) "
        "as the task-vector papers released them) into a safetensors state dict. The file is read "
        "by a restricted reader: nothing in it is imported or run.",
    )
    c.add_argument("src", metavar="OLD.pt")
    c.add_argument("dst", metavar="NEW.safetensors")
    c.add_argument("--prefix", default=None,
                   help="keep only keys under this prefix, stripped (auto: the image tower)")

    i = sub.add_parser("info", help="print the names, blocks and size of a task-vector file")
    i.add_argument("path", metavar="TVS.safetensors")
    return p


_PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle")


def _check_out(arg: str, path: str) -> None:
    """The files these commands write are safetensors: a name that promises a torch pickle (as
    ``--out tv.pt`` did, silently) is refused before any work, with the name to use."""
    root, ext = os.path.splitext(path)
    if ext.lower() in _PICKLE_SUFFIXES:
        raise ValueError(f"{arg} {path!r} ends in {ext}, the suffix of a torch pickle, but this command writes a "
                         f"safetensors file: name it {root + '.safetensors'!r}")


def _cmd_build(args, out) -> int:
    from .core import TaskVectors

    _check_out("--out", args.out)

    if args.names is not None and len(args.names) != len(args.finetuned):
        raise ValueError(
            f"--names has {len(args.names)} names for {len(args.finetuned)} --finetuned checkpoints")
    kwargs = {"names": args.names, "storage": args.storage}
    if args.prefix is not None:
        kwargs["prefix"] = args.prefix
    tvs = TaskVectors.from_checkpoints(args.pretrained, list(args.finetuned), **kwargs)
    tvs.save(args.out)
    print(f"wrote {args.out}: {len(tvs)} task vectors ({', '.join(map(str, tvs.names))}), "
          f"{len(tvs.blocks)} blocks, {_fmt_bytes(int(tvs.nbytes))}", file=out)
    return 0


def _cmd_peft(args, out) -> int:
    from .core import TaskVectors

    _check_out("--out", args.out)
    if args.names is not None and len(args.names) != len(args.adapters):
        raise ValueError(f"--names has {len(args.names)} names for {len(args.adapters)} adapters")
    tvs = TaskVectors.from_peft(list(args.adapters), names=args.names, module_prefix=args.module_prefix,
                                storage=args.storage)
    tvs.save(args.out)
    print(f"wrote {args.out}: {len(tvs)} LoRA task vectors ({', '.join(map(str, tvs.names))}), "
          f"{len(tvs.blocks)} blocks, {_fmt_bytes(int(tvs.nbytes))}", file=out)
    return 0


def _cmd_convert(args, out) -> int:
    from ..checkpoints import convert_checkpoint

    _check_out("the destination", args.dst)
    sd = convert_checkpoint(args.src, args.dst, prefix=args.prefix)
    print(f"wrote {args.dst} (safetensors state dict, {len(sd)} tensors) from {args.src}", file=out)
    return 0


def _cmd_import(args, out) -> int:
    from .importer import run_import

    _check_out("--out", args.out)
    return run_import(args, out)


def _cmd_info(args, out) -> int:
    from .core import TaskVectors

    tvs = TaskVectors.load(args.path)
    print(f"{args.path}: {len(tvs)} task vectors, {len(tvs.blocks)} blocks, "
          f"{_fmt_bytes(int(tvs.nbytes))}", file=out)
    print(f"storage: {tvs.storage}", file=out)
    print("names: " + ", ".join(map(str, tvs.names)), file=out)
    for b in tvs.blocks:
        kind = " (LoRA)" if tvs.is_lora(b) else ""
        print(f"  {b}  {tuple(tvs.shape(b))}{kind}", file=out)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 2 input error). ``argv`` excludes the program."""
    parser = build_parser()
    args = parser.parse_args(None if argv is None else list(argv))
    cmd = {"build": _cmd_build, "peft": _cmd_peft, "convert": _cmd_convert, "info": _cmd_info,
           "import": _cmd_import}[args.command]
    try:
        return cmd(args, sys.stdout)
    except (ValueError, TypeError, OSError, MemoryError) as e:
        # one line, no traceback: bad input, a file that is not what it should be, a full disk
        # (the atomic writers say so and keep the previous file), running out of memory
        msg = str(e) or type(e).__name__
        if isinstance(e, OSError) and e.filename is not None and e.strerror and not isinstance(e, FileNotFoundError):
            msg = f"{e.filename}: {e.strerror}"
        print(f"{PROG} {args.command}: error: {' '.join(msg.split())}", file=sys.stderr)
        return 2

