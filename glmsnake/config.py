"""The typed configuration: the user's config file, presets, runs, and the resolved Workflow.

Models only. Loading, merging and the checks that need more than one field live in
`glmsnake.resolve`; every field here is typed and bounded, so a typo or an impossible
number is rejected when the config is read.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from glmsnake.paths import Paths
from glmsnake.recipe.args import (
    EvalArgs,
    GrpoArgs,
    MiscArgs,
    ModelArgs,
    MtpArgs,
    OptimizerArgs,
    PerfArgs,
    RolloutArgs,
    SglangArgs,
    TrackingArgs,
)

class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------- sources


HUB_SOURCE = re.compile(r"hf://(?P<datasets>datasets/)?[A-Za-z0-9][\w.-]*/[\w.-]+(@[^\s@]+)?")


def _source(v: str, kind: str, example: str) -> str:
    """`tiny`, `local:PATH` (relative paths start at the project folder) or a hub repo of the right kind."""
    if v == "tiny" or (v.startswith("local:") and v.removeprefix("local:").strip()):
        return v
    m = HUB_SOURCE.fullmatch(v) if v.startswith("hf://") else None
    if m is None:
        raise ValueError(f"source {v!r} must be 'tiny', '{example}' or 'local:/path'")
    if bool(m.group("datasets")) != (kind == "dataset"):
        raise ValueError(f"source {v!r} is a {'dataset' if m.group('datasets') else 'model'} repo, "
                         f"but this is a {kind}: write it as {example}")
    return v


class Dataset(Strict):
    """A jsonl prompt set: `hf://datasets/owner/name@rev` (a hub dataset repo), `local:/path.jsonl`, or `tiny`."""

    source: str
    file: str | None = None  # the file inside a hub dataset repo

    @field_validator("source")
    @classmethod
    def _known_scheme(cls, v: str) -> str:
        return _source(v, "dataset", "hf://datasets/owner/name@revision")

    @model_validator(mode="after")
    def _hub_file(self) -> "Dataset":
        if self.source.startswith("hf://") and not self.file:
            raise ValueError(f"a hub dataset ({self.source}) needs `file:`, the .jsonl file's path inside the repo")
        return self


class Weights(Strict):
    """Where the HF checkpoint comes from: `hf://owner/name@rev`, `local:/path`, or `tiny`."""

    source: str
    allow_patterns: list[str] = ["*.json", "*.safetensors", "*.py", "*.txt", "*.model", "*.jinja"]

    @field_validator("source")
    @classmethod
    def _known_scheme(cls, v: str) -> str:
        return _source(v, "model", "hf://owner/name@revision")


# --------------------------------------------------------------------------- steps


class Allocation(Strict):
    """What one multi-node step asks Slurm for."""

    nodes: int = Field(1, ge=1)
    gpus_per_node: int = Field(8, ge=0)
    cpus_per_task: int = Field(2, ge=1)
    mem_gb: int = Field(0, ge=0, description="0: all of the node's memory")
    time_min: int = Field(60, ge=1)
    min_time_min: int = Field(10, ge=1, description="the step cannot do useful work in less")
    exclusive: bool = False

    @model_validator(mode="after")
    def _time(self) -> "Allocation":
        if self.time_min < self.min_time_min:
            raise ValueError(
                f"time_min={self.time_min} is shorter than this step's minimum of {self.min_time_min} "
                f"minutes; raise time_min to at least {self.min_time_min}"
            )
        return self


class TorchDistConvert(Strict):
    backend: Literal["glmsnake", "slime"] = "glmsnake"
    allocation: Allocation = Allocation(nodes=2, gpus_per_node=8, time_min=120, min_time_min=10)
    writers_per_node: int = Field(8, ge=1, description="writer ranks per node (torchrun --nproc-per-node)")
    layout: Literal["local", "te"] = Field(
        "local", description="backend glmsnake's key names: megatron-core's local layer spec, or the Transformer "
        "Engine spec slime's model loads (MoE layers' pre_mlp_layernorm)")


class Fp8Convert(Strict):
    strategy: Literal["block", "channel", "tensor"] = "block"
    block_size: tuple[int, int] = (128, 128)
    workers: int = Field(4, ge=1)
    device: Literal["cpu", "cuda", "auto"] = "auto"

    @field_validator("block_size")
    @classmethod
    def _positive(cls, v: tuple[int, int]) -> tuple[int, int]:
        if any(x <= 0 for x in v):
            raise ValueError(f"block_size must be two positive integers, got {list(v)}")
        return v


class Convert(Strict):
    torch_dist: TorchDistConvert = TorchDistConvert()
    fp8: Fp8Convert = Fp8Convert()


class Export(Strict):
    """A trained checkpoint back to HF: glmsnake's reader (any torch_dist key layout, one CPU process
    in the rule's job) or slime's own converter (on an allocation of its own, in the container)."""

    backend: Literal["glmsnake", "slime"] = "glmsnake"
    allocation: Allocation = Allocation(nodes=1, gpus_per_node=0, cpus_per_task=8, time_min=120, min_time_min=10)


class Features(Strict):
    fp8_rollout: bool = False
    mtp_speculative_decoding: bool = False
    mtp_training: bool = False


class KeepCheckpoints(Strict):
    """Checkpoint retention (glmsnake prunes while training runs; slime itself never deletes)."""

    last: int = Field(3, ge=1, description="keep the newest LAST complete checkpoints")
    every: int = Field(0, ge=0, description="also keep iteration i when (i + 1) % EVERY == 0 (milestones); 0: none")


class Train(Strict):
    backend: Literal["slime", "local"] = "slime"
    allocation: Allocation = Allocation(nodes=8, gpus_per_node=8, time_min=2880, min_time_min=30)
    colocate: bool = True
    save_interval: int = Field(20, ge=1)
    max_requeues: int = Field(3, ge=0, description="how often a job that reaches its time limit is requeued (it resumes)")
    on_change: Literal["restart", "continue"] = Field(
        "restart",
        description="when the run's settings change: restart from the torch_dist weights (earlier checkpoints "
        "move to runs/<run>/previous/), or continue from the latest checkpoint (never across an architecture change)",
    )
    keep_checkpoints: KeepCheckpoints | None = Field(
        KeepCheckpoints(),
        description="checkpoints kept while training runs (the tracker's, newer ones and a run's only one always "
        "stay); null: keep every checkpoint, as slime does",
    )
    seed: int = 1234
    slime_dir: str = "/root/slime"

    @field_validator("keep_checkpoints", mode="before")
    @classmethod
    def _keep_all(cls, v: Any) -> Any:
        # Snakemake's `--config runs={r: {train: {keep_checkpoints: null}}}` hands over the string.
        return None if isinstance(v, str) and v.strip().lower() in ("null", "none", "~") else v
    megatron_dir: str = "/root/Megatron-LM"


class Hardware(Strict):
    """What one node of the cluster has: the budgets `glmsnake plan --resources` checks every run against."""

    gpu: str = Field("H100 80GB", description="the GPU's name, for the plan")
    gpus_per_node: int = Field(8, ge=1)
    gpu_memory_gib: float = Field(79.6, gt=0, description="memory of one GPU as nvidia-smi reports it (H100: 81559 MiB)")
    host_memory_gib: float = Field(2048, gt=0, description="RAM of one node")
    base_dir_quota_tib: float | None = Field(None, gt=0, description="a quota on base_dir's file system, if any")


class Container(Strict):
    """How GPU steps run the slime image on the cluster."""

    runtime: Literal["none", "pyxis", "apptainer"] = "none"
    image: str = "slimerl/slime:latest"
    mounts: list[str] = []


class Slurm(Strict):
    """The one place for cluster settings; rules and submitit both read it."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    network_interface: str | None = Field(
        None, description="interface whose address Ray, gloo and NCCL use (e.g. ib0); None: the node's address from Slurm"
    )
    exclude: list[str] = Field([], description="nodes never to allocate (sbatch --exclude), e.g. known bad ones")
    preflight: bool = Field(True, description="every node of a multi-node job checks itself before the work starts")
    exclude_bad_nodes: bool = Field(
        False, description="a node that fails preflight is left out and the job submitted again")
    preflight_retries: int = Field(2, ge=0, le=10, description="at most this many resubmissions without bad nodes")
    preflight_allreduce: bool = Field(True, description="preflight ends with one small all-reduce across the "
                                      "nodes: a full TCP mesh over each node's address, the connections gloo makes")
    preflight_nccl: bool = Field(True, description="on GPU nodes, preflight also runs one small NCCL all-reduce "
                                 "across the nodes, one GPU each (a torch import and NCCL's set-up: seconds)")


