"""A run's checkpoints belong to the settings that made them.

The checkpoint root holds `glmsnake.settings.json`: the training key (glmsnake.staleness.train)
of the settings its checkpoints were trained with. Before an attempt starts, the key of the
config is compared with it:

- the same settings (a crash, a requeue, a time limit): resume from the latest checkpoint;
- only `rollout.num_rollout` changed, and no checkpoint lies beyond the new end: the run is made
  longer or shorter, resume;
- anything else changed: the earlier checkpoints and metrics move aside, whole, to
  `runs/<run>/previous/<settings hash>/` (never deleted), and training starts from the
  torch_dist weights. `train.on_change: continue` resumes instead, for any change but the
  architecture (a checkpoint of another architecture cannot be loaded).

Checkpoints from before this record existed are adopted as the current settings' own.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from glmsnake import atomic
from glmsnake.paths import RunPaths

RECORD = "glmsnake.settings.json"
LENGTH = {"rollout.num_rollout"}  # settings that only make a run longer or shorter


def settings_hash(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def changed(old: Any, new: Any, prefix: str = "") -> set[str]:
    """Dotted names of the settings that differ between two keys."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: set[str] = set()
        for k in old.keys() | new.keys():
            out |= changed(old.get(k), new.get(k), f"{prefix}{k}.")
        return out
    return set() if old == new else {prefix.rstrip(".")}


@dataclass(frozen=True)
class Decision:
    action: str  # "start" (nothing to resume) | "resume" | "set_aside"
    why: str
    moved_to: Path | None = None


def _only_length(new: dict[str, Any], diff: set[str], latest: int | None) -> bool:
    return diff <= LENGTH and (latest is None or latest <= new["rollout"]["num_rollout"] - 1)


def decide(old: dict[str, Any] | None, new: dict[str, Any], on_change: str, latest: int | None = None) -> Decision:
    """What an attempt does with checkpoints trained under `old` (the newest at iteration `latest`)."""
    if old is None:
        return Decision("resume", "checkpoints without a settings record: taken as this config's")
    diff = changed(old, new)
    if not diff:
        return Decision("resume", "same settings")
    names = ", ".join(sorted(diff))
    if _only_length(new, diff, latest):
        return Decision("resume", f"the run's length changed ({names})")
    if any(d == "architecture" or d.startswith("architecture.") for d in diff):
        return Decision("set_aside", f"the architecture changed ({names}); its checkpoints cannot be loaded")
    if on_change == "continue":
        return Decision("resume", f"train.on_change: continue, with changed settings ({names})")
    return Decision("set_aside", f"settings changed ({names})")


def prepare(run: RunPaths, key: dict[str, Any], on_change: str) -> Decision:
    """Before an attempt: resume, or move the earlier settings' files aside; then record `key`."""
    root = run.checkpoints
    record = root / RECORD
    iterations = sorted(int(p.name[5:]) for p in root.glob("iter_*") if p.name[5:].isdigit()) if root.is_dir() else []
    if not iterations:
        decision = Decision("start", "no checkpoint yet")
    else:
        old = json.loads(record.read_text())["key"] if record.is_file() else None
        decision = decide(old, key, on_change, iterations[-1])
        if decision.action == "set_aside":
            decision = Decision("set_aside", decision.why, _move_aside(run, settings_hash(old)))
    atomic.write_json(record, {"key": key, "hash": settings_hash(key)})
    return decision


def _move_aside(run: RunPaths, old_hash: str) -> Path:
    dest = run.root / "previous" / old_hash
    n = 1
    while dest.exists():  # the same settings set aside twice: keep both
        n += 1
        dest = run.root / "previous" / f"{old_hash}-{n}"
    dest.mkdir(parents=True)
    # (The plot is a Snakemake output, removed before the job; the metrics it was drawn from move.)
    for p in (run.checkpoints, run.metrics, run.trainer_settings, run.pruned, run.disk_warning):
        if p.exists():
            os.replace(p, dest / p.name)
    atomic.fsync_dir(dest)
    return dest


def set_aside(run: RunPaths) -> list[Path]:
    """The earlier settings' folders of a run (for `glmsnake status`)."""
    prev = run.root / "previous"
    return sorted(p for p in prev.iterdir() if p.is_dir()) if prev.is_dir() else []
