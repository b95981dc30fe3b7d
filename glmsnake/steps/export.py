"""Rule export_hf: a run's latest checkpoint back to an HF folder (`<run>/hf`), then the sentinel."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from glmsnake import atomic, contents, disk, publish, staleness
from glmsnake.config import Workflow
from glmsnake.convert import torch_dist as td
from glmsnake.convert.dcp_io import METADATA_NAME
from glmsnake.errors import GlmsnakeError


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
    summary = td.export_hf(ckpt, wf.paths.hf_dir, stage)
    publish.publish_dir(stage, final)
    atomic.write_sentinel(
        sentinel, step="export_hf", settings=staleness.export_hf(wf, run), checkpoint=str(ckpt),
        metadata_sha256=atomic.sha256_file(ckpt / METADATA_NAME), output=str(final),
        seconds=round(time.monotonic() - t0, 3), contents=contents.record(final), **summary,
    )
