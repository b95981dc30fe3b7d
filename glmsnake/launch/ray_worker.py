"""A worker rank's part of a Ray cluster across an allocation: join the head, stay, leave.

The worker waits for the head's address in the job folder, joins with retries (on one host
at most `start_slots` joins run at once: concurrent `ray start --address` on one host timed
out), and then only watches: it exits as soon as the head says it is done, or when the
head's GCS has been unreachable for `head_lost_s`, so the allocation is released at once. On
the way out it stops exactly the Ray processes it started and deletes its temp folder,
keeping the Ray logs when the job failed. Its own failure is written to the job folder,
where the head picks it up and ends the job naming this node.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from glmsnake import knobs
from glmsnake.launch import signals
from glmsnake.launch.environment import ray_env
from glmsnake.launch.gcs import reachable
from glmsnake.launch.job_folder import JobFolder
from glmsnake.launch.ray_processes import RayNodeLost, RayProcess, RayStartFailed, node_args, reserve_ports, tail
from glmsnake.launch.ray_temp import node_mark, temp_dir
from glmsnake.launch.ray_version import auth_env

if TYPE_CHECKING:
    from glmsnake.launch.ray_spec import RaySpec

START_SLOTS_DIR = Path("/tmp/glmsnake-ray-start")


@contextlib.contextmanager
def start_slot(slots: int) -> Iterator[None]:
    """Host-local semaphore: at most `slots` concurrent `ray start --address` on this host."""
    d = START_SLOTS_DIR
    d.mkdir(exist_ok=True)
    with contextlib.suppress(PermissionError):
        d.chmod(0o1777)
    while True:
        for i in range(max(1, slots)):
            f = open(d / f"slot{i}.lock", "a+")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.close()
                continue
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
                f.close()
            return
        time.sleep(0.1)


def run_worker(spec: RaySpec, rank: int, node: str, address: str, folder: JobFolder, job_id: str) -> dict[str, Any]:
    """Join the head, wait until it is done, tear down; the task's result for a worker rank."""
    t: dict[str, float] = {"task_start": time.time()}
    cpu: dict[str, float] = {}
    head = None
    failed = False
    while head is None:
        head = folder.read(folder.head)
        if folder.read(folder.done):
            return {"role": "worker", "node": node, "address": address, "joined": False, "timings": t}
        if head is None:
            time.sleep(0.1)
    token = folder.read_token()
    t["head_seen"] = time.time()
    auth = auth_env(token)
    os.environ.update(auth)
    env = ray_env(address, auth, {**spec.extra_env, knobs.RAY_JOB.name: node_mark(job_id, rank)})
    log = folder.ray_log(node)
    proc: RayProcess | None = None
    gcs_host, gcs_port = head["gcs"].rsplit(":", 1)
    # Before joining: the head maps Ray node addresses to Slurm node names with this.
    folder.write_worker(rank, node, address, None)
    try:
        last_err = ""
        for attempt in range(1, spec.join_attempts + 1):
            with start_slot(spec.start_slots):
                t.setdefault("slot_acquired", time.time())
                ports = reserve_ports(10 + spec.worker_ports)
                argv = ["ray", "start", f"--address={head['gcs']}", f"--temp-dir={temp_dir(job_id, rank)}",
                        *node_args(address, ports, spec)]
                if not spec.worker_log_monitor:
                    argv.insert(-1, "--include-log-monitor=false")
                proc = RayProcess(argv, env, log, temp_dir(job_id, rank))
                try:
                    proc.wait_started(120)
                    break
                except RayStartFailed as e:
                    last_err = str(e)
                    print(f"[glmsnake] {node}: Ray join attempt {attempt} failed, retrying: {tail(last_err, 1)}",
                          file=sys.stderr, flush=True)
                    proc.stop()
                    # Its Ray logs tell why (the job may still succeed: they are kept apart from ray-logs/).
                    proc.remove_temp(folder.join_failure_logs(node, attempt))
                    proc = None
            time.sleep(1.0 * attempt)
        if proc is None:
            raise RayStartFailed(f"could not join the Ray head at {head['gcs']} after {spec.join_attempts} attempts: {last_err}")
        t["joined"] = time.time()
        folder.write_worker(rank, node, address, proc.pid)
        unreachable_since: float | None = None
        while not folder.is_done():
            if not proc.alive():
                raise RayNodeLost(f"the Ray processes on {node} ({address}) exited:\n"
                                  + tail(log.read_text(errors="replace"), 15))
            if reachable(gcs_host, int(gcs_port)):
                unreachable_since = None
            elif unreachable_since is None:
                unreachable_since = time.time()
            elif time.time() - unreachable_since > spec.head_lost_s:
                raise RayNodeLost(f"the Ray head at {head['gcs']} has been unreachable for {spec.head_lost_s:.0f} s")
            time.sleep(0.5)
        t["head_done_seen"] = time.time()
        return {"role": "worker", "node": node, "address": address, "joined": True, "timings": t, "cpu": cpu}
    except BaseException as e:
        failed = True
        if not folder.is_done():
            folder.write_worker_failed(rank, node, address, f"{type(e).__name__}: {str(e)[:2000]}")
        raise
    finally:
        with signals.shielded():
            if proc is not None:
                cpu.update(proc.cpu_seconds())
                proc.stop()
                keep = failed or (folder.read(folder.done) or {}).get("ok") is False
                proc.remove_temp(folder.ray_logs(node) if keep else None)
            t["stopped"] = time.time()
            with contextlib.suppress(OSError):
                folder.write_worker_stopped(rank, t["stopped"])
