"""Image folders, k-shot sampling, transforms and the deterministic batch plan.

Every random choice of the data pipeline is a pure function of ``(seed, epoch, dataset, position)``:

- the order of an epoch is a concatenation of seeded permutations (a "stream"): a dataset shorter
  than the epoch cycles through fresh permutations, so every batch is full;
- the random augmentation of a sample is drawn from the torch RNG re-seeded, for that one sample,
  from ``(seed, epoch, dataset, position)`` (inside ``torch.random.fork_rng``, so the global RNG is
  untouched).

So the batches do not depend on the number of loader workers, on how the global batch is split
between processes (each rank takes a contiguous slice of every global batch), or on where a run was
interrupted and resumed: resuming at step ``s`` of epoch ``e`` just starts the same plan at ``s``.
"""
from __future__ import annotations

import hashlib
import math
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

Sample = Tuple[str, int]  # (path, label); label -1 for unlabelled images


@dataclass
class TaskData:
    """One dataset of a run: its classes, the samples of each split and where they came from."""

    name: str
    classes: List[str]           # class folder names (sorted)
    classnames: List[str]        # names used in prompts
    train: List["Sample"]
    val: List["Sample"]
    train_path: str
    val_path: str


class DataError(ValueError):
    """A data folder that cannot be used (missing, empty, mismatched classes)."""


def mix_seed(*values: int) -> int:
    """A 63-bit seed from a tuple of ints (stable across processes, platforms and Python runs)."""
    h = hashlib.blake2b(struct.pack(f"<{len(values)}q", *[int(v) for v in values]), digest_size=8)
    return int.from_bytes(h.digest(), "little") & ((1 << 63) - 1)


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMG_EXTENSIONS and not p.name.startswith(".")