class TrainingGroups(Strict):
    """slime's training-side argument groups: a preset's defaults, overridable per run."""

    rollout: RolloutArgs
    eval: EvalArgs = EvalArgs()
    perf: PerfArgs = PerfArgs()
    grpo: GrpoArgs = GrpoArgs()
    optimizer: OptimizerArgs
    sglang: SglangArgs = SglangArgs()
    sglang_speculative: SglangArgs | None = None
    sglang_fp8: SglangArgs | None = None  # overlaid on sglang with features.fp8_rollout
    mtp: MtpArgs = MtpArgs()
    misc: MiscArgs = MiscArgs()
    tracking: TrackingArgs = TrackingArgs()  # W&B and TensorBoard: never part of what decides a run's output
    features: Features = Features()
    train: Train = Train()


class Run(TrainingGroups):
    """One training run, fully resolved."""

    name: str

    @property
    def serves_fp8(self) -> bool:
        """The rollout serves the FP8 conversion, so training depends on it (its input, key and flag)."""
        return self.features.fp8_rollout


class Preset(TrainingGroups):
    """Everything a preset file holds (config/presets/*.yaml)."""

    model_name: str
    weights: Weights
    datasets: dict[str, Dataset]
    prompt_dataset: str = "prompt"
    eval_datasets: list[str] = []
    model: ModelArgs
    convert: Convert = Convert()
    export: Export = Export()
    container: Container = Container()
    hardware: Hardware = Hardware()


