"""Safetensors files: names, the dtype table, the one header reader, and streaming I/O.

The format is an 8-byte little-endian header length N, N bytes of JSON
({name: {dtype, shape, data_offsets}} plus "__metadata__"), then the tensor
bytes. Everything in glmsnake that opens a safetensors file goes through here:
the hub's check of a downloaded or local file (`check_complete`), the FP8
converter and the torch_dist converter's HF reader (`read_header`), so a
truncated or garbled file is refused by one set of checks, never a crash later.
We read with pread (no mmap, so page-cache pages never count as our RSS) and
write with pwrite at offsets planned up front, so a shard is never held in
memory. The planned layout reproduces `safetensors.torch.save_file` byte for
byte (a test checks this), so our shards equal a plain save_file.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from glmsnake.errors import GlmsnakeError

INDEX_NAME = "model.safetensors.index.json"  # a sharded checkpoint's {"weight_map": {tensor: shard}}
SINGLE_NAME = "model.safetensors"  # an unsharded checkpoint's one file

# save_file orders tensors by dtype (this order, as safetensors 0.8 ranks them), then by name.
_DTYPE_ORDER = [
    "U64", "I64", "F64", "C64", "F32", "U32", "I32", "BF16", "F16", "U16", "I16",
    "F8_E5M2FNUZ", "F8_E4M3FNUZ", "F8_E4M3", "F8_E5M2", "I8", "U8", "BOOL",
]  # fmt: skip
DTYPES: dict[str, torch.dtype] = {
    "U64": torch.uint64, "I64": torch.int64, "F64": torch.float64, "C64": torch.complex64,
    "F32": torch.float32, "U32": torch.uint32, "I32": torch.int32, "BF16": torch.bfloat16,
    "F16": torch.float16, "U16": torch.uint16, "I16": torch.int16,
    "F8_E5M2FNUZ": torch.float8_e5m2fnuz, "F8_E4M3FNUZ": torch.float8_e4m3fnuz,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip
ITEMSIZE = {name: torch.empty(0, dtype=dt).element_size() for name, dt in DTYPES.items()}
_MAX_HEADER = 100 << 20  # safetensors' own limit


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors name, e.g. "BF16"
    shape: tuple[int, ...]
    begin: int  # offset inside the data section
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class Header:
    path: Path
    data_start: int  # 8 + header length
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] | None
    file_size: int


# --------------------------------------------------------------------------- reading a header


@dataclass(frozen=True)
class _Wording:
    """How a failed check is reported: a message template per check ({path} and its facts), one fix."""

    says: dict[str, str]
    fix: str

    def error(self, check: str, **facts) -> GlmsnakeError:
        return GlmsnakeError(self.says[check].format(**facts), self.fix)


# The same checks, worded for two readers: a converter opening a shard, and a download being
# verified. Both wordings are kept as they were (users and tests know them).
_INCOMPLETE = "{path} is not a complete safetensors file: "
_FOR_READERS = _Wording(
    {
        "short": _INCOMPLETE + "only {size} bytes",
        "length": _INCOMPLETE + "header length {n} does not fit in {size} bytes",
        "json": _INCOMPLETE + "header is not JSON ({error})",
        "entry": _INCOMPLETE + "bad header entry for {name!r}",
        "offsets": _INCOMPLETE + "{name} offsets {begin}..{end} disagree with shape {shape}",
        "size": _INCOMPLETE + "header promises {described} bytes, the file has {size}",
    },
    "re-download or re-create this shard (an interrupted copy leaves a truncated file)",
)
_FOR_DOWNLOADS = _Wording(
    {
        "short": "{path} is truncated ({size} bytes)",
        "length": "{path} has a corrupt header (length {n}, file {size} bytes)",
        "json": "{path} has a corrupt header: {error}",
        "size": "{path} is {size} bytes but its header describes {described}: the file is truncated or padded",
    },
    "download or copy it again",
)


def _frame(path: Path, words: _Wording) -> tuple[int, dict, int]:
    """(header length, the parsed header JSON, file size): the 8-byte length fits and the header parses."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise words.error("short", path=path, size=size)
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER or 8 + n > size:
            raise words.error("length", path=path, n=n, size=size)
        try:
            raw = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise words.error("json", path=path, error=e) from None
    return n, raw, size


def _check_size(path: Path, n: int, data_len: int, size: int, words: _Wording) -> None:
    """The header's tensors end exactly where the file does (a truncated or padded file does not)."""
    if 8 + n + data_len != size:
        raise words.error("size", path=path, size=size, described=8 + n + data_len)


