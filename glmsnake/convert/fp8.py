"""`glmsnake convert-fp8`: a bf16 HF checkpoint to the FP8 checkpoint SGLang and transformers read.

Design section 4 gives the format; fp8_math.py the exact math. This module plans
the output (which tensors are quantized, each shard's header, the index and
config), checks the input and the destination before writing anything, then
converts in parallel on a bounded thread pool whose tasks are ~64 MB groups of
a shard's tensors (several tasks pwrite into one shard file at planned offsets),
tensor by tensor and chunk by chunk (fp8_safetensors.py), so memory stays a few
MB per worker whatever the shard size; a second pool hashes finished shards.
On a CPU, bf16 weights go through fp8_math's C kernel (one pass over the bf16
bytes per chunk: scales and fp8 in one call, without the GIL); other dtypes,
the per-tensor strategy and GPUs use torch ops. Output goes to the staging
folder `.<save_dir>.partial` and is renamed to `save_dir` when complete; each finished shard leaves a
`.<shard>.ok.json` record there, so a rerun after a kill re-verifies (sha256)
and skips it.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import itertools
import json
import os
import re
import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import torch

from glmsnake import atomic
from glmsnake.convert.fp8_math import (
    FP8,
    ChunkQuantizer,
    Scheme,
    ceil_div,
    check_finite,
    native_kernel,
    nonfinite_error,
    scale_from_amax,
)
from glmsnake.convert.fp8_safetensors import (
    DTYPES,
    ITEMSIZE,
    Header,
    OutEntry,
    TensorInfo,
    copy_range,
    plan_layout,
    read_header,
    read_into,
    write_at,
)
from glmsnake.errors import GlmsnakeError

INDEX_NAME = "model.safetensors.index.json"
MARKER_NAME = "glmsnake.fp8.json"  # our provenance record inside the output folder
OK_SUFFIX = ".ok.json"
INCOMPLETE_SUFFIX = ".incomplete"

# The projections that are quantized: attention q/k/v/o and the dense, shared-expert and
# routed-expert gate/up/down, in every decoder layer including the MTP layer. Everything
# else (embeddings, lm_head, norms, router gate, expert bias, biases, eh_proj, shared_head)
# stays as it is. An allow-list, so an unknown tensor is kept rather than broken.
QUANTIZED_WEIGHT = re.compile(
    r"(^|\.)(self_attn\.[qkvo]_proj|mlp\.(shared_experts\.|experts\.\d+\.)?(gate|up|down)_proj)\.weight$"
)
FLOAT_DTYPES = {"BF16", "F16", "F32"}
FP8_SCALE_KEY = re.compile(r"\.(weight_scale(_inv)?|input_scale|activation_scale)$")

# Elements per chunk: a few MB of float32 scratch stays in cache on a CPU; a GPU wants big copies.
CHUNK_ELEMENTS = {"cpu": 1 << 19, "cuda": 1 << 23}  # cuda: 8M (16 MB of bf16) beat 32M by 1.4x on the H200
# The C kernel reads bf16 directly, no float32 scratch: input bytes per chunk (its output is half).
NATIVE_CHUNK_BYTES = 2 << 20
LOG_INTERVAL_S = 10.0


# ---------------------------------------------------------------- planning


def is_quantized(info: TensorInfo) -> bool:
    return bool(QUANTIZED_WEIGHT.search(info.name)) and len(info.shape) == 2 and info.dtype in FLOAT_DTYPES


@dataclass
class ShardPlan:
    name: str
    src: Header
    header: bytes  # the output file's header
    out: dict[str, TensorInfo]  # output tensors, offsets in the output data section
    quantized: list[str]

    @property
    def in_bytes(self) -> int:
        return self.src.file_size

    @property
    def out_size(self) -> int:
        return len(self.header) + max((t.end for t in self.out.values()), default=0)


def plan_shard(name: str, header: Header, scheme: Scheme) -> ShardPlan:
    entries, quantized = [], []
    for info in header.tensors.values():
        if is_quantized(info):
            quantized.append(info.name)
            entries.append(OutEntry(info.name, "F8_E4M3", info.shape))
            entries.append(OutEntry(scheme.scale_key(info.name), "F32", scheme.scale_shape(*info.shape)))
        else:
            entries.append(OutEntry(info.name, info.dtype, info.shape))
    head, out = plan_layout(entries, header.metadata if header.metadata is not None else {"format": "pt"})
    return ShardPlan(name, header, head, out, sorted(quantized))


def modules_to_not_convert(plans: list[ShardPlan]) -> list[str]:
    """Module names (key minus its last part) of the kept weights, for quantization_config."""
    quantized = {k.rsplit(".", 1)[0] for p in plans for k in p.quantized}
    kept = {k.rsplit(".", 1)[0] for p in plans for k in p.src.tensors if "." in k}
    return sorted(kept - quantized)


@dataclass
class Source:
    dir: Path
    config: dict
    shards: list[str]
    headers: dict[str, Header]


def inspect_source(model_dir: Path) -> Source:
    """Read config, index and every shard header; refuse anything incomplete or already FP8."""
    model_dir = Path(model_dir)
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise GlmsnakeError(f"{model_dir} has no config.json", "point --model-dir at a Hugging Face checkpoint folder")
    config = json.loads(config_path.read_text())
    if config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method", "?")
        raise GlmsnakeError(
            f"{model_dir} is already quantized (config.json has a {method} quantization_config)",
            "convert the bf16 checkpoint instead (the download_hf output), not an FP8 one",
        )
    weight_map = _weight_map(model_dir)
    shards = sorted(set(weight_map.values()))
    missing = [s for s in shards if not (model_dir / s).is_file()]
    if missing:
        raise GlmsnakeError(
            f"{model_dir} lacks {len(missing)} shard(s) its index names: {', '.join(missing)}",
            "re-run the download (snakemake download_hf, or huggingface-cli download) to complete it",
        )
    headers = {s: read_header(model_dir / s) for s in shards}
    for s, h in headers.items():
        _check_shard(model_dir, s, h, {k for k, v in weight_map.items() if v == s})
    return Source(model_dir, config, shards, headers)


def _weight_map(model_dir: Path) -> dict[str, str]:
    index = model_dir / INDEX_NAME
    if index.is_file():
        return json.loads(index.read_text())["weight_map"]
    single = model_dir / "model.safetensors"
    if single.is_file():
        return {k: single.name for k in read_header(single).tensors}
    raise GlmsnakeError(
        f"{model_dir} has neither {INDEX_NAME} nor model.safetensors",
        "point --model-dir at a Hugging Face safetensors checkpoint folder",
    )


def _check_shard(model_dir: Path, shard: str, header: Header, indexed: set[str]) -> None:
    fp8 = sorted(n for n, t in header.tensors.items() if t.dtype.startswith("F8") or FP8_SCALE_KEY.search(n))
    if fp8:
        raise GlmsnakeError(
            f"{model_dir / shard} already holds FP8 tensors or scales (e.g. {fp8[0]})",
            "convert the bf16 checkpoint instead, not an FP8 one",
        )
    if set(header.tensors) != indexed:
        lost = sorted(indexed - set(header.tensors))[:3]
        extra = sorted(set(header.tensors) - indexed)[:3]
        raise GlmsnakeError(
            f"{model_dir / shard} does not match {INDEX_NAME} (missing {lost}, unexpected {extra})",
            "re-download the checkpoint; its shards and index come from different versions",
        )


def check_destination(save_dir: Path, model_dir: Path) -> None:
    """Refuse a destination that holds anything but an earlier conversion of this same model."""
    save_dir, model_dir = Path(save_dir).absolute(), Path(model_dir).absolute()
    if save_dir == model_dir or model_dir in save_dir.parents or save_dir in model_dir.parents:
        raise GlmsnakeError(
            f"--save-dir {save_dir} overlaps --model-dir {model_dir}", "write the FP8 checkpoint to its own folder"
        )
    if not save_dir.exists():
        return
    if not save_dir.is_dir():
        raise GlmsnakeError(f"{save_dir} exists and is not a folder", "choose another --save-dir")
    contents = [p for p in save_dir.iterdir() if p.name != atomic.SENTINEL_NAME]
    if not contents:
        return
    marker = save_dir / MARKER_NAME
    source = None
    if marker.is_file():
        try:
            source = json.loads(marker.read_text()).get("source")
        except json.JSONDecodeError:
            source = None
    if source != str(model_dir):
        raise GlmsnakeError(
            f"{save_dir} already holds files that are not an FP8 conversion of {model_dir} "
            f"({len(contents)} entries, e.g. {min(p.name for p in contents)})",
            "choose an empty or new --save-dir, or remove that folder yourself if it is disposable",
        )


# ---------------------------------------------------------------- converting one shard


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


TASK_BYTES = 64 << 20  # one pool task: consecutive tensors of a shard, about this much input


class ShardJob:
    """One output shard written by several tasks at once (pwrite at planned offsets).

    The first task opens the files and writes the header; the last one to finish closes them.
    Tasks are queued lane by lane (_interleaved), so only about `workers` shards are open at a time.
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


