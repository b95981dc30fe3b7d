"""Typed, validated configuration: the user's config file, presets, and the parallel layout.

`load(user_config)` merges preset <- top-level overrides <- per-run overrides and
returns a `Workflow` whose every field is typed. All checks that can fail without
touching a GPU happen here, each error naming the fix.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from glmsnake.errors import GlmsnakeError
from glmsnake.recipe.flags import (
    EvalArgs,
    GrpoArgs,
    MiscArgs,
    ModelArgs,
    MtpArgs,
    OptimizerArgs,
    PerfArgs,
    RolloutArgs,
    SglangArgs,
    parse_layer_freq,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
PRESET_DIR = REPO_ROOT / "config" / "presets"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------- sources


class Dataset(Strict):
    """A jsonl prompt set: `hf://owner/name@rev` (a hub dataset repo), `local:/path.jsonl`, or `tiny`."""

    source: str
    file: str | None = None  # the file inside a hub dataset repo


class Weights(Strict):
    """Where the HF checkpoint comes from: `hf://owner/name@rev`, `local:/path`, or `tiny`."""

    source: str
    allow_patterns: list[str] = ["*.json", "*.safetensors", "*.py", "*.txt", "*.model", "*.jinja"]

    @field_validator("source")
    @classmethod
    def _known_scheme(cls, v: str) -> str:
        if not (v == "tiny" or v.startswith("hf://") or v.startswith("local:")):
            raise ValueError(f"source {v!r} must be 'tiny', 'hf://owner/name@revision' or 'local:/path'")
        return v


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


class Features(Strict):
    fp8_rollout: bool = False
    mtp_speculative_decoding: bool = False
    mtp_training: bool = False


class Train(Strict):
    backend: Literal["slime", "local"] = "slime"
    allocation: Allocation = Allocation(nodes=8, gpus_per_node=8, time_min=2880, min_time_min=30)
    colocate: bool = True
    save_interval: int = Field(20, ge=1)
    seed: int = 1234
    slime_dir: str = "/root/slime"
    megatron_dir: str = "/root/Megatron-LM"


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


class TrainingGroups(Strict):
    """slime's training-side argument groups: a preset's defaults, overridable per run."""

    rollout: RolloutArgs
    eval: EvalArgs = EvalArgs()
    perf: PerfArgs = PerfArgs()
    grpo: GrpoArgs = GrpoArgs()
    optimizer: OptimizerArgs
    sglang: SglangArgs = SglangArgs()
    sglang_speculative: SglangArgs | None = None
    sglang_fp8: dict[str, Any] = {}
    mtp: MtpArgs = MtpArgs()
    misc: MiscArgs = MiscArgs()
    features: Features = Features()
    train: Train = Train()


class Run(TrainingGroups):
    """One training run, fully resolved."""

    name: str


class Preset(TrainingGroups):
    """Everything a preset file holds (config/presets/*.yaml)."""

    model_name: str
    weights: Weights
    datasets: dict[str, Dataset]
    prompt_dataset: str = "prompt"
    eval_datasets: list[str] = []
    model: ModelArgs
    convert: Convert = Convert()
    container: Container = Container()


RUN_KEYS = tuple(TrainingGroups.model_fields)


class UserConfig(Strict):
    """config/config.yaml: what a user edits."""

    base_dir: str = "results"
    preset: str = "tiny"
    launcher: Literal["local", "slurm"] = "local"
    runs: dict[str, dict[str, Any]] = {"default": {}}
    overrides: dict[str, Any] = {}
    slurm: Slurm = Slurm()

    @field_validator("runs")
    @classmethod
    def _run_names(cls, v: dict[str, Any]) -> dict[str, Any]:
        for name, ov in v.items():
            if not name or "/" in name or name.startswith("."):
                raise ValueError(f"run name {name!r} must be a plain folder name")
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

    # ---- paths (design section 1)
    @property
    def base(self) -> Path:
        # Absolute: every node of an allocation must see the same paths.
        return Path(self.user.base_dir).expanduser().absolute()

    @property
    def hf_dir(self) -> Path:
        return self.base / self.preset.model_name

    @property
    def torch_dist_dir(self) -> Path:
        return self.base / f"{self.preset.model_name}_torch_dist"

    @property
    def fp8_dir(self) -> Path:
        return self.base / f"{self.preset.model_name}-FP8"

    def dataset_path(self, name: str) -> Path:
        return self.base / "data" / f"{name}.jsonl"

    def run_dir(self, run: str) -> Path:
        return self.base / "runs" / run

    # ---- staleness keys: exactly what decides whether a step is stale
    def architecture(self) -> dict[str, Any]:
        return self.preset.model.model_dump(mode="json")

    def config_hash(self, run: str) -> str:
        blob = json.dumps(self.runs[run].model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- loading


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def read_preset(name: str) -> dict[str, Any]:
    path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        raise GlmsnakeError(
            f"unknown preset {name!r}",
            f"set `preset:` to one of {preset_names()} (files in {PRESET_DIR})",
        )
    return yaml.safe_load(path.read_text()) or {}


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _pretty(err: ValidationError, where: str) -> GlmsnakeError:
    lines = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"{where}.{loc}: unknown key")
        else:
            lines.append(f"{where}.{loc}: {e['msg']} (got {e.get('input')!r})")
    return GlmsnakeError(
        "invalid configuration:\n  " + "\n  ".join(lines),
        "correct the keys named above in config/config.yaml (or the preset); "
        "`glmsnake render` shows the resolved recipe",
    )


def load(user_config: dict[str, Any] | None) -> Workflow:
    """Validate and resolve a user config (the dict Snakemake loaded from config/config.yaml)."""
    raw = dict(user_config or {})
    try:
        user = UserConfig.model_validate(raw)
    except ValidationError as e:
        raise _pretty(e, "config") from None
    preset_raw = deep_merge(read_preset(user.preset), user.overrides)
    try:
        preset = Preset.model_validate(preset_raw)
    except ValidationError as e:
        raise _pretty(e, f"preset[{user.preset}]+overrides") from None
    runs = {}
    for name, ov in user.runs.items():
        base = {k: preset_raw[k] for k in RUN_KEYS if k in preset_raw}
        try:
            runs[name] = Run.model_validate({"name": name, **deep_merge(base, ov)})
        except ValidationError as e:
            raise _pretty(e, f"runs.{name}") from None
    wf = Workflow(user=user, preset=preset, runs=runs)
    from glmsnake.layout import check_workflow  # late: layout imports config types

    check_workflow(wf)
    return wf


def load_file(path: str | Path, extra: dict[str, Any] | None = None) -> Workflow:
    raw = yaml.safe_load(Path(path).read_text()) or {}
    return load(deep_merge(raw, extra or {}))


def user_config_schema() -> dict[str, Any]:
    """JSON schema of config/config.yaml, for Snakemake's validate()."""
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **UserConfig.model_json_schema()}


__all__ = [
    "Workflow",
    "Preset",
    "Run",
    "UserConfig",
    "load",
    "load_file",
    "preset_names",
    "user_config_schema",
    "parse_layer_freq",
]
