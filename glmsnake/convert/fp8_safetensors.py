"""Streaming safetensors I/O: read a tensor's rows, write a file tensor by tensor.

The format is an 8-byte little-endian header length N, N bytes of JSON
({name: {dtype, shape, data_offsets}} plus "__metadata__"), then the tensor
bytes. We read with pread (no mmap, so page-cache pages never count as our
RSS) and write with pwrite at offsets planned up front, so a shard is never
held in memory. The planned layout reproduces `safetensors.torch.save_file`
byte for byte (a test checks this), so our shards equal a plain save_file.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from glmsnake.errors import GlmsnakeError

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


def _corrupt(path: Path, why: str) -> GlmsnakeError:
    return GlmsnakeError(
        f"{path} is not a complete safetensors file: {why}",
        "re-download or re-create this shard (an interrupted copy leaves a truncated file)",
    )


def read_header(path: Path) -> Header:
    """Parse and validate a safetensors header; a truncated file is an error, never a crash later."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _corrupt(path, f"only {size} bytes")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER or 8 + n > size:
            raise _corrupt(path, f"header length {n} does not fit in {size} bytes")
        try:
            raw = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise _corrupt(path, f"header is not JSON ({e})") from None
    metadata = raw.pop("__metadata__", None)
    tensors = {}
    for name, t in raw.items():
        try:
            begin, end = t["data_offsets"]
            info = TensorInfo(name, t["dtype"], tuple(int(d) for d in t["shape"]), int(begin), int(end))
        except (KeyError, TypeError, ValueError):
            raise _corrupt(path, f"bad header entry for {name!r}") from None
        if info.dtype not in ITEMSIZE:
            raise GlmsnakeError(f"{path}: tensor {name} has dtype {info.dtype}, which glmsnake cannot read")
        if info.nbytes != info.numel * ITEMSIZE[info.dtype] or info.begin < 0:
            raise _corrupt(path, f"{name} offsets {begin}..{end} disagree with shape {list(info.shape)}")
        tensors[name] = info
    data_len = max((t.end for t in tensors.values()), default=0)
    if 8 + n + data_len != size:
        raise _corrupt(path, f"header promises {8 + n + data_len} bytes, the file has {size}")
    return Header(path, 8 + n, tensors, metadata, size)


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
