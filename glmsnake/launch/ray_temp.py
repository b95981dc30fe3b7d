"""Ray's temp folders: one per node of a job, removed when the node's Ray stops.

Ray keeps sockets, session logs and runtime envs in its `--temp-dir`. Ours is short (unix
socket paths are limited), named after the job, Slurm's restart count and the node rank
(`/tmp/rj<job>n<rank>`, `/tmp/rj<job>r<k>n<rank>` after the k-th requeue), and deleted at
teardown; a folder a killed job left behind is deleted by the next Ray job on the
node once Slurm no longer runs the job it belongs to.
"""

from __future__ import annotations

import contextlib
import re
import shutil
from pathlib import Path

from glmsnake.launch import slurm
from glmsnake.launch.task import attempt

TEMP_DIR_NAME = re.compile(r"rj(\d+)(?:r\d+)?n(\d+)")


def node_mark(job_id: str, rank: int, restarts: int | None = None) -> str:
    """The mark of one node of one attempt of a job (`knobs.RAY_JOB` in its Ray processes): also its
    temp folder's name.

    A requeued job keeps its id, and Slurm may start the next attempt on the same node while the
    ending one still tears down: each attempt's mark (and folder) is its own, so one attempt's
    teardown never stops, or deletes the folder of, the next one's Ray.
    """
    k = attempt() if restarts is None else restarts
    return f"{job_id}n{rank}" if k == 0 else f"{job_id}r{k}n{rank}"


def temp_dir(job_id: str, rank: int, restarts: int | None = None) -> str:
    """Ray's --temp-dir of one node of a job: short (unix socket paths), and one per node.

    Several raylets of one session on one host (the test cluster) would otherwise pick
    their socket names (`sockets/raylet.N`) in the same folder, which races when they start
    at the same moment ("The current node timed out during startup").
    """
    return f"/tmp/rj{node_mark(job_id, rank, restarts)}"


def remove_temp(temp: Path, keep_logs_in: Path | None = None) -> None:
    """Delete a stopped node's Ray temp folder; copy its session logs to `keep_logs_in` first, if given."""
    if keep_logs_in is not None:
        logs = Path(temp) / "session_latest" / "logs"
        with contextlib.suppress(OSError, shutil.Error):
            shutil.copytree(logs, keep_logs_in, dirs_exist_ok=True, ignore_dangling_symlinks=True)
    shutil.rmtree(temp, ignore_errors=True)


def sweep_stale_temp_dirs(root: Path = Path("/tmp")) -> list[str]:
    """Delete Ray temp folders of jobs Slurm no longer runs; returns what was deleted.

    A job killed at its time limit gets KillWait seconds (30 by default) between SIGTERM and
    SIGKILL, which is not always enough to stop Ray and delete the folder; the next Ray job
    on the node deletes it then. Folders of jobs still pending/running, of other users (no
    permission), or when Slurm cannot be asked, are left alone.
    """
    found: dict[str, list[Path]] = {}
    for d in root.glob("rj*n*"):
        m = TEMP_DIR_NAME.fullmatch(d.name)
        if m and d.is_dir() and not d.is_symlink():
            found.setdefault(m[1], []).append(d)
    alive = slurm.unfinished_jobs(sorted(found)) if found else set()
    if alive is None:
        return []
    removed = []
    for job, dirs in found.items():
        if job in alive:
            continue
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)
            if not d.exists():
                removed.append(str(d))
    return sorted(removed)


__all__ = ["TEMP_DIR_NAME", "node_mark", "remove_temp", "sweep_stale_temp_dirs", "temp_dir"]
