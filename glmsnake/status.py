"""`glmsnake status [run]`: where each step and run stands, read from sentinels, metrics and checkpoints."""

from __future__ import annotations

import json

from glmsnake import disk, retention
from glmsnake.config import Workflow
from glmsnake.errors import GlmsnakeError


def show_status(wf: Workflow, run: str | None) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn

    from glmsnake.steps import lineage
    from glmsnake.trainer import checkpoints, metrics

    if run is not None and run not in wf.runs:
        raise GlmsnakeError(f"no run named {run!r}", f"choose one of {sorted(wf.runs)}")
    paths = wf.paths
    console = Console()
    for what, path in (
        ("weights", paths.hf_manifest),
        ("torch_dist", paths.torch_dist_sentinel),
        ("fp8", paths.fp8_sentinel),
    ):
        console.print(f"{what:11s} {'done' if path.is_file() else 'not yet':8s} {path.parent}")
    for name in [run] if run else list(wf.runs):
        run_paths = paths.run(name)
        records = metrics.rollouts(metrics.read(run_paths.metrics))
        done = records[-1]["rollout_id"] + 1 if records else 0
        total = wf.runs[name].rollout.num_rollout
        with Progress(TextColumn(f"run {name}"), BarColumn(), TextColumn("{task.completed}/{task.total} rollouts"), console=console) as bar:
            bar.add_task(name, total=total, completed=done)
        if records:
            last = records[-1]
            keys = ("rollout_id", "reward_mean", "reward_std", "response_len_mean", "loss", "ppo_kl", "samples_per_s")
            console.print("  last: " + ", ".join(f"{k}={last[k]:.4g}" if isinstance(last.get(k), float) else f"{k}={last.get(k)}" for k in keys if k in last))
        latest = checkpoints.latest(run_paths.checkpoints)
        finished = run_paths.sentinel.is_file()
        console.print(f"  latest checkpoint: {latest if latest is not None else 'none'}; {'finished' if finished else 'not finished'}")
        if pruned := retention.read_records(run_paths.pruned):
            console.print(f"  pruned checkpoints: {len(pruned)} ({disk.human(sum(p['bytes'] for p in pruned))} freed), "
                          f"last iter {pruned[-1]['iteration']}")
        if run_paths.disk_warning.is_file():
            console.print(f"  [bold red]WARNING[/]: {json.loads(run_paths.disk_warning.read_text())['message']}")
        for folder in lineage.set_aside(run_paths):
            console.print(f"  earlier settings' checkpoints, set aside: {folder}")
    return 0
