"""One workflow at a time per base_dir.

Two workflows writing one base_dir would delete each other's outputs: Snakemake removes a
job's outputs before it runs it, and each instance keeps its own record of what is done. The
workflow that runs jobs holds an exclusive lock on `<base_dir>/.glmsnake.lock` (flock) for its
whole life; the file names the holder (host, pid, start time, working folder) for the error a
second one gets. The kernel (or the NFS lock manager) drops the lock when the holder dies, so a
stale lock file never blocks: the next workflow simply takes it.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from glmsnake.errors import GlmsnakeError

LOCK_NAME = ".glmsnake.lock"
_held: dict[Path, int] = {}  # base -> open fd: the lock lives as long as this process


def acquire(base: Path) -> None:
    base = Path(base)
    if base in _held:
        return
    base.mkdir(parents=True, exist_ok=True)
    path = base / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise GlmsnakeError(
            f"{base} is in use by another glmsnake workflow ({describe(path)})",
            "wait for it to finish, or give this workflow its own base_dir; "
            "two workflows on one base_dir delete each other's outputs",
        ) from None
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "cwd": os.getcwd()}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
    _held[base] = fd


def describe(path: Path) -> str:
    try:
        h = json.loads(Path(path).read_text())
        return f"host {h['host']}, pid {h['pid']}, started {h['started']}, in {h['cwd']}"
    except (OSError, ValueError, KeyError):
        return "holder unknown"
