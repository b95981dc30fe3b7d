"""The rules' entry points: `glmsnake step NAME ...` runs one function of this package.

One module per rule family (weights, convert, train, export). These are the only code
that knows both the resolved `Workflow` and the libraries (hub, convert, trainer, launch):
they turn the config into plain parameters, call the library, and write the sentinel last.
"""

from __future__ import annotations

from glmsnake.steps import convert, export, train, weights

# `glmsnake step NAME` -> function(wf, **options); options are the CLI's --sentinel/--output/--run/--name.
STEPS = {
    "download-hf": weights.download_hf,
    "download-dataset": weights.download_dataset,
    "convert-torch-dist": convert.convert_torch_dist,
    "convert-fp8": convert.convert_fp8,
    "train": train.train_run,
    "export-hf": export.export_hf,
}
