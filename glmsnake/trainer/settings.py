"""What the local trainer reads: slime's typed argument groups of one run, plus the run's paths.

The driver runs as a Ray job, possibly on another node than the Snakemake step, so it gets
this record as a JSON file (written by the train step) instead of re-resolving the config.
The groups are the very models `glmsnake.recipe` renders for slime, so a setting means the
same to both backends; where slime leaves a flag unset, the property below applies slime's
default.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict

from glmsnake.paths import RunPaths
from glmsnake.recipe.args import EvalArgs, GrpoArgs, OptimizerArgs, PerfArgs, RolloutArgs, TrackingArgs


class TrainerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    run: str
    run_dir: str
    hf_dir: str            # tokenizer and config.json only; weights come from torch_dist_dir
    torch_dist_dir: str    # initial weights and the reference model (slime's --ref-load)
    prompt_data: str
    eval_data: dict[str, str] = {}
    rollout: RolloutArgs
    eval: EvalArgs = EvalArgs()
    grpo: GrpoArgs = GrpoArgs()
    optimizer: OptimizerArgs
    perf: PerfArgs = PerfArgs()
    save_interval: int = 1
    seed: int = 1234
    tracking: TrackingArgs = TrackingArgs()  # TensorBoard and W&B, as for slime
    wandb_run_id: str | None = None  # the same W&B run for every attempt
    clip_grad: float = 1.0  # Megatron's default
    # Test knob, never set by the workflow: -1 flips every advantage (the "can it fail" check).
    advantage_sign: float = 1.0

    # ---- slime's defaults for flags a preset may leave unset
    @property
    def rm_type(self) -> str:
        return self.rollout.rm_type or "deepscaler"

    @property
    def rollout_seed(self) -> int:
        return self.rollout.rollout_seed if self.rollout.rollout_seed is not None else 42

    @property
    def stop_token_ids(self) -> list[int]:
        return list(self.rollout.rollout_stop_token_ids or [])

    @property
    def kl_loss_type(self) -> str:
        return self.grpo.kl_loss_type or "low_var_kl"

    @property
    def micro_batch_size(self) -> int:
        return self.perf.micro_batch_size or 1

    # ---- where things go
    @property
    def paths(self) -> RunPaths:
        return RunPaths(Path(self.run_dir))

    @property
    def checkpoint_root(self) -> Path:
        """slime's --load/--save: iter_XXXXXXX/ folders and the tracker file."""
        return self.paths.checkpoints

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)

    @classmethod
    def from_json(cls, text: str) -> "TrainerSettings":
        return cls.model_validate_json(text)

    def replace(self, **changes) -> "TrainerSettings":
        return self.model_copy(update=changes)
