"""`glmsnake status [run] [--watch [S]]`: where each step and run stands, from sentinels, metrics,
checkpoints and, for a training job still in Slurm, squeue."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from glmsnake import disk, retention
from glmsnake.config import Workflow
from glmsnake.errors import GlmsnakeError


def slurm_job_state(job_logs: Path) -> str:
    """The state of the run's newest training job, as squeue tells it ('' when none or no Slurm here)."""
    from glmsnake.launch.slurm import squeue_state

    folders = [p for p in (job_logs / "submitit").glob("*") if p.is_dir() and p.name.isdigit()]
    if not folders or not shutil.which("squeue"):
        return ""
    newest = max(folders, key=lambda p: int(p.name))
    try:
        state, nodes = squeue_state(newest.name)
    except (OSError, subprocess.SubprocessError):
        return f"{newest.name} (squeue did not answer)"
    return f"{newest.name} {state}" + (f" on {nodes}" if nodes and state == "RUNNING" else "") if state else ""


def kept_bytes(root: Path, count: int) -> int | None:
    """What the kept checkpoints take: count x the size of the one the tracker names (one folder
    walked, not all of them: --watch repeats this). None when it cannot be read right now (pruning
    renames folders while training runs)."""
    try:
        one = retention.checkpoint_bytes(root)
    except OSError:
        return None
    return None if one is None else count * one


def run_row(wf: Workflow, name: str) -> dict[str, Any]:
    """What the table shows of one run, and the notes under it."""
    from glmsnake.steps import lineage
    from glmsnake.trainer import checkpoints, metrics
    from glmsnake.trainer import metric_names as names

    rp, run = wf.paths.run(name), wf.runs[name]
    records = metrics.read(rp.metrics)
    ro = metrics.rollouts(records)
    evals = [r for r in records if r.get("kind") == "eval"]
    kept = retention.present(rp.checkpoints)
    latest = checkpoints.latest(rp.checkpoints) if kept else None
    finished = rp.sentinel.is_file()
    row = {
        "run": name, "backend": run.train.backend, "done": ro[-1]["rollout_id"] + 1 if ro else 0,
        "total": run.rollout.num_rollout,
        "reward": ro[-1].get(names.REWARD) if ro else None,
        "eval": {k: evals[-1][f"eval/{k}"] for k in names.eval_sets(evals[-1])} if evals else {},
        "checkpoint": "none" if latest is None else f"iter {latest}" + (" (finished)" if finished else ""),
        "kept": len(kept), "kept_bytes": kept_bytes(rp.checkpoints, len(kept)),
        "job": "" if finished or wf.user.launcher != "slurm" else slurm_job_state(wf.paths.job_logs(f"train_{name}")),
        "notes": [],
    }
    if ro:
        last = ro[-1]
        keys = (names.REWARD, names.REWARD_STD, names.RESPONSE_LEN, names.KL_REF, "train/pg_clipfrac",
                "train/grad_norm", names.SAMPLES_PER_S)
        row["notes"].append("last rollout: " + ", ".join(f"{k} {last[k]:.4g}" for k in keys if isinstance(last.get(k), float)))
    if pruned := retention.read_records(rp.pruned):
        row["notes"].append(f"pruned checkpoints: {len(pruned)} ({disk.human(sum(p['bytes'] for p in pruned))} freed), "
                            f"last iter {pruned[-1]['iteration']}")
    if rp.disk_warning.is_file():
        row["notes"].append(f"[bold red]WARNING[/]: {json.loads(rp.disk_warning.read_text())['message']}")
    for folder in lineage.set_aside(rp):
        row["notes"].append(f"earlier settings' checkpoints, set aside: {folder}")
    return row


def render(wf: Workflow, runs: list[str]):
    from rich.console import Group
    from rich.progress_bar import ProgressBar
    from rich.table import Table
    from rich.text import Text

    paths = wf.paths
    steps = [f"{what:11s} {'done' if path.is_file() else 'not yet':8s} {path.parent}" for what, path in (
        ("weights", paths.hf_manifest), ("torch_dist", paths.torch_dist_sentinel), ("fp8", paths.fp8_sentinel))]
    table = Table(title="runs", title_justify="left")
    for col in ("run", "backend", "progress", "rollouts", "last reward", "last eval", "last checkpoint",
                "kept checkpoints", "Slurm job"):
        table.add_column(col, no_wrap=col in ("progress", "rollouts"))
    rows = [run_row(wf, name) for name in runs]
    for r in rows:
        table.add_row(r["run"], r["backend"], ProgressBar(total=max(1, r["total"]), completed=r["done"], width=20),
                      f"{r['done']}/{r['total']}", "-" if r["reward"] is None else f"{r['reward']:.3f}",
                      ", ".join(f"{k} {v:.3f}" for k, v in r["eval"].items()) or "-", r["checkpoint"],
                      f"{r['kept']}" + (f" ({disk.human(r['kept_bytes'])})" if r["kept_bytes"] is not None else ""),
                      r["job"] or "-")
    notes = [Text.from_markup(f"  {r['run']}: {n}") for r in rows for n in r["notes"]]
    return Group(*(Text(s) for s in steps), table, *notes)


def show_status(wf: Workflow, run: str | None, watch: float | None = None) -> int:
    from rich.console import Console
    from rich.live import Live

    if run is not None and run not in wf.runs:
        raise GlmsnakeError(f"no run named {run!r}", f"choose one of {sorted(wf.runs)}")
    runs = [run] if run else list(wf.runs)
    console = Console(width=None if sys.stdout.isatty() else 200)
    if watch is None:
        console.print(render(wf, runs))
        return 0
    try:
        with Live(render(wf, runs), console=console, refresh_per_second=1) as live:
            while True:
                time.sleep(watch)
                live.update(render(wf, runs))
    except KeyboardInterrupt:
        return 0
