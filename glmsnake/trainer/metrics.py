"""Per-rollout metrics as JSONL in the run folder, and the plot of what RL users watch.

One line per rollout (`"kind": "rollout"`, `rollout_id`, then slime's names: `rollout/raw_reward`,
`rollout/response_len/mean`, `train/pg_clipfrac`, `train/grad_norm`, `train/entropy_loss`, `perf/*`...;
glmsnake/trainer/metric_names.py) and one per evaluation (`"kind": "eval"`, `trained_rollouts` =
rollouts trained before it, `eval/<name>` = its mean reward). A line is flushed and fsynced before the checkpoint that
covers it is written, so on resume at rollout N (from iteration N - 1) the file holds every rollout < N;
lines of later rollouts (redone after the resume) are dropped first, so the curve
continues instead of restarting or doubling.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

from glmsnake.atomic import write_bytes
from glmsnake.trainer import metric_names as names


def read(path: Path) -> list[dict[str, Any]]:
    """Every record, under today's names (lines of an earlier version are renamed)."""
    out = []
    if not Path(path).is_file():
        return out
    for line in Path(path).read_text().splitlines():
        try:
            out.append(names.upgrade(json.loads(line)))
        except json.JSONDecodeError:
            continue  # a line cut by a kill mid-write
    return out


def rollouts(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if r.get("kind") == "rollout"]


def truncate_to(path: Path, start_rollout: int) -> list[dict[str, Any]]:
    """Keep what a resume from `start_rollout` stands on; returns the kept records."""
    kept = [r for r in read(path)
            if (r.get("kind") == "rollout" and r["rollout_id"] < start_rollout)
            or (r.get("kind") == "eval" and r["trained_rollouts"] <= start_rollout)]
    if start_rollout == 0:
        kept = []
    write_bytes(Path(path), "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept).encode())
    return kept


def append(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    """What the sentinel records: first/last quarter rewards, last metrics, throughput."""
    ro = rollouts(records)
    if not ro:
        return {"rollouts": 0}
    q = max(1, len(ro) // 4)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    ev = [r for r in records if r.get("kind") == "eval"]
    return {
        "rollouts": len(ro),
        "reward_first_quarter": mean([r[names.REWARD] for r in ro[:q]]),
        "reward_last_quarter": mean([r[names.REWARD] for r in ro[-q:]]),
        "last": {k: v for k, v in ro[-1].items() if isinstance(v, (int, float))},
        "last_eval": ev[-1] if ev else None,
        "samples_per_s": mean([r[names.SAMPLES_PER_S] for r in ro]),
    }


# The panels of slime's W&B dashboards that RL users watch (GRPO's on-policy loss is ~0 by construction).
PANELS = (
    ("reward", names.REWARD),
    ("response length (tokens)", names.RESPONSE_LEN),
    ("KL to the reference", names.KL_REF),
    ("clip fraction", "train/pg_clipfrac"),
    ("gradient norm", "train/grad_norm"),
    ("entropy", "train/entropy_loss"),
)


def plot(records: list[dict[str, Any]], png: Path, title: str = "") -> Path:
    """Reward (mean ± std, and eval), response length, KL to the reference, clip fraction, gradient
    norm and entropy against the rollout, written atomically. A panel without data says so."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ro = rollouts(records)
    ev = [r for r in records if r.get("kind") == "eval"]
    fig, axes = plt.subplots(3, 2, figsize=(10, 9), sharex=True)
    for ax, (label, key) in zip(axes.flat, PANELS):
        pts = [(r["rollout_id"], r[key]) for r in ro if isinstance(r.get(key), (int, float))]
        ax.set_title(label, fontsize=10)
        if not pts:
            ax.text(0.5, 0.5, f"not logged\n({key})", ha="center", va="center", transform=ax.transAxes, fontsize=8)
            continue
        x, y = [p[0] for p in pts], [p[1] for p in pts]
        ax.plot(x, y, label=key, color="C0")
        if key == names.REWARD:
            sd = [r.get(names.REWARD_STD, 0.0) for r in ro if isinstance(r.get(key), (int, float))]
            ax.fill_between(x, [a - b for a, b in zip(y, sd)], [a + b for a, b in zip(y, sd)], alpha=0.2, label="± std")
            for i, name in enumerate(sorted({n for r in ev for n in names.eval_sets(r)})):
                e = [(r["trained_rollouts"], r[f"eval/{name}"]) for r in ev if f"eval/{name}" in r]
                ax.plot([p[0] for p in e], [p[1] for p in e], "o--", color=f"C{i + 1}", label=f"eval/{name}")
        ax.legend(loc="best", fontsize=7)
    for ax in axes[-1]:
        ax.set_xlabel("rollout")
    fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    write_bytes(Path(png), buf.getvalue())
    return Path(png)