def scan_image_folder(path, role: str = "data") -> Tuple[List[str], List[Sample]]:
    """Classes (sorted sub-folder names) and ``(path, label)`` samples of an ImageFolder directory.

    Raises :class:`DataError` when the folder is missing, is not a directory, has no class
    sub-folders, or has a class sub-folder without images.
    """
    p = Path(path)
    if not p.exists():
        raise DataError(f"{role} folder '{p}' does not exist")
    if not p.is_dir():
        raise DataError(f"{role} path '{p}' is not a directory")
    classes = sorted(d.name for d in p.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        loose = [f for f in p.iterdir() if _is_image(f)]
        hint = (f" (it holds {len(loose)} images directly: put them in one sub-folder per class)"
                if loose else "")
        raise DataError(
            f"{role} folder '{p}' is empty: expected the ImageFolder layout "
            f"'{p}/<class name>/<image>' with one sub-folder per class{hint}")
    samples: List[Sample] = []
    empty = []
    for label, c in enumerate(classes):
        files = sorted(f for f in (p / c).rglob("*") if _is_image(f))
        if not files:
            empty.append(c)
        samples.extend((str(f), label) for f in files)
    if empty:
        raise DataError(
            f"{role} folder '{p}': class folder(s) without images ({', '.join(IMG_EXTENSIONS)}): "
            + ", ".join(repr(c) for c in empty[:10]) + (" ..." if len(empty) > 10 else ""))
    return classes, samples


def scan_unlabelled_folder(path, role: str = "unlabelled") -> Tuple[Optional[List[str]], List[Sample]]:
    """Images of a folder for unsupervised use: an ImageFolder (labels kept for reporting only) or
    a flat folder of images (any depth below it when it holds no class sub-folders)."""
    p = Path(path)
    if p.is_dir() and any(_is_image(f) for f in p.iterdir()):
        files = sorted(f for f in p.rglob("*") if _is_image(f))
        return None, [(str(f), -1) for f in files]
    return scan_image_folder(p, role)


def check_same_classes(a: Sequence[str], b: Sequence[str], a_path, b_path) -> None:
    """Raise :class:`DataError` unless two splits have the same class folders."""
    if list(a) == list(b):
        return
    only_a = sorted(set(a) - set(b))
    only_b = sorted(set(b) - set(a))

    def _show(xs):
        return ", ".join(repr(x) for x in xs[:10]) + (" ..." if len(xs) > 10 else "") or "none"

    raise DataError(
        f"class folders differ between '{a_path}' ({len(a)} classes) and '{b_path}' ({len(b)} "
        f"classes): only in the first: {_show(only_a)}; only in the second: {_show(only_b)}")


def classnames_from_folders(classes: Sequence[str]) -> List[str]:
    """Folder names as class names for prompts: ``'golden_retriever'`` -> ``'golden retriever'``."""
    return [c.replace("_", " ").strip() for c in classes]


def k_shot(samples: Sequence[Sample], k: Optional[int], seed: int) -> List[Sample]:
    """``k`` samples per class drawn with ``seed`` (all of a class that has fewer; all when k is
    None or 0). The result is sorted by (label, path) so it does not depend on the input order."""
    if not k:
        return list(samples)
    by_class = {}
    for s in sorted(samples, key=lambda s: (s[1], s[0])):
        by_class.setdefault(s[1], []).append(s)
    out, short = [], []
    for label in sorted(by_class):
        items = by_class[label]
        if len(items) <= k:
            if len(items) < k:
                short.append(label)
            out.extend(items)
            continue
        g = torch.Generator().manual_seed(mix_seed(seed, 0x5107, label))
        pick = torch.randperm(len(items), generator=g)[:k].sort().values.tolist()
        out.extend(items[i] for i in pick)
    if short:
        warnings.warn(f"{len(short)} class(es) have fewer than {k} images; using all of theirs",
                      stacklevel=2)
    return out


# ----------------------------------------------------------------------------------------------
# transforms


@dataclass
class Preprocess:
    size: Tuple[int, int]
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    eval: Callable  # the model's own evaluation transform


def model_preprocess(model) -> Preprocess:
    """The open_clip model's preprocessing (size, mean, std) and its evaluation transform."""
    import open_clip
    from open_clip.transform import PreprocessCfg, image_transform_v2

    cfg = dict(open_clip.get_model_preprocess_cfg(model))
    pcfg = PreprocessCfg(**{k: v for k, v in cfg.items() if k in PreprocessCfg.__dataclass_fields__})
    size = pcfg.size if isinstance(pcfg.size, (tuple, list)) else (pcfg.size, pcfg.size)
    return Preprocess(tuple(size), tuple(pcfg.mean), tuple(pcfg.std),
                      image_transform_v2(pcfg, is_train=False))


def train_transform(pre: Preprocess, kind: str):
    """``'eval'`` (the model's own), ``'augment'`` (random resized crop and flip), ``'weak'`` (as
    augment, milder) or ``'strong'`` (crop, flip and RandAugment), all ending in normalisation."""
    from torchvision import transforms as T

    if kind == "eval":
        return pre.eval
    bicubic = T.InterpolationMode.BICUBIC
    norm = [T.ToTensor(), T.Normalize(pre.mean, pre.std)]
    if kind == "weak":
        return T.Compose([T.RandomResizedCrop(pre.size, scale=(0.6, 1.0), interpolation=bicubic),
                          T.RandomHorizontalFlip()] + norm)
    if kind == "augment":
        return T.Compose([T.RandomResizedCrop(pre.size, scale=(0.4, 1.0), interpolation=bicubic),
                          T.RandomHorizontalFlip()] + norm)
    if kind == "strong":
        return T.Compose([T.RandomResizedCrop(pre.size, scale=(0.25, 1.0), interpolation=bicubic),
                          T.RandomHorizontalFlip(), T.RandAugment(num_ops=2, magnitude=10)] + norm)
    raise ValueError(f"unknown transform kind {kind!r}")


class ImageDataset(Dataset):
    """``(path, label)`` samples, each returned as ``(*views, label)``, one view per transform.

    An item key is an index, or ``(index, seed)``: with a seed, the transforms draw their random
    numbers from the torch RNG seeded with it (the caller's RNG state is restored afterwards)."""

    def __init__(self, samples: Sequence[Sample], transforms: Sequence[Callable]):
        self.samples = list(samples)
        self.transforms = list(transforms)

    def __len__(self) -> int:
        return len(self.samples)

    def _load(self, idx):
        from PIL import Image

        path, label = self.samples[idx]
        with Image.open(path) as im:
            return im.convert("RGB"), label

    def __getitem__(self, key):
        idx, seed = key if isinstance(key, tuple) else (key, None)
        img, label = self._load(idx)
        if seed is None:
            views = [t(img) for t in self.transforms]
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                views = [t(img) for t in self.transforms]
        return (*views, label)


# ----------------------------------------------------------------------------------------------
# the batch plan


def epoch_stream(n: int, length: int, seed: int, epoch: int, dataset: int) -> List[int]:
    """``length`` indices into a dataset of ``n``: seeded permutations, concatenated."""
    out: List[int] = []
    cycle = 0
    while len(out) < length:
        g = torch.Generator().manual_seed(mix_seed(seed, epoch, dataset, cycle))
        out.extend(torch.randperm(n, generator=g).tolist())
        cycle += 1
    return out[:length]


def steps_per_epoch(sizes: Sequence[int], batch_size: int) -> int:
    """Micro-batches per epoch: enough for one pass over the largest dataset."""
    return max(1, math.ceil(max(sizes) / batch_size))


class PlanBatchSampler(Sampler):
    """This rank's slice of each global batch of one dataset, for one epoch, from step ``start``.

    Yields lists of ``(index, sample_seed)`` keys for :class:`ImageDataset`."""

    def __init__(self, n: int, batch_size: int, steps: int, *, seed: int, epoch: int,
                 dataset: int = 0, rank: int = 0, world: int = 1, start: int = 0,
                 augment_seeds: bool = True):
        if batch_size % world:
            raise ValueError(f"the global batch size {batch_size} is not divisible by the number "
                             f"of processes {world}")
        self.n, self.batch_size, self.steps = n, batch_size, steps
        self.seed, self.epoch, self.dataset = seed, epoch, dataset
        self.rank, self.world, self.start = rank, world, start
        self.augment_seeds = augment_seeds

    def __len__(self) -> int:
        return max(0, self.steps - self.start)

    def __iter__(self):
        stream = epoch_stream(self.n, self.steps * self.batch_size, self.seed, self.epoch,
                              self.dataset)
        per = self.batch_size // self.world
        lo = self.rank * per
        for s in range(self.start, self.steps):
            base = s * self.batch_size + lo
            yield [(stream[p], mix_seed(self.seed, 0xA06, self.epoch, self.dataset, p)
                    if self.augment_seeds else None) for p in range(base, base + per)]


def _seeded_or_plain_key(key):
    return key if key[1] is not None else key[0]


class _KeyDataset(Dataset):
    def __init__(self, ds: ImageDataset):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, key):
        return self.ds[_seeded_or_plain_key(key)]


