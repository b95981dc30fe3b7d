"""A Ray cluster across a Slurm allocation, one task per node, running one driver.

`run_ray_job(cluster, job, driver_factory)` submits the job (see `run`), and `ray_task(spec)`
runs in every task of it: rank 0 is the head (`ray_head`), the others join it
(`ray_worker`). They find each other through small files in the submitit job folder
(`job_folder`, shared storage). The driver's exit code comes back with the timings of the
bring-up and teardown and the CPU time Ray's processes used on each node.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable

from glmsnake import knobs
from glmsnake.errors import GlmsnakeError
from glmsnake.launch import addresses, signals
from glmsnake.launch.environment import bypass_proxies
from glmsnake.launch.follow import FileFollower
from glmsnake.launch.job_folder import JobFolder
from glmsnake.launch.ray_head import run_head, stop_for_requeue
from glmsnake.launch.ray_processes import RayNodeLost, RayStartFailed
from glmsnake.launch.ray_spec import RaySpec
from glmsnake.launch.ray_temp import sweep_stale_temp_dirs, temp_dir
from glmsnake.launch.ray_version import token_auth_available
from glmsnake.launch.ray_worker import run_worker
from glmsnake.launch.run import run_job
from glmsnake.launch.spec import Cluster, JobSpec
from glmsnake.launch.waiting import JobRecord, wait_released


@dataclass
class JobResult:
    """What the train step records in its sentinel."""

    exit_code: int
    job_id: str  # Ray's submission id
    slurm_job_id: str
    nodes: list[str]
    gpus: float
    timings: dict[str, float]
    status: str = ""
    message: str = ""
    ray_nodes: list[dict[str, Any]] = field(default_factory=list)
    cpu: dict[str, dict[str, float]] = field(default_factory=dict)  # Slurm node -> CPU s by Ray process kind
    attempts: int = 1  # 1 + how often Slurm requeued the job (it resumed each time)
    preflight: dict[str, Any] = field(default_factory=dict)  # the allocation's preflight verdict
    excluded: list[str] = field(default_factory=list)  # nodes preflight left out (then resubmitted)
    retried: list[dict[str, Any]] = field(default_factory=list)  # each resubmission: job id, bad nodes


# --------------------------------------------------------------------------- in every task


def ray_task(spec: RaySpec) -> dict[str, Any]:
    """Run in every task (one per node) of the allocation; rank 0 is the head."""
    rank = int(os.environ["RANK"])
    node = knobs.NODE.raw() or socket.gethostname()
    address = knobs.NODE_ADDR.raw() or addresses.this_node_address(spec.interface)
    folder = JobFolder(os.environ[knobs.JOB_DIR.name])
    job_id = knobs.JOB_ID.raw() or "0"
    bypass_proxies(address)
    token_auth_available()  # every rank: a Ray older than the launcher supports is refused by name
    # Slurm cancels with SIGTERM (submitit would ignore it): it becomes teardown.
    with signals.raise_once():
        with contextlib.suppress(Exception):  # housekeeping: never a reason to fail the job
            sweep_stale_temp_dirs(Path(temp_dir(job_id, rank)).parent)
        if rank == 0:
            return run_head(spec, node, address, folder, job_id)
        return run_worker(spec, rank, node, address, folder, job_id)


class RayTaskFn:
    """Picklable zero-argument callable for run_job."""

    needs = ("ray",)  # from the task's Python (the image's, in a container)

    def __init__(self, spec: RaySpec):
        self.spec = spec

    def __call__(self) -> dict[str, Any]:
        return ray_task(self.spec)

    def on_checkpoint(self) -> None:
        """Called by the checkpointable task on rank 0 before a requeue."""
        stop_for_requeue()


# --------------------------------------------------------------------------- the entry point


def run_ray_job(
    cluster: Cluster,
    job: JobSpec,
    driver_factory: Callable[[str], Any],
    log_path: Path | None = None,
    *,
    object_store_mb: int | None = None,
    cpus_per_node: int | None = None,
    ready_timeout_s: float = 300.0,
    max_requeues: int = 0,
    echo_to: BinaryIO | None = None,
) -> JobResult:
    """Allocate, start Ray on every node, run the driver, tear down; the driver's exit code comes back.

    `driver_factory(head_address)` returns an object with argv, cwd and env (glmsnake.recipe.Driver),
    e.g. `functools.partial(glmsnake.recipe.driver, wf, run_name, interface=...)`. It must be picklable.
    The driver's output is appended to `log_path` (default `<log_dir>/<name>.driver.log`) by the
    head; `echo_to` (the step's stdout, i.e. the rule's log) also gets it while the job runs.
    One task per node: `job.tasks_per_node` must be 1.
    """
    name = job.name
    log_dir = Path(job.log_dir).absolute()
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = Path(log_path).absolute() if log_path else log_dir / f"{name}.driver.log"
    spec = RaySpec(
        nodes=job.allocation.nodes,
        gpus_per_node=job.allocation.gpus_per_node,
        driver_factory=driver_factory,
        log_path=str(log_path),
        interface=cluster.slurm.network_interface,
        cpus_per_node=cpus_per_node,
        object_store_mb=object_store_mb,
        ready_timeout_s=ready_timeout_s,
        job_name=name,
    )
    if job.tasks_per_node != 1:
        raise GlmsnakeError(f"{name}: a Ray cluster runs one task per node (got tasks_per_node={job.tasks_per_node})",
                            "set tasks_per_node=1")
    if cluster.launcher != "slurm":
        raise GlmsnakeError(
            f"{name}: a Ray cluster across an allocation needs launcher=slurm (got {cluster.launcher!r})",
            "run with `--profile profiles/slurm`, or use the local trainer backend on one machine",
        )
    t_submit = time.time()
    with FileFollower(log_path, echo_to) if echo_to is not None else contextlib.nullcontext():
        rec = run_job(cluster, dataclasses.replace(job, log_dir=log_dir), RayTaskFn(spec), max_requeues=max_requeues)
    released_s = wait_released(rec.job_id)
    t_end = time.time()
    head = rec.results[0]
    return JobResult(
        exit_code=int(head.get("exit_code", 1) if head.get("exit_code") is not None else 1),
        job_id=str(head.get("ray_job_id", "")),
        slurm_job_id=rec.job_id,
        nodes=rec.nodes,
        gpus=float(head.get("gpus", 0)),
        timings=_timings(rec, t_submit, t_end, released_s),
        status=str(head.get("status", "")),
        message=str(head.get("message", "")),
        ray_nodes=head.get("ray_nodes", []),
        cpu={r.get("node", f"rank{i}"): r.get("cpu", {}) for i, r in enumerate(rec.results)},
        attempts=rec.attempts,
        preflight=rec.preflight,
        excluded=rec.excluded,
        retried=rec.retried,
    )


def _timings(rec: JobRecord[dict[str, Any]], t_submit: float, t_end: float, released_s: float) -> dict[str, float]:
    """Durations of the job's phases, from the submitting side's clock and the head's."""
    ht = rec.results[0]["timings"]
    timings = {
        "submit_to_running_s": rec.timings.get("running", t_submit) - t_submit,
        "head_start_s": ht.get("head_started", 0) - ht["task_start"],
        "cluster_ready_s": ht.get("cluster_ready", 0) - ht["task_start"],
        "submit_to_cluster_ready_s": ht.get("cluster_ready", 0) - t_submit,
        # From Slurm starting the job (squeue saw it RUNNING, polled every 0.2 s) to ready.
        "running_to_cluster_ready_s": ht.get("cluster_ready", 0) - rec.timings.get("running", t_submit),
        "driver_s": ht.get("driver_done", 0) - ht.get("cluster_ready", 0),
        "head_teardown_s": ht["teardown_end"] - ht["teardown_start"],
        "driver_exit_to_released_s": (t_end - ht["driver_done"]) if "driver_done" in ht else float("nan"),
        "wait_released_s": released_s,
        "total_s": t_end - t_submit,
    }
    joins = [r["timings"].get("joined", 0) - ht["task_start"] for r in rec.results[1:] if r.get("joined")]
    if joins:
        timings["last_worker_joined_s"] = max(joins)
    return timings


__all__ = ["JobResult", "RayNodeLost", "RaySpec", "RayStartFailed", "RayTaskFn", "ray_task", "run_ray_job",
           "stop_for_requeue", "sweep_stale_temp_dirs", "temp_dir"]
