"""The local trainer's metrics to TensorBoard and W&B, under the names slime logs them.

Each metrics.jsonl record also goes to:
- TensorBoard event files in the run folder (`runs/<run>/tensorboard`), where slime's
  TENSORBOARD_DIR points too; rollout metrics at step `rollout_id`, eval metrics at the number of
  rollouts trained before them;
- W&B, with the run's stable id and `resume="allow"`, so a requeued or resumed attempt continues
  the same W&B run; `rollout/step` and `eval/step` are its step metrics, as in slime. The API key
  is W&B's own WANDB_API_KEY from the environment; `wandb_mode: offline` logs to the run folder only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from glmsnake.trainer.settings import TrainerSettings

STRUCTURE = ("kind", "rollout_id", "trained_rollouts", "time")  # bookkeeping, not metrics


def scalars(record: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in record.items()
            if k not in STRUCTURE and isinstance(v, (int, float)) and not isinstance(v, bool)}


def step_of(record: dict[str, Any]) -> int:
    return record["rollout_id"] if record.get("kind") == "rollout" else record["trained_rollouts"]


class Sinks:
    """Open for the length of a training attempt: `with Sinks(settings) as sinks: sinks.log(rec)`."""

    def __init__(self, settings: "TrainerSettings"):
        self.s = settings
        self.tb = None
        self.wandb_run = None

    def __enter__(self) -> "Sinks":
        t, paths = self.s.tracking, self.s.paths
        if t.use_tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(paths.tensorboard))
        if t.use_wandb:
            import wandb

            paths.wandb.mkdir(parents=True, exist_ok=True)
            self.wandb_run = wandb.init(
                project=t.wandb_project, entity=t.wandb_team, group=t.wandb_group or self.s.run, name=self.s.run,
                id=self.s.wandb_run_id, resume="allow", dir=str(paths.wandb), mode=t.wandb_mode or "online",
                config={"run": self.s.run}, settings=wandb.Settings(console="off", x_disable_stats=True))
            for prefix, step in (("rollout", "rollout/step"), ("train", "rollout/step"), ("perf", "rollout/step"),
                                 ("eval", "eval/step")):
                self.wandb_run.define_metric(step, hidden=True)
                self.wandb_run.define_metric(f"{prefix}/*", step_metric=step)
        return self

    def log(self, record: dict[str, Any]) -> None:
        values, step = scalars(record), step_of(record)
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)
            self.tb.flush()
        if self.wandb_run is not None:
            key = "rollout/step" if record.get("kind") == "rollout" else "eval/step"
            self.wandb_run.log({**values, key: step})

    def __exit__(self, *exc) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb_run is not None:
            self.wandb_run.finish(exit_code=1 if exc[0] else 0)
