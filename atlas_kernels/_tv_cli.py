"""Command line of ``python -m atlas_kernels.task_vectors``.

Subcommands::

    build    --pretrained P --finetuned F1 F2 ... --out tvs.safetensors
             [--storage float32|bfloat16|float16|int8|float8_e4m3fn] [--prefix visual.] [--names A B ...]
    convert  OLD.pt NEW.safetensors [--trust-pickle]
    info     tvs.safetensors

``build`` reads state dicts only (safetensors, or ``torch.load(weights_only=True)``); a checkpoint
that is a pickled whole module is refused with a message pointing at ``convert``. ``convert`` is the
one place that unpickles, and only with ``--trust-pickle``: unpickling runs code from the file, so
use it only on files you trust (for example the task-vector papers' released checkpoints).

Exit status: 0 on success, 2 on a usage or input error (the message says what to fix).
"""
from __future__ import annotations

import argparse
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
        description="Build task-vector files from state-dict checkpoints, or convert the pickled "
        "whole-module checkpoints of the task-vector papers into safetensors state dicts.",
    )
    sub = p.add_subparsers(dest="command", metavar="{build,convert,info}")
    sub.required = True

    b = sub.add_parser(
        "build",
        help="fine-tuned minus pre-trained, for each fine-tuned checkpoint, into one file",
        description="Write one task-vector file: for every fine-tuned checkpoint, fine-tuned minus "
        "pre-trained, block by block. Checkpoints are state dicts (safetensors, or torch files "
        "read with weights_only=True).",
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
                   "an open_clip image tower (default: the library's default)")
    b.add_argument("--names", nargs="+", default=None, metavar="NAME",
                   help="one name per fine-tuned checkpoint (default: derived from file names)")

    c = sub.add_parser(
        "convert",
        help="pickled whole-module checkpoint -> safetensors state dict (needs --trust-pickle)",
        description="Convert a checkpoint saved with torch.save(module) (as the task-vector papers "
        "released them) into a safetensors state dict. Loading such a file unpickles it, which runs "
        "code from the file: this happens only with --trust-pickle. Use it only on files you trust.",
    )
    c.add_argument("src", metavar="OLD.pt")
    c.add_argument("dst", metavar="NEW.safetensors")
    c.add_argument("--trust-pickle", action="store_true",
                   help="allow unpickling SRC (runs code from the file; only for files you trust)")

    i = sub.add_parser("info", help="print the names, blocks and size of a task-vector file")
    i.add_argument("path", metavar="TVS.safetensors")
    return p


def _cmd_build(args, out) -> int:
    import atlas_kernels as ak

    if args.names is not None and len(args.names) != len(args.finetuned):
        raise ValueError(
            f"--names has {len(args.names)} names for {len(args.finetuned)} --finetuned checkpoints")
    kwargs = {"names": args.names, "storage": args.storage}
    if args.prefix is not None:
        kwargs["prefix"] = args.prefix
    tvs = ak.TaskVectors.from_checkpoints(args.pretrained, list(args.finetuned), **kwargs)
    tvs.save(args.out)
    print(f"wrote {args.out}: {len(tvs)} task vectors ({', '.join(map(str, tvs.names))}), "
          f"{len(tvs.blocks)} blocks, {_fmt_bytes(int(tvs.nbytes))}", file=out)
    return 0


def _cmd_convert(args, out) -> int:
    from atlas_kernels.checkpoints import convert_checkpoint

    convert_checkpoint(args.src, args.dst, trust_pickle=bool(args.trust_pickle))
    print(f"wrote {args.dst} (safetensors state dict) from {args.src}", file=out)
    return 0


def _cmd_info(args, out) -> int:
    import atlas_kernels as ak

    tvs = ak.TaskVectors.load(args.path)
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
    cmd = {"build": _cmd_build, "convert": _cmd_convert, "info": _cmd_info}[args.command]
    try:
        return cmd(args, sys.stdout)
    except (ValueError, TypeError, FileNotFoundError, IsADirectoryError, PermissionError) as e:
        msg = str(e) or type(e).__name__
        if args.command == "convert" and not args.trust_pickle and "pickle" in msg.lower() \
                and "--trust-pickle" not in msg:
            msg += ("\n(refused without --trust-pickle: unpickling runs code from the file; "
                    "add --trust-pickle only for a file you trust)")
        print(f"{PROG} {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
