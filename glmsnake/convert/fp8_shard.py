"""The per-shard conversion engine: a shard's tensors into its output file, at planned offsets.

A shard is cut into ~64 MB tasks of consecutive tensors (`ShardJob`; several tasks pwrite
into one output file at once), and `interleaved` queues the tasks lane by lane so that
concurrent workers mostly write different files. A task goes tensor by tensor and chunk by
chunk through per-thread buffers that are reused (safetensors_io's pread and pwrite), so
memory stays a few MB per worker whatever the shard size. On a CPU, bf16 weights go through
fp8_kernel's C kernel (one pass over the bf16 bytes per chunk: scales and fp8 in one call,
without the GIL); other dtypes, the per-tensor strategy and GPUs use fp8_math's torch ops;
tensors that are not quantized are copied byte for byte. `PhaseTimes` sums the seconds each
phase (read, compute, write, ...) takes over all workers.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from glmsnake.convert.fp8_kernel import native_kernel
from glmsnake.convert.fp8_math import (
    FP8,
    ChunkQuantizer,
    Scheme,
    ceil_div,
    check_finite,
    nonfinite_error,
    scale_from_amax,
)
from glmsnake.convert.fp8_plan import ShardPlan
from glmsnake.convert.safetensors_io import (
    DTYPES,
    ITEMSIZE,
    Header,
    TensorInfo,
    copy_range,
    read_into,
    write_at,
)

# Elements per chunk: a few MB of float32 scratch stays in cache on a CPU; a GPU wants big copies.
CHUNK_ELEMENTS = {"cpu": 1 << 19, "cuda": 1 << 23}  # cuda: 8M (16 MB of bf16) beat 32M by 1.4x on the H200
# The C kernel reads bf16 directly, no float32 scratch: input bytes per chunk (its output is half).
NATIVE_CHUNK_BYTES = 2 << 20


class PhaseTimes:
    """Seconds per phase (read, compute, write, hash), summed over workers: where the time goes."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.lock = threading.Lock()

    def add(self, phase: str, since: float) -> float:
        now = time.perf_counter()
        with self.lock:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + now - since
        return now


# ---------------------------------------------------------------- per-thread buffers, chunks of rows


class _Workspace(threading.local):
    """Per-thread buffers, grown on demand and reused for every chunk the thread converts."""

    def get(self, scheme: Scheme, device: torch.device) -> _Buffers:
        bufs = getattr(self, "bufs", None)
        if bufs is None or bufs.scheme != scheme or bufs.device != device:
            bufs = self.bufs = _Buffers(scheme, device)
        return bufs


@dataclass
class _Buffers:
    scheme: Scheme
    device: torch.device
    quantizer: ChunkQuantizer = field(init=False)
    stream: object = field(init=False, default=None)
    times: PhaseTimes = field(init=False, default=None)
    mark: float = field(init=False, default=0.0)
    _host: dict = field(init=False, default_factory=dict)
    _dev: dict = field(init=False, default_factory=dict)

    def __post_init__(self):
        self.quantizer = ChunkQuantizer(self.scheme, self.device)
        if self.device.type == "cuda":
            self.stream = torch.cuda.Stream(self.device)

    def host(self, key: str, nbytes: int, pin: bool = True) -> torch.Tensor:
        """A uint8 host buffer (pinned for a GPU unless `pin` is False, so copies are asynchronous DMA)."""
        buf = self._host.get(key)
        if buf is None or buf.numel() < nbytes:
            t = time.perf_counter()
            pin = pin and self.device.type == "cuda"
            buf = self._host[key] = torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=pin)
            if self.times is not None:
                self.times.add("alloc", t)
        return buf

    def dev(self, nbytes: int) -> torch.Tensor:
        buf = self._dev.get("in")
        if buf is None or buf.numel() < nbytes:
            buf = self._dev["in"] = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=self.device)
        return buf


_workspace = _Workspace()


