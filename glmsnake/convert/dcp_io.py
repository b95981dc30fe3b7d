"""Byte-level I/O for the conversions: HF safetensors by row ranges, torch_dist (DCP) files.

Reading HF: the safetensors header (read and checked by safetensors_io) gives each
tensor's byte range, so a converter reads exactly the rows it needs with `preadv`
straight into the destination tensor (no mmap: pages of a whole shard never pile up
in the process's RSS).

Writing torch_dist: each writer rank appends its tensors to its own `__<rank>_0.distcp`
exactly as torch.distributed.checkpoint's FileSystemWriter does (one `torch.save` record
per tensor, raw bytes for objects; torch's DCP module itself is imported only for the index),
and returns the entries; one process then writes the
`.metadata` index (a pickled `Metadata`, torch's own classes) for all ranks. Tensors are
stored whole with their global shapes, so any TP/PP/EP layout can load them.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import threading
import uuid
import warnings
import contextlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping

import torch

if TYPE_CHECKING:
    from torch.distributed.checkpoint.metadata import Metadata

from glmsnake.convert.safetensors_io import DTYPES, INDEX_NAME, SINGLE_NAME, read_header
from glmsnake import knobs
from glmsnake.errors import GlmsnakeError

METADATA_NAME = ".metadata"
_PREAD_CHUNK = 1 << 30  # Linux returns at most ~2 GiB per read call


# --------------------------------------------------------------------------- HF safetensors, read side


@dataclass(frozen=True)
class HfEntry:
    file: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int


def _shard_entries(path: Path) -> dict[str, HfEntry]:
    """Every tensor of one shard file, with its absolute byte range."""
    h = read_header(path)
    return {
        key: HfEntry(path.name, DTYPES[t.dtype], t.shape, h.data_start + t.begin, h.data_start + t.end)
        for key, t in h.tensors.items()
    }


class HfReader:
    """Random access to an HF checkpoint's tensors by key and row range."""

    def __init__(self, hf_dir: Path):
        self.dir = Path(hf_dir)
        index = self.dir / INDEX_NAME
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        elif (self.dir / SINGLE_NAME).is_file():
            files = [SINGLE_NAME]
        else:
            raise GlmsnakeError(f"{self.dir} holds no {INDEX_NAME} or {SINGLE_NAME}", "point at an HF checkpoint folder")
        self.entries: dict[str, HfEntry] = {}
        for name in files:
            self.entries.update(_shard_entries(self.dir / name))
        self._fds: dict[str, int] = {}

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.entries[key].shape

    def dtype(self, key: str) -> torch.dtype:
        return self.entries[key].dtype

    def nbytes(self, key: str) -> int:
        e = self.entries[key]
        return e.end - e.start

    def _fd(self, file: str) -> int:
        if file not in self._fds:
            self._fds[file] = os.open(self.dir / file, os.O_RDONLY)
        return self._fds[file]

    def read_into(self, key: str, dest: torch.Tensor, row_start: int, row_stop: int) -> None:
        """Copy rows [row_start, row_stop) of `key` into the contiguous tensor `dest` (same dtype)."""
        e = self.entries[key]
        if dest.dtype != e.dtype:
            raise GlmsnakeError(f"{key} is {e.dtype} in the checkpoint, the conversion expected {dest.dtype}")
        if not dest.is_contiguous():
            raise ValueError(f"destination for {key} must be contiguous")
        rows = e.shape[0] if e.shape else 1
        row_bytes = (e.end - e.start) // max(rows, 1)
        want = (row_stop - row_start) * row_bytes
        if dest.numel() * dest.element_size() != want:
            raise ValueError(f"{key}: rows {row_start}:{row_stop} are {want} bytes, destination holds {dest.nbytes}")
        buf = memoryview(dest.view(-1).view(torch.uint8).numpy())
        fd, offset, done = self._fd(e.file), e.start + row_start * row_bytes, 0
        while done < want:
            n = os.preadv(fd, [buf[done : done + min(_PREAD_CHUNK, want - done)]], offset + done)
            if n <= 0:
                raise GlmsnakeError(f"{self.dir / e.file} ended early while reading {key} (truncated download?)")
            done += n

    def prefetch(self, keys: Iterable[str]) -> None:
        """Ask the kernel to start reading these tensors now (POSIX_FADV_WILLNEED returns at once), so
        the disk reads the next unit while this process lays out and writes the current one."""
        for key in keys:
            e = self.entries[key]
            if e.end > e.start:  # length 0 would mean "to the end of the file"
                with contextlib.suppress(OSError):  # a hint: a file system that refuses it reads as before
                    os.posix_fadvise(self._fd(e.file), e.start, e.end - e.start, os.POSIX_FADV_WILLNEED)

    def get(self, key: str) -> torch.Tensor:
        e = self.entries[key]
        out = torch.empty(e.shape, dtype=e.dtype)
        self.read_into(key, out, 0, e.shape[0] if e.shape else 1)
        return out

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> "HfReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------- torch_dist, write side


