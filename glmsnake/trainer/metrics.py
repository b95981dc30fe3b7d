"""Per-rollout metrics as JSONL in the run folder, and the reward/loss plot for `--report`.

One line per rollout (`"kind": "rollout"`, `rollout_id`, `reward_mean`, `reward_std`,
`response_len_mean`, `loss`, `pg_loss`, `ppo_kl`, `kl_ref`, timings, `samples_per_s`...)
and one per evaluation (`"kind": "eval"`, `trained_rollouts` = rollouts trained before it,
`eval/<name>/reward_mean`). A line is flushed and fsynced before the checkpoint that
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


def read(path: Path) -> list[dict[str, Any]]:
    out = []
    if not Path(path).is_file():
        return out
    for line in Path(path).read_text().splitlines():
        try:
            out.append(json.loads(line))
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
        "reward_first_quarter": mean([r["reward_mean"] for r in ro[:q]]),
        "reward_last_quarter": mean([r["reward_mean"] for r in ro[-q:]]),
        "last": {k: v for k, v in ro[-1].items() if isinstance(v, (int, float))},
        "last_eval": ev[-1] if ev else None,
        "samples_per_s": mean([r["samples_per_s"] for r in ro]),
    }


def plot(records: list[dict[str, Any]], png: Path, title: str = "") -> Path:
    """Reward (mean ± std, eval) and loss against rollout id, written atomically."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ro = rollouts(records)
    ev = [r for r in records if r.get("kind") == "eval"]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    x = [r["rollout_id"] for r in ro]
    m = [r["reward_mean"] for r in ro]
    sd = [r["reward_std"] for r in ro]
    ax1.plot(x, m, label="rollout reward (mean)")
    ax1.fill_between(x, [a - b for a, b in zip(m, sd)], [a + b for a, b in zip(m, sd)], alpha=0.2, label="± std")
    for key in sorted({k for r in ev for k in r if k.startswith("eval/") and k.endswith("/reward_mean")}):
        pts = [(r["trained_rollouts"], r[key]) for r in ev if key in r]
        ax1.plot([p[0] for p in pts], [p[1] for p in pts], "o--", label=key)
    ax1.set_ylabel("reward")
    ax1.legend(loc="best", fontsize=8)
    ax2.plot(x, [r.get("loss", float("nan")) for r in ro], label="loss", color="C3")
    ax2.set_ylabel("loss")
    ax2.set_xlabel("rollout")
    ax2.legend(loc="best", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    write_bytes(Path(png), buf.getvalue())
    return Path(png)