RUN_KEYS = tuple(TrainingGroups.model_fields)
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


class UserConfig(Strict):
    """config/config.yaml: what a user edits."""

    base_dir: str = "results"
    preset: str = "tiny"
    launcher: Literal["local", "slurm"] = "local"
    runs: dict[str, dict[str, Any]] = {"default": {}}
    overrides: dict[str, Any] = {}
    slurm: Slurm = Slurm()

    @field_validator("base_dir")
    @classmethod
    def _base_dir(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("base_dir is empty; name the folder for weights, data and runs (e.g. results)")
        return v

    @field_validator("runs")
    @classmethod
    def _run_names(cls, v: dict[str, Any]) -> dict[str, Any]:
        if not v:
            raise ValueError("no runs: name at least one, e.g. `runs: {default: {}}`")
        for name, ov in v.items():
            # A run name is a folder, a Snakemake wildcard value and a shell word: keep it plain.
            if not RUN_NAME.fullmatch(str(name)):
                raise ValueError(f"run name {name!r} may hold only letters, digits, '_', '-' and '.', "
                                 "and must start with a letter or digit")
            if ov is not None and not isinstance(ov, dict):
                raise ValueError(f"runs.{name} must be a mapping of overrides (or empty)")
            bad = set(ov or {}) - set(RUN_KEYS)
            if bad:
                raise ValueError(
                    f"runs.{name} overrides {sorted(bad)}, which are not per-run settings; "
                    f"per-run keys are {sorted(RUN_KEYS)} (put model/weights/convert changes under overrides:)"
                )
        return {k: (ov or {}) for k, ov in v.items()}


class Workflow(BaseModel):
    """The resolved configuration the Snakefile and every step use."""

    model_config = ConfigDict(frozen=True)

    user: UserConfig
    preset: Preset
    runs: dict[str, Run]
    project_dir: Path | None = None  # where a relative base_dir starts (resolve.project_dir); None: cwd

    @property
    def base(self) -> Path:
        # Absolute: every node of an allocation must see the same paths.
        start = self.project_dir or Path.cwd()
        return Path(os.path.normpath(start / Path(self.user.base_dir).expanduser()))

    def local_path(self, source: str) -> Path:
        """The path of a `local:` source; a relative one starts where a relative base_dir does."""
        return (self.project_dir or Path.cwd()) / Path(source.removeprefix("local:")).expanduser()

    @property
    def paths(self) -> Paths:
        return Paths(self.base, self.preset.model_name)

    # ---- staleness keys: exactly what decides whether a step is stale
    def architecture(self) -> dict[str, Any]:
        return self.preset.model.model_dump(mode="json")

    def config_hash(self, run: str) -> str:
        blob = json.dumps(self.runs[run].model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