def read_header(path: Path) -> Header:
    """Parse and validate a safetensors header; a truncated file is an error, never a crash later."""
    path = Path(path)
    n, raw, size = _frame(path, _FOR_READERS)
    metadata = raw.pop("__metadata__", None)
    tensors = {}
    for name, t in raw.items():
        try:
            begin, end = t["data_offsets"]
            info = TensorInfo(name, t["dtype"], tuple(int(d) for d in t["shape"]), int(begin), int(end))
        except (KeyError, TypeError, ValueError):
            raise _FOR_READERS.error("entry", path=path, name=name) from None
        if info.dtype not in ITEMSIZE:
            raise GlmsnakeError(f"{path}: tensor {name} has dtype {info.dtype}, which glmsnake cannot read")
        if info.nbytes != info.numel * ITEMSIZE[info.dtype] or info.begin < 0:
            raise _FOR_READERS.error("offsets", path=path, name=name, begin=begin, end=end, shape=list(info.shape))
        tensors[name] = info
    _check_size(path, n, max((t.end for t in tensors.values()), default=0), size, _FOR_READERS)
    return Header(path, 8 + n, tensors, metadata, size)


def check_complete(path: Path) -> None:
    """Reject a truncated or garbled file by its header, without reading the payload (a download's check).

    Only the framing is checked (length, JSON, total size), not each tensor's dtype and shape:
    a file holding a dtype glmsnake cannot read is still a complete download.
    """
    path = Path(path)
    n, raw, size = _frame(path, _FOR_DOWNLOADS)
    end = max((t["data_offsets"][1] for k, t in raw.items() if k != "__metadata__"), default=0)
    _check_size(path, n, end, size, _FOR_DOWNLOADS)


# --------------------------------------------------------------------------- streaming: planned layout, pread, pwrite


@dataclass(frozen=True)
class OutEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]


def plan_layout(entries: list[OutEntry], metadata: dict[str, str] | None) -> tuple[bytes, dict[str, TensorInfo]]:
    """The header bytes and each tensor's offsets, exactly as save_file would lay them out."""
    rank = {d: i for i, d in enumerate(_DTYPE_ORDER)}
    ordered = sorted(entries, key=lambda e: (rank[e.dtype], e.name))
    doc: dict = {} if metadata is None else {"__metadata__": metadata}
    infos = {}
    offset = 0
    for e in ordered:
        n = ITEMSIZE[e.dtype]
        for d in e.shape:
            n *= d
        infos[e.name] = TensorInfo(e.name, e.dtype, e.shape, offset, offset + n)
        doc[e.name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [offset, offset + n]}
        offset += n
    body = json.dumps(doc, separators=(",", ":")).encode()
    body += b" " * (-len(body) % 8)  # save_file pads the header to 8 bytes with spaces
    return struct.pack("<Q", len(body)) + body, infos


def read_into(fd: int, buf: torch.Tensor, offset: int, nbytes: int) -> torch.Tensor:
    """pread `nbytes` at `offset` into the front of the uint8 tensor `buf`; returns that slice."""
    view = memoryview(buf.numpy())[:nbytes]
    done = 0
    while done < nbytes:
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            raise OSError(f"unexpected end of file at offset {offset + done}")
        done += got
    return buf[:nbytes]


def write_at(fd: int, data: torch.Tensor | bytes, offset: int) -> None:
    """pwrite all of `data` (a CPU tensor's bytes, or bytes) at `offset`."""
    if isinstance(data, torch.Tensor):
        data = data.contiguous().reshape(-1).view(torch.uint8).numpy()
    view = memoryview(data)
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


def copy_range(src_fd: int, src_off: int, dst_fd: int, dst_off: int, nbytes: int, scratch) -> None:
    """Copy bytes between files in the kernel when it can (copy_file_range), else through `scratch()`."""
    done = 0
    try:
        while done < nbytes:
            got = os.copy_file_range(src_fd, dst_fd, nbytes - done, src_off + done, dst_off + done)
            if got == 0:
                break
            done += got
    except OSError:
        pass  # e.g. EXDEV on old kernels: fall back to read/write below
    while done < nbytes:
        buf = scratch()
        n = min(nbytes - done, buf.numel())
        write_at(dst_fd, read_into(src_fd, buf, src_off + done, n), dst_off + done)
        done += n
