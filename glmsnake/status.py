"""`glmsnake status [run]`: where each step and run stands, read from sentinels, metrics and checkpoints."""

from __future__ import annotations

from glmsnake.config import Workflow


def show_status(wf: Workflow, run: str | None) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn

    from glmsnake.trainer import checkpoints, metrics

    console = Console()
    for what, path in (
        ("weights", wf.hf_dir / "glmsnake.manifest.json"),
        ("torch_dist", wf.torch_dist_dir / "glmsnake.done.json"),
        ("fp8", wf.fp8_dir / "glmsnake.done.json"),
    ):
        console.print(f"{what:11s} {'done' if path.is_file() else 'not yet':8s} {path.parent}")
    for name in [run] if run else list(wf.runs):
        run_dir = wf.run_dir(name)
        records = metrics.rollouts(metrics.read(run_dir / "metrics.jsonl"))
        done = records[-1]["rollout_id"] + 1 if records else 0
        total = wf.runs[name].rollout.num_rollout
        with Progress(TextColumn(f"run {name}"), BarColumn(), TextColumn("{task.completed}/{task.total} rollouts"), console=console) as bar:
            bar.add_task(name, total=total, completed=done)
        if records:
            last = records[-1]
            keys = ("rollout_id", "reward_mean", "reward_std", "response_len_mean", "loss", "ppo_kl", "samples_per_s")
            console.print("  last: " + ", ".join(f"{k}={last[k]:.4g}" if isinstance(last.get(k), float) else f"{k}={last.get(k)}" for k in keys if k in last))
        latest = checkpoints.latest(run_dir / "checkpoints")
        finished = (run_dir / "glmsnake.done.json").is_file()
        console.print(f"  latest checkpoint: {latest if latest is not None else 'none'}; {'finished' if finished else 'not finished'}")
    return 0
