"""Hostile checkpoint files built on the fly, small on disk (issue 24, bad 1 and 2): used by
test_round3_files.py and the adversarial harness.

- :func:`expansion_bomb`: a valid torch zip file whose tensors are huge stride-0 views over one
  tiny storage (``n`` tensors of ``shape`` over 6 float32 elements: 3000 x (1024, 1024) is 12 GiB
  of views from a 190 KB file);
- :func:`compression_bomb`: a torch zip file whose ``data.pkl`` is a list of ``n`` small ints,
  deflated (120 M ints: a 251 MB pickle in a ~245 KB file);
- :func:`list_pickle_bytes`: the same pickle program, for a file that is big on disk (stored).
"""
from __future__ import annotations

import io
import struct
import zipfile
from pathlib import Path

import torch

_CHUNK = b"(" + b"K\x00" * 1000 + b"e"  # MARK, 1000 x BININT1 0, APPENDS


def list_pickle_chunks(n: int):
    """The pickle program of ``[0] * n`` (protocol 2, batches of 1000 appends), in pieces."""
    yield b"\x80\x02]q\x00"  # PROTO 2, EMPTY_LIST, BINPUT 0
    full, rest = divmod(n, 1000)
    block = _CHUNK * 256
    for _ in range(full // 256):
        yield block
    yield _CHUNK * (full % 256)
    if rest:
        yield b"(" + b"K\x00" * rest + b"e"
    yield b"."


def list_pickle_bytes(n: int) -> bytes:
    return b"".join(list_pickle_chunks(n))


def _torch_zip_parts(root: str):
    """The small records of a torch zip checkpoint (everything but data.pkl and storages)."""
    buf = io.BytesIO()
    torch.save({}, buf)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as zf:
        old = zf.namelist()[0].split("/")[0]
        return {n.replace(old + "/", root + "/", 1): zf.read(n) for n in zf.namelist() if not n.endswith("data.pkl")}


def compression_bomb(path, n: int = 120_000_000, *, compress: bool = True) -> Path:
    """A torch zip file whose ``data.pkl`` is the pickle of ``[0] * n``; deflated (``compress``)
    it is small on disk, stored it is as big as the pickle."""
    path = Path(path)
    root = path.stem or "archive"
    with zipfile.ZipFile(path, "w", compresslevel=1) as zf:
        for name, data in _torch_zip_parts(root).items():
            zf.writestr(name, data)
        info = zipfile.ZipInfo(f"{root}/data.pkl")
        info.compress_type = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
        # zlib level 1 on this repetitive program: ~1000:1, about a second for 120 M ints
        with zf.open(info, "w", force_zip64=True) as fh:
            for chunk in list_pickle_chunks(n):
                fh.write(chunk)
    return path


def expansion_bomb(path, n: int = 3000, shape=(1024, 1024)) -> Path:
    """A valid torch zip file holding ``n`` tensors of ``shape`` with all-zero strides over one
    6-element float32 storage: ``n * prod(shape) * 4`` bytes of views from a file of ~60 bytes
    per tensor."""
    base = torch.arange(6, dtype=torch.float32)
    views = {f"t{i}": base.as_strided(shape, (0,) * len(shape)) for i in range(n)}
    torch.save(views, str(path))
    return Path(path)


def overlapping_views(path, n: int = 64, rows: int = 4096, cols: int = 1024) -> Path:
    """``n`` full-size views over one storage of ``rows x cols`` float32 (each within the
    storage, each as big as it): ``n`` times the data the file carries."""
    base = torch.zeros(rows, cols)
    torch.save({f"t{i}": base.as_strided((rows, cols), (cols, 1)) for i in range(n)}, str(path))
    return Path(path)


def huge_declared_storage(path) -> Path:
    """A torch zip file whose central directory declares a 1 TiB storage record that is not there."""
    path = Path(path)
    torch.save({"w": torch.zeros(4)}, str(path))
    data = bytearray(path.read_bytes())
    # the central-directory entry of the storage record: patch its uncompressed and compressed sizes
    i = data.find(b"PK\x01\x02", 0)
    while i >= 0:
        name_len = struct.unpack("<H", data[i + 28:i + 30])[0]
        name = bytes(data[i + 46:i + 46 + name_len])
        if name.endswith(b"data/0"):
            data[i + 20:i + 24] = struct.pack("<I", 0xFFFFFFFE)
            data[i + 24:i + 28] = struct.pack("<I", 0xFFFFFFFE)
        i = data.find(b"PK\x01\x02", i + 4)
    path.write_bytes(bytes(data))
    return path


def deflate_ratio(path) -> float:
    with zipfile.ZipFile(path) as zf:
        i = next(i for i in zf.infolist() if i.filename.endswith("data.pkl"))
        return i.file_size / max(i.compress_size, 1)


__all__ = ["compression_bomb", "expansion_bomb", "overlapping_views", "huge_declared_storage", "list_pickle_bytes",
           "list_pickle_chunks", "deflate_ratio"]