@dataclass(frozen=True)
class DcpEntry:
    """One stored item: a whole tensor (shape/dtype set) or a bytes object (shape None)."""

    fqn: str
    file: str
    offset: int
    length: int
    shape: tuple[int, ...] | None = None
    dtype: str | None = None  # "torch.bfloat16" (picklable across processes as text)


class Writeback:
    """Flushes a file's written pages to disk in a thread while the writer goes on producing, so the
    disk works while the CPU does and the final fsync finds little left (instead of the whole file)."""

    def __init__(self, fd: int, every: int):
        self.fd, self.every, self.pending = fd, every, 0
        self._due, self._stop = threading.Event(), False
        self.error: OSError | None = None  # Linux reports a writeback error once: it must reach the writer
        self._thread = threading.Thread(target=self._loop, name="glmsnake-writeback", daemon=True)
        self._thread.start()

    def wrote(self, nbytes: int) -> None:
        self._raise()
        self.pending += nbytes
        if self.every and self.pending >= self.every:
            self.pending = 0
            self._due.set()

    def _loop(self) -> None:
        while True:
            self._due.wait()
            self._due.clear()
            if self._stop:
                return
            try:
                os.fdatasync(self.fd)
            except OSError as e:
                self.error = e
                return

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        self._stop = True
        self._due.set()
        self._thread.join()
        self._raise()


@contextmanager
def _without_crc32():
    """torch.save without the zip records' CRC32: torch.load (and so DCP and Megatron) never checks it,
    and computing it was a third of one writer's time (about 1 GB/s, one core). torch 2.5 has a
    setter for it; older torch: as is."""
    try:
        from torch.utils.serialization import config
    except ImportError:
        get, set_ = (getattr(torch.serialization, f"{w}_crc32_options", None) for w in ("get", "set"))
        if get is None or set_ is None:
            yield
            return
        before = get()
        set_(False)
        try:
            yield
        finally:
            set_(before)
        return
    before = config.save.compute_crc32
    config.save.compute_crc32 = False
    try:
        yield
    finally:
        config.save.compute_crc32 = before


class DistcpFile:
    """Appends items to one `.distcp` file the way torch's FileSystemWriter lays them out."""

    def __init__(self, folder: Path, rank: int, index: int = 0):
        self.name = f"__{rank}_{index}.distcp"
        self.path = Path(folder) / self.name
        self.f = open(self.path, "wb")
        self.entries: list[DcpEntry] = []
        self.writeback = Writeback(self.f.fileno(), knobs.WRITEBACK_MB.as_int() << 20)

    def add_tensor(self, fqn: str, tensor: torch.Tensor) -> None:
        # torch.save stores the whole storage: only save tensors that own exactly their bytes.
        if tensor.untyped_storage().nbytes() != tensor.nbytes or not tensor.is_contiguous():
            tensor = tensor.clone(memory_format=torch.contiguous_format)
        start = self.f.tell()
        with _without_crc32():
            torch.save(tensor, self.f)
        self.entries.append(DcpEntry(fqn, self.name, start, self.f.tell() - start, tuple(tensor.shape), str(tensor.dtype)))
        self.writeback.wrote(self.f.tell() - start)

    def add_bytes(self, fqn: str, data: bytes) -> None:
        start = self.f.tell()
        self.f.write(data)
        self.entries.append(DcpEntry(fqn, self.name, start, len(data)))

    def close(self) -> list[DcpEntry]:
        try:
            try:
                self.f.flush()
            finally:
                self.writeback.close()  # stops the thread, and raises what it met
            os.fsync(self.f.fileno())
        finally:
            self.f.close()
        return self.entries


def none_object_bytes() -> bytes:
    """A ShardedObject holding None, as Megatron stores it: torch.save of the list of local objects."""
    buf = io.BytesIO()
    torch.save([None], buf)
    return buf.getvalue()


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name.removeprefix("torch."))


def import_dcp() -> None:
    """torch.distributed.checkpoint, which the index needs: 2 s of imports (sympy, through DTensor) that
    a writer rank pays only where it writes the index, in a thread while it writes its data."""
    import torch.distributed.checkpoint.filesystem  # noqa: F401


