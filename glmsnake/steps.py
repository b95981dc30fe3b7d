"""The rules' entry points: `glmsnake step NAME --sentinel PATH [--run R] [--name N]`.

The Snakefile exports the user config as GLMSNAKE_CONFIG, so a step resolves the
same validated Workflow on any node (the slurm executor re-parses the Snakefile
there with the same config). Each step writes its sentinel last.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

from glmsnake import config
from glmsnake.errors import GlmsnakeError

CONFIG_ENV = "GLMSNAKE_CONFIG"

# step name -> "module:function"; each function is step(wf, sentinel, **options).
STEPS = {
    "download-hf": "glmsnake.hub:step_download_hf",
    "download-dataset": "glmsnake.hub:step_download_dataset",
    "convert-torch-dist": "glmsnake.convert.torch_dist:step",
    "convert-fp8": "glmsnake.convert.fp8:step",
    "train": "glmsnake.trainer.step:step",
    "export-hf": "glmsnake.convert.torch_dist:step_export",
}


def workflow_from_env() -> config.Workflow:
    raw = os.environ.get(CONFIG_ENV)
    if raw is None:
        path = Path("config/config.yaml")
        if not path.is_file():
            raise GlmsnakeError(f"{CONFIG_ENV} is not set and there is no {path}", "run steps through snakemake")
        return config.load_file(path)
    return config.load(json.loads(raw))


def run_step(step: str, sentinel: Path, **options) -> None:
    module, func = STEPS[step].split(":")
    getattr(importlib.import_module(module), func)(workflow_from_env(), Path(sentinel), **options)
