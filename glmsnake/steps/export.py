"""Rule export_hf: a run's latest checkpoint back to an HF folder (`<run>/hf`), then the sentinel."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from glmsnake import architectures, atomic, contents, disk, publish, staleness
from glmsnake.config import Workflow
from glmsnake.convert import torch_dist as td
from glmsnake.convert.dcp_io import METADATA_NAME, HfReader
from glmsnake.convert.safetensors_io import INDEX_NAME
from glmsnake.convert.slime_export import SlimeExporter
from glmsnake.errors import GlmsnakeError
from glmsnake.launch import JobSpec, run_job
from glmsnake.steps.common import allocation, cluster, job_record


def export_hf(wf: Workflow, sentinel: Path, run: str) -> None:
    t0 = time.monotonic()
    run_paths = wf.paths.run(run)
    trained = atomic.read_json(run_paths.sentinel) if run_paths.sentinel.is_file() else {}
    ckpt = td.find_checkpoint(run_paths.checkpoints)
    if "final_checkpoint" in trained:  # the checkpoint the training result names, unchanged
        contents.require_unchanged(ckpt, trained["final_checkpoint_contents"], f"checkpoint {ckpt}", "train_run")
        if str(ckpt) != trained["final_checkpoint"]:
            raise GlmsnakeError(f"{run_paths.checkpoints} now points at {ckpt.name}, but training ended with "
                                f"{trained['final_checkpoint']}", "rerun training: snakemake --forcerun train_run")
    final = run_paths.hf
    stage = publish.temp_dir_for(final)
    shutil.rmtree(stage, ignore_errors=True)
    disk.require_room(final, disk.weight_bytes(wf.paths.hf_dir), f"exporting run {run} to HF")  # same tensors as the input
    if wf.preset.export.backend == "slime":
        summary = slime_export(wf, run, ckpt, stage)
    else:
        summary = {"backend": "glmsnake", **td.export_hf(ckpt, wf.paths.hf_dir, stage)}
    publish.publish_dir(stage, final)
    atomic.write_sentinel(
        sentinel, step="export_hf", settings=staleness.export_hf(wf, run), checkpoint=str(ckpt),
        metadata_sha256=atomic.sha256_file(ckpt / METADATA_NAME), output=str(final),
        seconds=round(time.monotonic() - t0, 3), contents=contents.record(final), **summary,
    )


def slime_export(wf: Workflow, run: str, ckpt: Path, stage: Path) -> dict:
    """slime's converter on an allocation of its own (in the container), then the same check as
    any HF folder gets: exactly the tensor set of the run's config.json."""
    train = wf.runs[run].train
    task = SlimeExporter(iteration_dir=str(ckpt), output_dir=str(stage), origin_hf_dir=str(wf.paths.hf_dir),
                         vocab_size=wf.preset.model.vocab_size, slime_dir=train.slime_dir, megatron_dir=train.megatron_dir)
    name = f"export_{run}"
    rec = run_job(cluster(wf), JobSpec(name=name, allocation=allocation(wf.preset.export.allocation),
                                       log_dir=wf.paths.job_logs(name)), task)
    if not (stage / INDEX_NAME).is_file():
        raise GlmsnakeError(f"slime's converter wrote no {INDEX_NAME} into {stage}", "read the task log in "
                            f"{wf.paths.job_logs(name)}")
    with HfReader(stage) as out:
        keys = out.keys()
    arch = architectures.shape(td.read_hf_config(wf.paths.hf_dir))
    architectures.check_hf_keys(arch, keys, f"slime's export {stage}")
    for leftover in [*stage.glob("glmsnake.*"), stage / ".glmsnake.files"]:  # copied from the weights' folder
        leftover.unlink(missing_ok=True)
    files = sorted(p.name for p in stage.glob("*.safetensors"))
    return {"backend": "slime", "files": files, "tensors": len(keys), "job": job_record(rec)}
