"""Rule export_hf: a run's latest checkpoint back to an HF folder (`<run>/hf`), then the sentinel."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from glmsnake import atomic, publish, staleness
from glmsnake.config import Workflow
from glmsnake.convert import torch_dist as td
from glmsnake.convert.dcp_io import METADATA_NAME


def export_hf(wf: Workflow, sentinel: Path, run: str) -> None:
    t0 = time.monotonic()
    run_paths = wf.paths.run(run)
    ckpt = td.find_checkpoint(run_paths.checkpoints)
    final = run_paths.hf
    stage = publish.temp_dir_for(final)
    shutil.rmtree(stage, ignore_errors=True)
    summary = td.export_hf(ckpt, wf.paths.hf_dir, stage)
    publish.publish_dir(stage, final)
    atomic.write_sentinel(
        sentinel, step="export_hf", settings=staleness.export_hf(wf, run), checkpoint=str(ckpt),
        metadata_sha256=atomic.sha256_file(ckpt / METADATA_NAME), output=str(final),
        seconds=round(time.monotonic() - t0, 3), **summary,
    )
