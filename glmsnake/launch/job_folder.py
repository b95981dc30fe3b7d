"""The files a job's tasks leave for each other in its submitit job folder, named in one place.

The tasks of a job run on different nodes and share nothing but this folder (shared storage):
rank 0 publishes its address and port there (rendezvous), and the Ray head and workers tell
each other where the head is, its token, that a worker joined, failed or stopped, and that
the head is done. Every file is written atomically (`glmsnake.atomic`), so a reader on
another node sees either nothing or the whole file.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from glmsnake import atomic


class JobFolder:
    """One attempt's folder of a submitit job: `<log_dir>/submitit/<job id>[/attempt<k>]`."""

    def __init__(self, path: Path | str):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"JobFolder({str(self.path)!r})"

    def attempt(self, k: int) -> JobFolder:
        """The folder of Slurm's k-th requeue: files of one attempt never mix with the one before."""
        return self if k == 0 else JobFolder(self.path / f"attempt{k}")

    # ------------------------------------------------------------------ names

    @property
    def rendezvous(self) -> Path:
        return self.path / "glmsnake.rendezvous.json"  # rank 0's address and port

    @property
    def token(self) -> Path:
        return self.path / "ray.token.json"  # the Ray cluster's auth token (mode 0600)

    @property
    def head(self) -> Path:
        return self.path / "ray.head.json"  # the head's GCS and dashboard addresses

    @property
    def done(self) -> Path:
        return self.path / "ray.done.json"  # the head is done: workers stop

    @property
    def head_timings(self) -> Path:
        return self.path / "ray.head.timings.json"

    def worker(self, rank: int) -> Path:
        return self.path / f"ray.worker{rank}.json"  # node, address and (once joined) pid

    def worker_failed(self, rank: int) -> Path:
        return self.path / f"ray.worker{rank}.failed.json"

    def worker_stopped(self, rank: int) -> Path:
        return self.path / f"ray.worker{rank}.stopped.json"

    def ray_log(self, node: str) -> Path:
        return self.path / f"ray-{node}.log"  # the output of the node's `ray start`

    def ray_logs(self, node: str) -> Path:
        """Where a failed job keeps a node's Ray logs (its temp folder is removed either way)."""
        return self.path / "ray-logs" / node

    def join_failure_logs(self, node: str, attempt: int) -> Path:
        """A failed join attempt's Ray logs: kept apart from ray-logs/ (the job may still succeed)."""
        return self.path / "ray-join-failures" / f"{node}.attempt{attempt}"

    # ------------------------------------------------------------------ reading and writing

    @staticmethod
    def read(path: Path) -> dict[str, Any] | None:
        """A file's JSON, or None while it does not exist (yet)."""
        try:
            return json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def write_rendezvous(self, addr: str, port: int, node: str, job_id: str) -> None:
        atomic.write_json(self.rendezvous, {"addr": addr, "port": port, "node": node, "job_id": job_id})

    def wait_rendezvous(self, timeout: float, what: str) -> dict[str, Any]:
        """Rank 0's rendezvous record, once it appears; TimeoutError after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        delay = 0.05
        while True:
            found = self.read(self.rendezvous)
            if found is not None:
                return found
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what}: {self.rendezvous} did not appear within {timeout:.0f} s")
            time.sleep(delay)
            delay = min(delay * 1.5, 1.0)

    def write_token(self, token: str) -> None:
        """The token file is readable by its owner alone, from its first byte on."""
        atomic.write_json(self.token, {"token": token}, mode=0o600)

    def read_token(self) -> str:
        return json.loads(self.token.read_text())["token"]

    def write_head(self, info: dict[str, Any]) -> None:
        atomic.write_json(self.head, info)

    def write_done(self, **fields: Any) -> None:
        atomic.write_json(self.done, {"at": time.time(), **fields})

    def is_done(self) -> bool:
        return self.done.exists()

    def write_head_timings(self, timings: dict[str, float]) -> None:
        atomic.write_json(self.head_timings, timings)

    def write_worker(self, rank: int, node: str, address: str, pid: int | None) -> None:
        atomic.write_json(self.worker(rank), {"node": node, "address": address, "pid": pid})

    def write_worker_failed(self, rank: int, node: str, address: str, error: str) -> None:
        atomic.write_json(self.worker_failed(rank), {"node": node, "address": address, "error": error})

    def write_worker_stopped(self, rank: int, at: float) -> None:
        atomic.write_json(self.worker_stopped(rank), {"at": at})

    def workers_stopped(self, nodes: int) -> bool:
        """Every worker rank (1 .. nodes-1) has stopped its Ray processes."""
        return all(self.worker_stopped(r).exists() for r in range(1, nodes))


__all__ = ["JobFolder"]