def plan_loader(ds: ImageDataset, sampler: PlanBatchSampler, workers: int, pin: bool) -> DataLoader:
    return DataLoader(_KeyDataset(ds), batch_sampler=sampler, num_workers=workers, pin_memory=pin,
                      persistent_workers=False)


def eval_loader(ds: ImageDataset, batch_size: int, rank: int, world: int, workers: int,
                pin: bool) -> DataLoader:
    """This rank's contiguous shard of a dataset, in order (no augmentation)."""
    n = len(ds)
    lo, hi = n * rank // world, n * (rank + 1) // world
    sub = torch.utils.data.Subset(ds, list(range(lo, hi)))
    return DataLoader(sub, batch_size=batch_size, shuffle=False, num_workers=workers,
                      pin_memory=pin, persistent_workers=False)


# ----------------------------------------------------------------------------------------------
# text (objective lm)


class ByteTokenizer:
    """The fallback tokenizer of ``--objective lm`` when the model folder holds none: the UTF-8
    bytes of a line are its token ids (0..255; the model's vocabulary must have at least 256 ids)."""

    vocab_size = 256

    def __call__(self, text: str) -> List[int]:
        return list(text.encode("utf-8"))

    def __repr__(self) -> str:
        return "ByteTokenizer(UTF-8 bytes as token ids)"


