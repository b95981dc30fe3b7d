"""Where every file of a workflow lives under base_dir: the one owner of paths and file names.

Rules, steps, status, the trainer's settings and benchmarks all ask here, so a folder is
named once. Nothing here touches the disk.

    <base>/<model>/                      HF weights + glmsnake.manifest.json (download_hf)
    <base>/<model>_torch_dist/           Megatron torch_dist release + sentinel
    <base>/<model>-FP8/                  block-FP8 HF folder + sentinel
    <base>/data/<name>.jsonl             prompt sets (+ .manifest.json for hub datasets)
    <base>/runs/<run>/                   sentinel, checkpoints/, metrics.jsonl, train_curves.png,
                                         trainer_settings.json, hf/ (the export)
    <base>/logs/<rule>[.<wildcard>].log  one log per rule; <base>/logs/<job>/ for multi-node jobs
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SENTINEL = "glmsnake.done.json"
MANIFEST = "glmsnake.manifest.json"  # download_hf's sentinel: the file list with sizes and sha256
TRACKER = "latest_checkpointed_iteration.txt"  # Megatron's name for "which checkpoint is the latest"


@dataclass(frozen=True)
class RunPaths:
    """One training run's folder."""

    root: Path

    @property
    def sentinel(self) -> Path:
        return self.root / SENTINEL

    @property
    def checkpoints(self) -> Path:
        """The checkpoint root (slime's --load/--save): iter_XXXXXXX/ folders and the tracker file."""
        return self.root / "checkpoints"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def plot(self) -> Path:
        return self.root / "train_curves.png"

    @property
    def trainer_settings(self) -> Path:
        return self.root / "trainer_settings.json"

    @property
    def hf(self) -> Path:
        """The run's export as an HF folder."""
        return self.root / "hf"

    @property
    def hf_sentinel(self) -> Path:
        return self.hf / SENTINEL


@dataclass(frozen=True)
class Paths:
    """Every path of one workflow, from its base folder and model name."""

    base: Path
    model_name: str

    @property
    def hf_dir(self) -> Path:
        return self.base / self.model_name

    @property
    def hf_manifest(self) -> Path:
        return self.hf_dir / MANIFEST

    @property
    def torch_dist_dir(self) -> Path:
        return self.base / f"{self.model_name}_torch_dist"

    @property
    def torch_dist_sentinel(self) -> Path:
        return self.torch_dist_dir / SENTINEL

    @property
    def fp8_dir(self) -> Path:
        return self.base / f"{self.model_name}-FP8"

    @property
    def fp8_sentinel(self) -> Path:
        return self.fp8_dir / SENTINEL

    @property
    def data_dir(self) -> Path:
        return self.base / "data"

    def dataset(self, name: str) -> Path:
        return self.data_dir / f"{name}.jsonl"

    def run(self, name: str) -> RunPaths:
        return RunPaths(self.base / "runs" / name)

    @property
    def logs(self) -> Path:
        return self.base / "logs"

    def rule_log(self, rule: str, wildcard: str | None = None) -> Path:
        """The `log:` of a rule: `logs/<rule>.log`, or `logs/<rule>.<wildcard>.log`."""
        return self.logs / (f"{rule}.{wildcard}.log" if wildcard else f"{rule}.log")

    def job_logs(self, job: str) -> Path:
        """A multi-node job's folder: submitit's per-task logs, Ray's node logs."""
        return self.logs / job