def chunk_rows(rows: int, cols: int, scheme: Scheme, device: torch.device) -> int:
    m = scheme.row_multiple()
    target = CHUNK_ELEMENTS[device.type] // max(1, scheme.padded_cols(cols))
    return max(m, target // m * m) if rows else 1


def _read_rows(bufs: _Buffers, fd: int, info: TensorInfo, data_start: int, r0: int, r: int) -> torch.Tensor:
    """Rows r0:r0+r of a 2-D tensor, on the worker's device."""
    cols = info.shape[1]
    nbytes = r * cols * ITEMSIZE[info.dtype]
    if bufs.stream is not None:
        bufs.stream.synchronize()  # the last upload from the pinned buffer must finish before we refill it
    buf = bufs.host("in", nbytes)
    t = time.perf_counter()
    raw = read_into(fd, buf, data_start + info.begin + r0 * cols * ITEMSIZE[info.dtype], nbytes)
    bufs.mark = bufs.times.add("read", t)
    if bufs.device.type == "cuda":
        raw = bufs.dev(nbytes)[:nbytes].copy_(raw, non_blocking=True)
    return raw.view(DTYPES[info.dtype]).view(r, cols)


def _write_fp8(bufs: _Buffers, fd: int, q: torch.Tensor, offset: int) -> None:
    t = bufs.mark  # since the chunk was read: quantizing (and on a GPU the copies there and back)
    if bufs.device.type == "cuda" or not q.is_contiguous():
        host = bufs.host("out", q.numel())[: q.numel()].view(FP8).view(q.shape)
        host.copy_(q, non_blocking=True)
        if bufs.stream is not None:
            bufs.stream.synchronize()
        q = host
    t = bufs.times.add("compute", t)
    write_at(fd, q, offset)
    bufs.times.add("write", t)


# ---------------------------------------------------------------- one tensor: the C kernel or torch ops


def _native_for(bufs: _Buffers, info: TensorInfo):
    """The C kernel if it serves this tensor (bf16, block or channel groups, on the CPU), else None."""
    if bufs.device.type != "cpu" or info.dtype != "BF16" or bufs.scheme.strategy == "tensor":
        return None
    return native_kernel()


def _quantize_tensor_native(kernel, bufs, src_fd, src: Header, info: TensorInfo, dst_fd, plan, report) -> None:
    """Chunks of whole block-rows: pread the bf16 bytes, one C call (scales + fp8), pwrite."""
    scheme = bufs.scheme
    rows, cols = info.shape
    g0, g1 = scheme.block_size if scheme.strategy == "block" else (1, cols)
    out_start = len(plan.header)
    w_out, s_out = plan.out[info.name], plan.out[scheme.scale_key(info.name)]
    scales = torch.empty(ceil_div(rows, g0), ceil_div(cols, g1), dtype=torch.float32)
    step = max(g0, NATIVE_CHUNK_BYTES // max(1, 2 * cols) // g0 * g0)
    in_buf, out_buf = bufs.host("in", min(rows, step) * cols * 2), bufs.host("out", min(rows, step) * cols)
    row_bytes = cols * 2
    for r0 in range(0, rows, step):
        r = min(step, rows - r0)
        t = time.perf_counter()
        raw = read_into(src_fd, in_buf, src.data_start + info.begin + r0 * row_bytes, r * row_bytes)
        t = bufs.times.add("read", t)
        q, first = out_buf[: r * cols], r0 // g0
        chunk_scales = scales[first : first + ceil_div(r, g0)]
        if not kernel.quantize(raw.view(torch.bfloat16).view(r, cols), g0, g1, chunk_scales, q):
            raise nonfinite_error(info.name)
        t = bufs.times.add("compute", t)
        write_at(dst_fd, q, out_start + w_out.begin + r0 * cols)
        bufs.times.add("write", t)
        report(r * row_bytes)
    write_at(dst_fd, scales, out_start + s_out.begin)


def _quantize_tensor(bufs, src_fd, src: Header, info: TensorInfo, dst_fd, plan: ShardPlan, report) -> None:
    kernel = _native_for(bufs, info)
    if kernel is not None:
        return _quantize_tensor_native(kernel, bufs, src_fd, src, info, dst_fd, plan, report)
    scheme, qz = bufs.scheme, bufs.quantizer
    rows, cols = info.shape
    dtype = DTYPES[info.dtype]
    out_start = len(plan.header)
    w_out, s_out = plan.out[info.name], plan.out[scheme.scale_key(info.name)]
    step = chunk_rows(rows, cols, scheme, bufs.device)
    spans = [(r0, min(step, rows - r0)) for r0 in range(0, rows, step)]
    # Scales stay on the device until the tensor is done: one copy back and one finiteness check
    # per tensor, not a GPU sync per chunk (a non-finite chunk's bytes only reach the staging file).
    scales = torch.empty(s_out.shape, dtype=torch.float32, device=bufs.device)

    if scheme.strategy == "tensor":
        # One scale for the whole tensor: a first pass over the chunks finds its amax.
        amax = torch.zeros((1, 1), dtype=torch.float32, device=bufs.device)
        for r0, r in spans:
            amax = torch.maximum(amax, qz.amax(qz.load(_read_rows(bufs, src_fd, info, src.data_start, r0, r))))
        tensor_scale = scale_from_amax(amax, dtype)
        check_finite(tensor_scale, info.name)
        scales.copy_(tensor_scale.view(1))

    for r0, r in spans:
        f = qz.load(_read_rows(bufs, src_fd, info, src.data_start, r0, r))
        if scheme.strategy == "tensor":
            scale = tensor_scale
        else:
            scale = scale_from_amax(qz.amax(f), dtype)
            first = r0 // scheme.row_multiple()
            scales[first : first + scale.shape[0]].copy_(scale.view(-1, scales.shape[1]))
        q = qz.quantize(f, scale, r, cols)
        _write_fp8(bufs, dst_fd, q, out_start + w_out.begin + r0 * cols)
        report(r * cols * ITEMSIZE[info.dtype])
    scales = scales.cpu()
    check_finite(scales, info.name)
    write_at(dst_fd, scales, out_start + s_out.begin)


# ---------------------------------------------------------------- one shard: tasks, and lanes of tasks


TASK_BYTES = 64 << 20  # one pool task: consecutive tensors of a shard, about this much input


class ShardJob:
    """One output shard written by several tasks at once (pwrite at planned offsets).

    The first task opens the files and writes the header; the last one to finish closes them.
    Tasks are queued lane by lane (interleaved), so only about `workers` shards are open at a time.
    """

    def __init__(self, plan: ShardPlan, dst: Path):
        self.plan, self.dst = plan, dst
        self.tasks = _task_groups(plan)
        self._left = len(self.tasks)
        self._fds: tuple[int, int] | None = None
        self._lock = threading.Lock()

    def fds(self) -> tuple[int, int]:
        with self._lock:
            if self._fds is None:
                src = os.open(self.plan.src.path, os.O_RDONLY)
                dst = os.open(self.dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                self._fds = (src, dst)
                os.ftruncate(dst, self.plan.out_size)
                write_at(dst, self.plan.header, 0)
            return self._fds

    def task_done(self) -> bool:
        """Count a finished task; True for the last, which closes the files."""
        with self._lock:
            self._left -= 1
            last = self._left == 0
        if last:
            self.close()
        return last

    def close(self) -> None:
        with self._lock:
            fds, self._fds = self._fds, None
        for fd in fds or ():
            os.close(fd)


def _task_groups(plan: ShardPlan) -> list[list[TensorInfo]]:
    groups, group, size = [], [], 0
    for info in sorted(plan.src.tensors.values(), key=lambda t: t.begin):  # read each file front to back
        group.append(info)
        size += info.nbytes
        if size >= TASK_BYTES:
            groups.append(group)
            group, size = [], 0
    return [*groups, group] if group or not groups else groups


def convert_tensors(job: ShardJob, infos: list[TensorInfo], scheme: Scheme, device: torch.device, report, times):
    """Convert some tensors of a shard into its output file, chunk by chunk."""
    bufs = _workspace.get(scheme, device)
    bufs.times = times
    src_fd, dst_fd = job.fds()
    plan = job.plan
    ctx = torch.cuda.stream(bufs.stream) if bufs.stream is not None else contextlib.nullcontext()
    with ctx, torch.inference_mode():
        for info in infos:
            if plan.out[info.name].dtype == "F8_E4M3":
                _quantize_tensor(bufs, src_fd, plan.src, info, dst_fd, plan, report)
            else:
                t = time.perf_counter()
                src_off, dst_off = plan.src.data_start + info.begin, len(plan.header) + plan.out[info.name].begin
                copy_range(src_fd, src_off, dst_fd, dst_off, info.nbytes, lambda: bufs.host("copy", 8 << 20, pin=False))
                bufs.times.add("copy", t)
                report(info.nbytes)


def interleaved(jobs: list[ShardJob], lanes: int) -> list[tuple[ShardJob, list[TensorInfo]]]:
    """All tasks, queued so that concurrent workers mostly write different shards.

    Buffered writes to one file serialize on its inode lock, so workers sharing a shard
    queue up behind each other (on the H200 the write phase was the largest). Shards are
    dealt, largest first, to `lanes` lanes of about equal bytes, and the queue takes one
    task of each lane in turn; a worker whose lane is done helps the others, so the end
    stays balanced. About `lanes` shards are open at a time, and finished shards are
    hashed while the rest convert.
    """
    lane_jobs: list[list[ShardJob]] = [[] for _ in range(max(1, lanes))]
    load = [0] * len(lane_jobs)
    for job in sorted(jobs, key=lambda j: -j.plan.in_bytes):
        i = load.index(min(load))
        lane_jobs[i].append(job)
        load[i] += job.plan.in_bytes
    per_lane = [[(job, infos) for job in lane for infos in job.tasks] for lane in lane_jobs]
    return [task for turn in itertools.zip_longest(*per_lane) for task in turn if task is not None]