def convert_shard(plan: ShardPlan, dst: Path, scheme: Scheme, device: torch.device, report=lambda n: None, times=None):
    """Convert one whole shard to `dst` in this thread (the pool splits shards into tasks instead)."""
    job = ShardJob(plan, dst)
    try:
        for infos in job.tasks:
            convert_tensors(job, infos, scheme, device, report, times or PhaseTimes())
            job.task_done()
    finally:
        job.close()


# ---------------------------------------------------------------- progress


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


class Progress:
    """A tqdm bar (bytes, shards) on a terminal; plain periodic lines otherwise (a log file)."""

    def __init__(self, total_bytes: int, total_shards: int, stream: TextIO | None = None, interval=LOG_INTERVAL_S):
        self.stream = stream or sys.stderr
        self.total_bytes, self.total_shards = total_bytes, total_shards
        self.bytes = self.shards = 0
        self.start = self.last = time.monotonic()
        self.interval = interval
        self.lock = threading.Lock()
        self.bar = None
        if self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="convert-fp8", file=self.stream)
            self.bar.set_postfix_str(f"shards 0/{total_shards}")

    def add_bytes(self, n: int) -> None:
        with self.lock:
            self.bytes += n
            if self.bar is not None:
                self.bar.update(n)
            elif time.monotonic() - self.last >= self.interval:
                self._line()

    def shard_done(self) -> None:
        with self.lock:
            self.shards += 1
            if self.bar is not None:
                self.bar.set_postfix_str(f"shards {self.shards}/{self.total_shards}")
            else:
                self._line()

    def _line(self) -> None:
        self.last = now = time.monotonic()
        rate = self.bytes / max(now - self.start, 1e-9)
        print(
            f"convert-fp8: {self.shards}/{self.total_shards} shards, {self.bytes / 1e9:.2f}/"
            f"{self.total_bytes / 1e9:.2f} GB, {rate / 1e9:.2f} GB/s, {now - self.start:.0f} s",
            file=self.stream,
            flush=True,
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------- the whole conversion


@dataclass
class ConvertResult:
    save_dir: Path
    shards: dict[str, str]  # name -> sha256
    converted: list[str]  # shards converted by this run (the rest were verified and kept)
    input_bytes: int
    seconds: float
    device: str
    modules_to_not_convert: list[str]
    phase_seconds: dict[str, float]


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise GlmsnakeError("--device cuda was asked for, but torch sees no CUDA GPU", "use --device cpu or auto")
    if device not in ("cpu", "cuda"):
        raise GlmsnakeError(f"unknown device {device!r}", "use cpu, cuda or auto")
    return torch.device(device)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """sha256 through one reused 1 MB buffer (atomic.sha256_file's 16 MB reads cost 32 MB of RSS per thread)."""
    h, buf = hashlib.sha256(), bytearray(chunk)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def _source_identity(path: Path) -> dict:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _ok_record(plan: ShardPlan, scheme: Scheme, sha256: str) -> dict:
    return {
        "sha256": sha256,
        "size": plan.out_size,
        "source": _source_identity(plan.src.path),
        "settings": {"strategy": scheme.strategy, "block_size": list(scheme.block_size)},
    }


def _verified(stage: Path, plan: ShardPlan, scheme: Scheme) -> str | None:
    """The shard's sha256 if the staging folder holds a finished, intact copy for these settings."""
    out, ok = stage / plan.name, stage / f".{plan.name}{OK_SUFFIX}"
    if not (out.is_file() and ok.is_file()):
        return None
    try:
        record = json.loads(ok.read_text())
    except json.JSONDecodeError:
        return None
    expect = _ok_record(plan, scheme, record.get("sha256", ""))
    if record != expect or out.stat().st_size != plan.out_size:
        return None
    return record["sha256"] if sha256_file(out) == record["sha256"] else None


def _run_task(job: ShardJob, infos, stage: Path, scheme: Scheme, device, progress, fsync: bool, times, hashers):
    """One task; the shard's last task hands the finished file to the hash pool and returns that future."""
    convert_tensors(job, infos, scheme, device, progress.add_bytes, times)
    if job.task_done():
        return hashers.submit(_hash_and_record, job.plan, job.dst, stage, scheme, progress, fsync, times)
    return None


def _hash_and_record(plan: ShardPlan, tmp: Path, stage: Path, scheme: Scheme, progress, fsync: bool, times) -> str:
    t = time.perf_counter()
    if fsync:
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        t = times.add("fsync", t)
    digest = sha256_file(tmp)
    times.add("hash", t)
    os.replace(tmp, stage / plan.name)
    atomic.write_json(stage / f".{plan.name}{OK_SUFFIX}", _ok_record(plan, scheme, digest))
    progress.shard_done()
    return plan.name, digest


def _resume(stage: Path, plans: list[ShardPlan], scheme: Scheme, workers: int, progress):
    """Shards a killed run already finished (re-hashed in parallel), and the ones still to do."""
    with ThreadPoolExecutor(workers, thread_name_prefix="fp8-verify") as pool:
        found = list(pool.map(lambda p: _verified(stage, p, scheme), plans))
    digests, todo = {}, []
    for plan, digest in zip(plans, found):
        if digest is None:
            todo.append(plan)
        else:
            digests[plan.name] = digest
            progress.add_bytes(plan.in_bytes)
            progress.shard_done()
    return digests, sorted(todo, key=lambda p: -p.in_bytes)  # largest first balances the pool


def _interleaved(jobs: list[ShardJob], lanes: int) -> list[tuple[ShardJob, list[TensorInfo]]]:
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


def _convert_all(todo: list[ShardPlan], stage: Path, scheme: Scheme, dev, workers: int, progress, fsync, times):
    """Run every shard's tasks on the worker pool; the hash pool checksums finished shards meanwhile."""
    jobs = [ShardJob(p, stage / f"{p.name}{INCOMPLETE_SUFFIX}") for p in todo]
    threads = torch.get_num_threads()
    # Workers are the parallelism, one torch thread each: OpenMP's spinning barriers made
    # 2 threads per worker 10x slower than 1 on this project's shared 2-core machine.
    torch.set_num_threads(1)
    try:
        with (
            ThreadPoolExecutor(workers, thread_name_prefix="fp8") as pool,
            ThreadPoolExecutor(workers, thread_name_prefix="fp8-hash") as hashers,
        ):
            args = (stage, scheme, dev, progress, fsync, times, hashers)
            tasks = [pool.submit(_run_task, job, infos, *args) for job, infos in _interleaved(jobs, workers)]
            try:
                hashes = [h for t in tasks if (h := t.result()) is not None]
                converted = time.perf_counter()
                digests = dict(h.result() for h in hashes)
                times.seconds["tail_wall"] = time.perf_counter() - converted  # hashing left after the last task
                return digests
            except BaseException:
                for t in tasks:  # stop soon: running tasks finish, queued ones are dropped
                    t.cancel()
                raise
    finally:
        for job in jobs:
            job.close()
        torch.set_num_threads(threads)


def convert(
    model_dir: Path,
    save_dir: Path,
    *,
    strategy: str = "block",
    block_size=(128, 128),
    workers: int = 4,
    device: str = "auto",
    fsync: bool = True,
    log: TextIO | None = None,
) -> ConvertResult:
    """Convert `model_dir` into `save_dir`; every check runs before anything is written."""
    t0 = time.monotonic()
    scheme = Scheme(strategy, tuple(block_size) if not isinstance(block_size, tuple) else block_size)
    if int(workers) < 1:
        raise GlmsnakeError(f"--workers must be at least 1, got {workers}", "pass e.g. --workers 4")
    dev = resolve_device(device)
    model_dir, save_dir = Path(model_dir).absolute(), Path(save_dir).absolute()
    source = inspect_source(model_dir)
    check_destination(save_dir, model_dir)
    plans = [plan_shard(s, source.headers[s], scheme) for s in source.shards]

    stage = atomic.temp_dir_for(save_dir)
    stage.mkdir(parents=True, exist_ok=True)
    progress, times = Progress(sum(p.in_bytes for p in plans), len(plans), log), PhaseTimes()
    try:
        digests, todo = _resume(stage, plans, scheme, int(workers), progress)
        times.seconds["setup_wall"] = time.monotonic() - t0  # checks and planning, before the first task
        digests.update(_convert_all(todo, stage, scheme, dev, int(workers), progress, fsync, times))
        done = time.monotonic()
    finally:
        progress.close()

    skip = modules_to_not_convert(plans)
    _write_metadata(stage, source, plans, scheme, skip, digests)
    _remove_strays(stage, {p.name for p in plans})
    atomic.publish_dir(stage, save_dir)
    times.seconds["finish_wall"] = time.monotonic() - done  # metadata, other files, publishing
    return ConvertResult(
        save_dir, dict(sorted(digests.items())), sorted(p.name for p in todo),
        sum(p.in_bytes for p in plans), time.monotonic() - t0, str(dev), skip, dict(times.seconds),
    )  # fmt: skip


def _write_metadata(stage: Path, source: Source, plans, scheme: Scheme, skip: list[str], digests) -> None:
    """config.json with quantization_config, the index, the other files, and our marker."""
    for p in sorted(source.dir.iterdir()):
        if p.is_file() and not _is_ours_to_write(p.name, source):
            shutil.copyfile(p, stage / p.name)
    config = dict(source.config, quantization_config=scheme.quantization_config(skip))
    atomic.write_bytes(stage / "config.json", (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
    weight_map = {name: p.name for p in plans for name in p.out}
    total = sum(t.nbytes for p in plans for t in p.out.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    atomic.write_json(stage / INDEX_NAME, index)
    marker = {
        "source": str(source.dir),
        "strategy": scheme.strategy,
        "block_size": list(scheme.block_size),
        "shards": dict(sorted(digests.items())),
    }
    atomic.write_json(stage / MARKER_NAME, marker)


def _is_ours_to_write(name: str, source: Source) -> bool:
    # Shards, index and config are written by us; glmsnake records and hidden files are not the model's.
    return (
        name.endswith(".safetensors") or name in (INDEX_NAME, "config.json") or name.startswith(("glmsnake.", "."))
    )  # fmt: skip


def _remove_strays(stage: Path, shards: set[str]) -> None:
    """Drop resume records and leftovers, so the published folder holds only the model."""
    for p in stage.iterdir():
        stray = p.name.startswith(".") or p.name.endswith(INCOMPLETE_SUFFIX)
        stray |= p.name.endswith(".safetensors") and p.name not in shards
        if stray:
            shutil.rmtree(p) if p.is_dir() else p.unlink()


# ---------------------------------------------------------------- entry points


def step(wf, sentinel: Path) -> None:
    """The convert_fp8 rule: wf.hf_dir -> wf.fp8_dir, then the sentinel, last."""
    from glmsnake import staleness

    f = wf.preset.convert.fp8
    sentinel = Path(sentinel)
    if sentinel.exists():
        sentinel.unlink()  # a stale sentinel must not outlive the folder it describes
    result = convert(
        wf.hf_dir, wf.fp8_dir, strategy=f.strategy, block_size=f.block_size, workers=f.workers, device=f.device
    )
    atomic.write_sentinel(
        sentinel,
        step="convert_fp8",
        settings=staleness.fp8(wf),
        shards=result.shards,
        source=str(wf.hf_dir),
        device=result.device,
        workers=f.workers,
        input_bytes=result.input_bytes,
        seconds=round(result.seconds, 3),
        converted=result.converted,
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="glmsnake convert-fp8",
        description="Convert a bf16 Hugging Face checkpoint to FP8 (e4m3) with per-block, per-channel or per-tensor scales.",
    )
    p.add_argument("--model-dir", required=True, type=Path, help="the bf16 HF checkpoint folder")
    p.add_argument("--save-dir", required=True, type=Path, help="where the FP8 checkpoint goes (new or empty)")
    p.add_argument("--strategy", default="block", choices=["block", "channel", "tensor"])
    p.add_argument("--block-size", nargs="+", default=["128", "128"], metavar="N", help="rows cols (block only)")
    p.add_argument("--workers", type=int, default=4, help="worker threads (on a CPU, one core each)")
    p.add_argument("--device", default="auto", choices=["cpu", "cuda", "auto"])
    p.add_argument("--no-fsync", action="store_true", help="skip fsync of each shard (faster, not crash-safe)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = convert(
            args.model_dir, args.save_dir, strategy=args.strategy, block_size=args.block_size,
            workers=args.workers, device=args.device, fsync=not args.no_fsync,
        )  # fmt: skip
    except GlmsnakeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"wrote {result.save_dir}: {len(result.shards)} shards ({len(result.converted)} converted), "
        f"{result.input_bytes / 1e9:.2f} GB in {result.seconds:.1f} s on {result.device}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
