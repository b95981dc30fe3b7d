"""`glmsnake convert-fp8`: a bf16 HF checkpoint to the FP8 checkpoint SGLang and transformers read.

This module runs the whole conversion. `convert` checks the source and the destination and
plans every shard (fp8_plan.py) before writing anything, then runs the shards' tasks on a
bounded thread pool (fp8_shard.py, the math in fp8_math.py and fp8_kernel.py) while a second
pool hashes the finished shards, and last writes config.json with its quantization_config,
the index, the other files of the source and our provenance marker. Output goes to the
staging folder `.<save_dir>.partial` and is renamed to `save_dir` when complete; each
finished shard leaves a `.<shard>.ok.json` record there, so a rerun after a kill re-verifies
(sha256) and skips it. Progress goes to a terminal as a bar, to a log as periodic lines.
`main` and `build_parser` are the command line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import torch

from glmsnake import atomic, disk, publish
from glmsnake.convert.fp8_math import Scheme
from glmsnake.convert.fp8_plan import (
    MARKER_NAME,
    ShardPlan,
    Source,
    check_destination,
    inspect_source,
    modules_to_not_convert,
    plan_shard,
)
from glmsnake.convert.fp8_shard import PhaseTimes, ShardJob, convert_tensors, interleaved
from glmsnake.convert.safetensors_io import INDEX_NAME
from glmsnake.errors import GlmsnakeError

OK_SUFFIX = ".ok.json"
INCOMPLETE_SUFFIX = ".incomplete"
LOG_INTERVAL_S = 10.0


# ---------------------------------------------------------------- progress


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
    return record["sha256"] if atomic.sha256_file(out) == record["sha256"] else None


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
    digest = atomic.sha256_file(tmp)
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
            tasks = [pool.submit(_run_task, job, infos, *args) for job, infos in interleaved(jobs, workers)]
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
    pattern = source.quantized_weight
    plans = [plan_shard(s, source.headers[s], scheme, pattern) for s in source.shards]

    stage = publish.temp_dir_for(save_dir)
    disk.require_room(save_dir, sum(p.out_size for p in plans) - disk.bytes_under(stage),
                      f"FP8 conversion of {len(plans)} shards")
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
    publish.publish_dir(stage, save_dir)
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
