"""`glmsnake status [run]`: where each step and run stands, read from sentinels and metrics."""

from __future__ import annotations

import json

from glmsnake.config import Workflow

STEP_OUTPUTS = ("hf_dir", "torch_dist_dir", "fp8_dir")


def show_status(wf: Workflow, run: str | None) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn

    console = Console()
    for attr, sentinel in (("hf_dir", "glmsnake.manifest.json"), ("torch_dist_dir", "glmsnake.done.json"), ("fp8_dir", "glmsnake.done.json")):
        path = getattr(wf, attr) / sentinel
        console.print(f"{attr:15s} {'done' if path.is_file() else 'not yet':8s} {path}")
    for name in [run] if run else list(wf.runs):
        r = wf.runs[name]
        metrics = wf.run_dir(name) / "metrics.jsonl"
        rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()] if metrics.is_file() else []
        done = len(rows)
        with Progress(TextColumn(f"run {name}"), BarColumn(), TextColumn("{task.completed}/{task.total} rollouts"), console=console) as bar:
            bar.add_task(name, total=r.rollout.num_rollout, completed=done)
        if rows:
            console.print("  last: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in rows[-1].items()))
        finished = (wf.run_dir(name) / "glmsnake.done.json").is_file()
        console.print(f"  {'finished' if finished else 'not finished'}")
    return 0
