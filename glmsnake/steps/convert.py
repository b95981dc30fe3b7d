"""Rules convert_torch_dist (a multi-node job) and convert_fp8 (one node)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from glmsnake import architectures, atomic, contents, disk, publish, staleness
from glmsnake.config import Workflow
from glmsnake.convert import fp8
from glmsnake.convert import torch_dist as td
from glmsnake.convert.megatron_names import LAYOUTS
from glmsnake.convert.slime_converter import SlimeConverter
from glmsnake.launch import JobSpec, run_job
from glmsnake.steps.common import allocation, check_hf_unchanged, cluster, job_record

JOB = "convert_torch_dist"


def slime_converter(wf: Workflow, save_dir: Path) -> SlimeConverter:
    td_cfg, train = wf.preset.convert.torch_dist, wf.preset.train
    return SlimeConverter(
        model_args=tuple(wf.preset.model.render()), hf_dir=str(wf.paths.hf_dir), save_dir=str(save_dir),
        nnodes=td_cfg.allocation.nodes, nproc_per_node=td_cfg.writers_per_node,
        slime_dir=train.slime_dir, megatron_dir=train.megatron_dir,
    )


def convert_torch_dist(wf: Workflow, sentinel: Path) -> None:
    """HF -> torch_dist release checkpoint on the step's allocation, then the sentinel."""
    cfg = wf.preset.convert.torch_dist
    paths = wf.paths
    final = paths.torch_dist_dir
    t0 = time.monotonic()
    check_hf_unchanged(wf)
    hf_config = td.read_hf_config(paths.hf_dir)
    architectures.check_hf_config(hf_config, wf.preset.model, str(paths.hf_dir))  # before any allocation
    # bf16 in, bf16 out: about the HF shards' size, next to any earlier release until it is replaced.
    disk.require_room(final, disk.weight_bytes(paths.hf_dir), "the torch_dist conversion")
    if cfg.backend == "glmsnake":
        plan = td.plan_conversion(paths.hf_dir, wf.preset.model, LAYOUTS[cfg.layout])
        stage = td.fresh_stage(final)
        task = td.WriterTask(plan, str(stage / td.RELEASE), None, {"hf_dir": str(paths.hf_dir)})
        tasks_per_node = cfg.writers_per_node
    else:
        stage = publish.temp_dir_for(final)
        shutil.rmtree(stage, ignore_errors=True)
        stage.mkdir(parents=True)
        task = slime_converter(wf, stage)
        tasks_per_node = 1
    job = JobSpec(name=JOB, allocation=allocation(cfg.allocation), log_dir=paths.job_logs(JOB),
                  tasks_per_node=tasks_per_node, room_bytes=disk.weight_bytes(paths.hf_dir))
    rec = run_job(cluster(wf), job, task)
    if cfg.backend == "glmsnake":
        atomic.write_bytes(stage / td.TRACKER_NAME, td.RELEASE.encode())
    rel = td.verify_release(stage)
    info = td.describe_checkpoint(rel, hf_config)
    publish.publish_dir(stage, final)
    atomic.write_sentinel(
        sentinel, step="convert_torch_dist", settings=staleness.torch_dist(wf),
        backend=cfg.backend, hf_dir=str(paths.hf_dir), output=str(final),
        writers=cfg.allocation.nodes * tasks_per_node,
        job=job_record(rec), seconds=round(time.monotonic() - t0, 3), contents=contents.record(final), **info,
    )


def convert_fp8(wf: Workflow, sentinel: Path) -> None:
    """The HF folder -> the FP8 folder, then the sentinel, last."""
    f = wf.preset.convert.fp8
    sentinel = Path(sentinel)
    if sentinel.exists():
        sentinel.unlink()  # a stale sentinel must not outlive the folder it describes
    check_hf_unchanged(wf)
    result = fp8.convert(
        wf.paths.hf_dir, wf.paths.fp8_dir, strategy=f.strategy, block_size=f.block_size, workers=f.workers,
        device=f.device,
    )
    atomic.write_sentinel(
        sentinel,
        step="convert_fp8",
        settings=staleness.fp8(wf),
        shards=result.shards,
        source=str(wf.paths.hf_dir),
        device=result.device,
        workers=f.workers,
        input_bytes=result.input_bytes,
        seconds=round(result.seconds, 3),
        converted=result.converted,
        contents=contents.record(wf.paths.fp8_dir, hashes=result.shards),
    )