class HFTokenizer:
    """A Hugging Face tokenizer read from the model folder (``local_files_only``: nothing is
    downloaded); its special tokens (a BOS) are added as the model expects."""

    def __init__(self, tok):
        self.tok = tok
        self.vocab_size = len(tok)

    def __call__(self, text: str) -> List[int]:
        return list(self.tok(text)["input_ids"])

    def __repr__(self) -> str:
        return f"HFTokenizer({type(self.tok).__name__}, {self.vocab_size} tokens)"


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")


def load_tokenizer(model_dir, vocab_size: int):
    """The tokenizer of a model folder (any of :data:`_TOKENIZER_FILES`), else :class:`ByteTokenizer`.
    A tokenizer with more ids than the model's vocabulary is refused."""
    d = Path(model_dir)
    if any((d / f).is_file() for f in _TOKENIZER_FILES):
        from transformers import AutoTokenizer

        try:
            tok = HFTokenizer(AutoTokenizer.from_pretrained(str(d), local_files_only=True))
        except Exception as e:  # a broken or unsupported tokenizer file: say which folder
            raise DataError(f"--hf-model '{d}': its tokenizer files could not be read ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}); remove them to use UTF-8 bytes as "
                            f"tokens") from None
    else:
        tok = ByteTokenizer()
    if tok.vocab_size > vocab_size:
        raise DataError(f"--hf-model '{d}': the {tok!r} has {tok.vocab_size} token ids, the model's vocabulary "
                        f"only {vocab_size} (config.json vocab_size)")
    return tok


def read_text_examples(path, role: str, tokenizer, seq_len: int) -> List[List[int]]:
    """The examples of a text file for ``--objective lm``: one per non-empty line (UTF-8), tokenised
    and cut to ``seq_len`` tokens. A missing or empty file, a line that is not UTF-8, and a line of
    fewer than 2 tokens (nothing to predict) raise :class:`DataError` naming the file and line."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{role} file '{p}' does not exist")
    if not p.is_file():
        raise DataError(f"{role} path '{p}' is not a text file (objective lm reads one example per line)")
    raw = p.read_bytes()
    out = []
    for i, line in enumerate(raw.split(b"\n"), start=1):
        try:
            text = line.decode("utf-8").rstrip("\r")
        except UnicodeDecodeError as e:
            raise DataError(f"{role} file '{p}', line {i}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        if not text.strip():
            continue
        ids = tokenizer(text)[:seq_len]
        if len(ids) < 2:
            raise DataError(f"{role} file '{p}', line {i}: {len(ids)} token(s); an example needs at least 2 (one "
                            f"to predict the next)")
        out.append(ids)
    if not out:
        raise DataError(f"{role} file '{p}' holds no example (objective lm reads one example per non-empty line)")
    return out


class TextDataset(Dataset):
    """Token sequences, each returned as ``(ids, length)``: ``ids`` padded with 0 to ``seq_len``
    (padding comes after the text, so a causal model never attends to it; the loss masks it).
    Item keys are as :class:`ImageDataset`'s (a seed is accepted and unused: no augmentation)."""

    def __init__(self, examples: Sequence[Sequence[int]], seq_len: int):
        self.examples = [list(e) for e in examples]
        self.seq_len = seq_len

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, key):
        idx = key[0] if isinstance(key, tuple) else key
        e = self.examples[idx]
        ids = torch.zeros(self.seq_len, dtype=torch.long)
        ids[:len(e)] = torch.tensor(e, dtype=torch.long)
        return ids, len(e)
