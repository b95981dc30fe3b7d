"""Everything the local trainer needs, resolved from (Workflow, run) into one small, JSON-able record.

The driver runs as a Ray job, possibly on another node than the Snakemake step, so it gets
this record as a JSON file (written by the step) instead of re-resolving the config. Field
names and meanings are slime's flags.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from glmsnake.config import Workflow
from glmsnake.recipe.groups import checkpoint_dir

SETTINGS_NAME = "trainer_settings.json"
METRICS_NAME = "metrics.jsonl"
PLOT_NAME = "train_curves.png"


@dataclass
class TrainerSettings:
    run: str
    run_dir: str
    hf_dir: str            # tokenizer and config.json only; weights come from torch_dist_dir
    torch_dist_dir: str    # initial weights and the reference model (slime's --ref-load)
    checkpoint_dir: str    # --load / --save
    prompt_data: str
    eval_data: dict[str, str] = field(default_factory=dict)
    # ROLLOUT
    input_key: str = "prompt"
    label_key: str = "label"
    apply_chat_template: bool = False
    rollout_shuffle: bool = False
    rm_type: str = "tiny"
    num_rollout: int = 1
    rollout_batch_size: int = 1
    n_samples_per_prompt: int = 1
    rollout_max_response_len: int = 1
    rollout_temperature: float = 1.0
    num_steps_per_rollout: int = 1
    rollout_seed: int = 42
    stop_token_ids: list[int] = field(default_factory=list)
    # EVAL
    eval_interval: int | None = None
    n_samples_per_eval_prompt: int = 1
    eval_max_response_len: int | None = None
    # GRPO
    advantage_estimator: str = "grpo"
    use_kl_loss: bool = False
    kl_loss_coef: float = 0.0
    kl_loss_type: str = "low_var_kl"
    kl_coef: float = 0.0
    entropy_coef: float = 0.0
    eps_clip: float = 0.2
    eps_clip_high: float | None = None
    use_tis: bool = False
    # OPTIMIZER / PERF / CKPT
    lr: float = 1e-6
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.98
    clip_grad: float = 1.0  # Megatron's default
    micro_batch_size: int = 1
    save_interval: int = 1
    seed: int = 1234
    # Test knob, never set by the workflow: -1 flips every advantage (the "can it fail" check).
    advantage_sign: float = 1.0

    @property
    def metrics_path(self) -> Path:
        return Path(self.run_dir) / METRICS_NAME

    @property
    def plot_path(self) -> Path:
        return Path(self.run_dir) / PLOT_NAME

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "TrainerSettings":
        return cls(**json.loads(text))

    def replace(self, **changes: Any) -> "TrainerSettings":
        return dataclasses.replace(self, **changes)


def from_workflow(wf: Workflow, run_name: str) -> TrainerSettings:
    run = wf.runs[run_name]
    ro, ev, g, opt = run.rollout, run.eval, run.grpo, run.optimizer
    return TrainerSettings(
        run=run_name,
        run_dir=str(wf.run_dir(run_name)),
        hf_dir=str(wf.hf_dir),
        torch_dist_dir=str(wf.torch_dist_dir),
        checkpoint_dir=str(checkpoint_dir(wf, run)),
        prompt_data=str(wf.dataset_path(wf.preset.prompt_dataset)),
        eval_data={n: str(wf.dataset_path(n)) for n in wf.preset.eval_datasets},
        input_key=ro.input_key,
        label_key=ro.label_key,
        apply_chat_template=ro.apply_chat_template,
        rollout_shuffle=ro.rollout_shuffle,
        rm_type=ro.rm_type or "deepscaler",
        num_rollout=ro.num_rollout,
        rollout_batch_size=ro.rollout_batch_size,
        n_samples_per_prompt=ro.n_samples_per_prompt,
        rollout_max_response_len=ro.rollout_max_response_len,
        rollout_temperature=ro.rollout_temperature,
        num_steps_per_rollout=ro.num_steps_per_rollout,
        rollout_seed=ro.rollout_seed if ro.rollout_seed is not None else 42,
        stop_token_ids=list(ro.rollout_stop_token_ids or []),
        eval_interval=ev.eval_interval,
        n_samples_per_eval_prompt=ev.n_samples_per_eval_prompt,
        eval_max_response_len=ev.eval_max_response_len,
        advantage_estimator=g.advantage_estimator,
        use_kl_loss=g.use_kl_loss,
        kl_loss_coef=g.kl_loss_coef,
        kl_loss_type=g.kl_loss_type or "low_var_kl",
        kl_coef=g.kl_coef,
        entropy_coef=g.entropy_coef,
        eps_clip=g.eps_clip,
        eps_clip_high=g.eps_clip_high,
        use_tis=g.use_tis,
        lr=opt.lr,
        weight_decay=opt.weight_decay,
        adam_beta1=opt.adam_beta1,
        adam_beta2=opt.adam_beta2,
        micro_batch_size=run.perf.micro_batch_size or 1,
        save_interval=run.train.save_interval,
        seed=run.train.seed,
    )
