"""Where every file of a workflow lives under base_dir: the one owner of paths and file names.

Rules, steps, status, the trainer's settings and benchmarks all ask here, so a folder is
named once. Nothing here touches the disk.

    <base>/<model>/                      HF weights + glmsnake.manifest.json (download_hf)
    <base>/<model>_torch_dist/           Megatron torch_dist release + sentinel
    <base>/<model>-FP8/                  block-FP8 HF folder + sentinel
    <base>/data/<name>.jsonl             prompt sets (+ .manifest.json for hub datasets)
    <base>/runs/<run>/                   sentinel, checkpoints/, metrics.jsonl, train_curves.png,
                                         trainer_settings.json, hf/ (the export), logs/attempt-N.log,
                                         previous/<settings hash>/ (checkpoints of earlier settings),
                                         pruned_checkpoints.jsonl, disk_warning.json
    <base>/logs/<rule>[.<wildcard>].log  one log per rule; <base>/logs/<job>/ for multi-node jobs
    <base>/report/provenance.html        every step's provenance, from the sentinels (snakemake --report)
    <base>/task-runtime/<version>/       pure-Python code that tasks in the container import
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SENTINEL = "glmsnake.done.json"
MANIFEST = "glmsnake.manifest.json"  # download_hf's sentinel: the file list with sizes and sha256
TRACKER = "latest_checkpointed_iteration.txt"  # Megatron's name for "which checkpoint is the latest"


class _Join:
    """A path below another attribute of the object: `checkpoints = _Join("root", "checkpoints")`."""

    def __init__(self, start: str, *parts: str):
        self.start, self.parts = start, parts

    def __get__(self, obj, owner=None):
        return self if obj is None else Path(getattr(obj, self.start), *self.parts)


@dataclass(frozen=True)
class RunPaths:
    """One training run's folder."""

    root: Path

    sentinel = _Join("root", SENTINEL)
    checkpoints = _Join("root", "checkpoints")  # slime's --load/--save: iter_XXXXXXX/ and the tracker
    metrics = _Join("root", "metrics.jsonl")
    plot = _Join("root", "train_curves.png")
    trainer_settings = _Join("root", "trainer_settings.json")
    hf = _Join("root", "hf")  # the run's export as an HF folder
    hf_sentinel = _Join("root", "hf", SENTINEL)
    attempt_logs = _Join("root", "logs")  # attempt-N.log: every training attempt's log
    pruned = _Join("root", "pruned_checkpoints.jsonl")  # one line per checkpoint retention deleted
    disk_warning = _Join("root", "disk_warning.json")  # present while less than two checkpoints fit
    wandb = _Join("root", "wandb")  # W&B's run folder (--wandb-dir)
    tensorboard = _Join("root", "tensorboard")  # TensorBoard event files (TENSORBOARD_DIR)


@dataclass(frozen=True)
class Paths:
    """Every path of one workflow, from its base folder and model name."""

    base: Path
    model_name: str

    @property
    def hf_dir(self) -> Path:
        return self.base / self.model_name

    @property
    def torch_dist_dir(self) -> Path:
        return self.base / f"{self.model_name}_torch_dist"

    @property
    def fp8_dir(self) -> Path:
        return self.base / f"{self.model_name}-FP8"

    hf_manifest = _Join("hf_dir", MANIFEST)
    torch_dist_sentinel = _Join("torch_dist_dir", SENTINEL)
    fp8_sentinel = _Join("fp8_dir", SENTINEL)
    data_dir = _Join("base", "data")
    logs = _Join("base", "logs")
    task_runtime = _Join("base", "task-runtime")  # <version>/: what container tasks import (launch.task_runtime)

    def dataset(self, name: str) -> Path:
        return self.data_dir / f"{name}.jsonl"

    def run(self, name: str) -> RunPaths:
        return RunPaths(self.base / "runs" / name)

    def rule_log(self, rule: str, wildcard: str | None = None) -> Path:
        """The `log:` of a rule: `logs/<rule>.log`, or `logs/<rule>.<wildcard>.log`."""
        return self.logs / (f"{rule}.{wildcard}.log" if wildcard else f"{rule}.log")

    @property
    def provenance(self) -> Path:
        """The report's page of where every output came from (rule provenance)."""
        return self.base / "report" / "provenance.html"

    def job_logs(self, job: str) -> Path:
        """A multi-node job's folder: submitit's per-task logs, Ray's node logs."""
        return self.logs / job
