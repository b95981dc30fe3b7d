"""The rules' entry points: `glmsnake step NAME ...` runs one function of this package.

One module per rule family (weights, convert, train, export, provenance). These are the only code
that knows both the resolved `Workflow` and the libraries (hub, convert, trainer, launch):
they turn the config into plain parameters, call the library, and write the sentinel last.
"""

from __future__ import annotations

import importlib
from typing import Callable

from glmsnake import disk
from glmsnake.config import Workflow
from glmsnake.steps import attempts

# `glmsnake step NAME` -> (module, function(wf, **options)); options are the CLI's
# --sentinel/--output/--run/--name. Imported when run: a step that needs no torch (a download,
# provenance) does not pay its import.
STEPS = {
    "download-hf": ("weights", "download_hf"),
    "download-dataset": ("weights", "download_dataset"),
    "convert-torch-dist": ("convert", "convert_torch_dist"),
    "convert-fp8": ("convert", "convert_fp8"),
    "train": ("train", "train_run"),
    "export-hf": ("export", "export_hf"),
    "provenance": ("provenance", "provenance"),
}


def step_function(step: str) -> Callable[..., None]:
    module, name = STEPS[step]
    return getattr(importlib.import_module(f"glmsnake.steps.{module}"), name)


def run(step: str, wf: Workflow, config_line: str, **options) -> None:
    """Run one step, its log starting with where its config came from.

    Training's log is kept per attempt as well (steps/attempts.py). A full disk is named as such.
    """
    fn = step_function(step)
    if step != "train":
        print(config_line, flush=True)
        with disk.naming_a_full_disk(wf.base):
            fn(wf, **options)
        return
    rule_log, folder = wf.paths.rule_log("train", options["run"]), wf.paths.run(options["run"]).attempt_logs
    copy_to = attempts.begin(rule_log, folder)
    try:
        print(config_line, flush=True)
        with disk.naming_a_full_disk(wf.base):
            fn(wf, **options)
    finally:
        attempts.finish(rule_log, copy_to)
