"""Run the training driver through Ray's Jobs SDK and pass its exit status on.

`submit_and_wait(dashboard_url, driver, log_path, ...)` submits `driver.argv` (run in
`driver.cwd`) with `driver.env` as the runtime env's env_vars, streams the job's log into
`log_path` as it runs, and returns the driver's exit code. `watch()` is called about once a
second; if it raises (e.g. a node was lost) the job is stopped and the error propagates.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


@dataclass
class JobRun:
    job_id: str
    status: str
    exit_code: int
    message: str
    seconds: float


def entrypoint(argv: list[str], cwd: str | None) -> str:
    cmd = shlex.join(argv)
    return f"cd {shlex.quote(cwd)} && exec {cmd}" if cwd else f"exec {cmd}"


class _LogStreamer(threading.Thread):
    """Tails the job's log into a file (Jobs SDK websocket), in a thread of its own."""

    def __init__(self, client: Any, job_id: str, path: Path):
        super().__init__(daemon=True)
        self.client, self.job_id, self.path = client, job_id, path
        self.written = 0
        self.error: str | None = None

    def run(self) -> None:
        async def tail() -> None:
            with open(self.path, "a") as f:
                async for chunk in self.client.tail_job_logs(self.job_id):
                    f.write(chunk)
                    f.flush()
                    self.written += len(chunk)

        try:
            asyncio.run(tail())
        except Exception as e:  # noqa: BLE001 - fall back to get_job_logs at the end
            self.error = f"{type(e).__name__}: {e}"


def _stop_quietly(client: Any, job_id: str) -> None:
    with contextlib.suppress(Exception):
        client.stop_job(job_id)


def submit_and_wait(
    dashboard_url: str,
    driver: Any,
    log_path: str | Path,
    *,
    env: dict[str, str] | None = None,
    watch: Callable[[], Any] | None = None,
    name: str = "glmsnake",
    poll_s: float = 0.5,
) -> JobRun:
    from ray.job_submission import JobSubmissionClient

    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    for k, v in (env or {}).items():
        os.environ[k] = v  # the SDK reads RAY_AUTH_TOKEN from the environment
    client = JobSubmissionClient(dashboard_url)
    env_vars = {k: str(v) for k, v in dict(driver.env).items()}
    env_vars.update({k: v for k, v in (env or {}).items()})
    t0 = time.time()
    job_id = client.submit_job(
        entrypoint=entrypoint(list(driver.argv), driver.cwd),
        runtime_env={"env_vars": env_vars},
        submission_id=f"{name}-{int(t0)}",
    )
    with open(log_path, "a") as f:
        f.write(f"[glmsnake] Ray job {job_id} submitted to {dashboard_url}: {entrypoint(list(driver.argv), driver.cwd)}\n")
    streamer = _LogStreamer(client, job_id, log_path)
    streamer.start()
    status = "PENDING"
    try:
        last_watch = 0.0
        while True:
            status = str(client.get_job_status(job_id))
            status = status.split(".")[-1]
            if status in TERMINAL:
                break
            if watch and time.time() - last_watch >= 1.0:
                last_watch = time.time()
                watch()
            time.sleep(poll_s)
    except BaseException:
        # Ask Ray to stop the driver, but wait at most 1 s: on a Slurm cancel the dashboard is being
        # killed too, and the node teardown after this (which stops the driver anyway) must fit
        # in KillWait.
        stopper = threading.Thread(target=_stop_quietly, args=(client, job_id), daemon=True)
        stopper.start()
        stopper.join(1.0)
        raise
    info = client.get_job_info(job_id)
    streamer.join(timeout=5)
    if streamer.written == 0:
        with contextlib.suppress(Exception), open(log_path, "a") as f:
            f.write(client.get_job_logs(job_id))
    code = info.driver_exit_code
    if code is None:
        code = 0 if status == "SUCCEEDED" else 1
    with open(log_path, "a") as f:
        f.write(f"[glmsnake] Ray job {job_id}: {status}, exit code {code}\n")
    return JobRun(job_id=job_id, status=status, exit_code=int(code), message=str(info.message or ""),
                  seconds=time.time() - t0)


__all__ = ["JobRun", "entrypoint", "submit_and_wait"]