def build_metadata(entries: Iterable[DcpEntry]) -> Metadata:
    """The DCP index for whole-tensor entries of every rank (one chunk per tensor at offset 0)."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (
        BytesStorageMetadata,
        ChunkStorageMetadata,
        Metadata,
        MetadataIndex,
        StorageMeta,
        TensorProperties,
        TensorStorageMetadata,
    )

    sd_md: dict[str, Any] = {}
    storage: dict[Any, Any] = {}
    for e in sorted(entries, key=lambda e: e.fqn):
        if e.fqn in sd_md:
            raise GlmsnakeError(f"two writers stored {e.fqn}", "this is a bug in the writer's share plan")
        if e.shape is None:
            sd_md[e.fqn] = BytesStorageMetadata()
            storage[MetadataIndex(e.fqn)] = _StorageInfo(e.file, e.offset, e.length)
            continue
        size = torch.Size(e.shape)
        zeros = torch.Size([0] * len(e.shape))
        sd_md[e.fqn] = TensorStorageMetadata(
            properties=TensorProperties(dtype=_dtype(e.dtype)), size=size,
            chunks=[ChunkStorageMetadata(offsets=zeros, sizes=size)],
        )
        storage[MetadataIndex(e.fqn, zeros)] = _StorageInfo(e.file, e.offset, e.length)
    md = Metadata(state_dict_metadata=sd_md, planner_data={}, storage_data=storage,
                  storage_meta=StorageMeta(save_id=uuid.uuid4().hex))
    try:
        from torch.distributed.checkpoint.filesystem import CURRENT_DCP_VERSION

        md.version = CURRENT_DCP_VERSION
    except ImportError:  # older torch: no version field
        pass
    return md


def write_metadata(folder: Path, entries: Iterable[DcpEntry]) -> Metadata:
    md = build_metadata(entries)
    tmp = Path(folder) / f"{METADATA_NAME}.tmp"
    with open(tmp, "wb") as f:
        pickle.dump(md, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, Path(folder) / METADATA_NAME)
    return md


# --------------------------------------------------------------------------- torch_dist, read side


def read_metadata(folder: Path) -> Metadata:
    from torch.distributed.checkpoint import FileSystemReader

    return FileSystemReader(str(folder)).read_metadata()


def damaged_files(folder: Path) -> list[str]:
    """What is wrong with a DCP checkpoint's files, read from its index alone (no payload is read):
    an unreadable index, a data file that is missing or shorter than the index says (truncated)."""
    folder = Path(folder)
    try:
        md = read_metadata(folder)
    except Exception as e:  # noqa: BLE001 - any failure to read the index makes the checkpoint unusable
        return [f"{folder / METADATA_NAME}: unreadable ({type(e).__name__}: {str(e)[:200]})"]
    need: dict[str, int] = {}
    for info in (md.storage_data or {}).values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    problems = []
    for rel, end in sorted(need.items()):
        path = folder / rel
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif path.stat().st_size < end:
            problems.append(f"{path}: {path.stat().st_size} bytes, its index needs {end}")
    return problems


def tensor_index(md: Metadata) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """{fqn: (global shape, dtype)} of every tensor in a DCP checkpoint."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    return {
        k: (tuple(v.size), v.properties.dtype)
        for k, v in md.state_dict_metadata.items()
        if isinstance(v, TensorStorageMetadata)
    }


class DcpReader:
    """Loads whole tensors from a torch_dist folder with torch's own reader (any chunking)."""

    def __init__(self, folder: Path):
        from torch.distributed.checkpoint import FileSystemReader

        self.folder = Path(folder)
        md = read_metadata(self.folder)
        self.index = tensor_index(md)

        class _Cached(FileSystemReader):  # the index is read once, not once per layer
            def read_metadata(self_inner, *a, **k):
                return md

        self._reader = _Cached(str(self.folder))

    def load(self, keys: Iterable[str], dtype: Mapping[str, torch.dtype] | None = None) -> dict[str, torch.Tensor]:
        import torch.distributed.checkpoint as dcp

        out = {}
        for k in keys:
            if k not in self.index:
                raise GlmsnakeError(f"{self.folder} has no tensor {k}", "the checkpoint is not a GLM-4-MoE torch_dist checkpoint of this architecture")
            shape, stored = self.index[k]
            out[k] = torch.empty(shape, dtype=(dtype or {}).get(k, stored))
        if out:
            with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
                warnings.simplefilter("ignore", UserWarning)
                dcp.load(out, storage_reader=self._reader, no_dist=True)
        return out
