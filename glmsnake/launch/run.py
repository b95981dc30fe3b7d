"""Run a function in every task of a multi-node allocation and wait for it: submit, wait, clean up.

    results = run_tasks(cluster, JobSpec(name, allocation, log_dir, tasks_per_node), fn)

`fn` (picklable, no arguments) runs in `allocation.nodes * tasks_per_node` tasks with the
torch.distributed environment set (see `task`); results come back in rank order and a
failed task raises `TaskFailed` naming the rank and node (see `waiting`).

The caller blocks until every task is done. SIGINT/SIGTERM (Snakemake's interrupt) cancel
the job; after a failure the job is given a moment to end, then cancelled, so the allocation
is handed back before the error is reported. Every node checks itself first (`preflight`); a
node that fails is named, and with `slurm.exclude_bad_nodes` the job is submitted again without it.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Callable, TypeVar

from glmsnake import knobs
from glmsnake.launch import signals
from glmsnake.launch.executors import submit_tasks
from glmsnake.launch.job_folder import JobFolder
from glmsnake.launch.preflight import VERDICT
from glmsnake.launch.slurm import SlurmRejected
from glmsnake.launch.spec import Cluster, JobSpec
from glmsnake.launch.waiting import JobRecord, TaskFailed, released, wait_job

T = TypeVar("T")


def run_job(
    cluster: Cluster,
    job: JobSpec,
    fn: Callable[[], T],
    *,
    on_running: Callable[[str, list[str]], None] | None = None,
    log: Callable[[str], None] | None = None,
    max_requeues: int = 0,
) -> JobRecord[T]:
    """Like `run_tasks`, returning the job id, node list and timings as well.

    A job whose preflight names bad nodes is submitted again without them when
    `cluster.slurm.exclude_bad_nodes` is set, at most `preflight_retries` times.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    s = cluster.slurm
    retries = s.preflight_retries if (s.exclude_bad_nodes and cluster.launcher == "slurm") else 0
    excluded: list[str] = []
    retried: list[dict[str, Any]] = []
    last_failure: TaskFailed | None = None
    for k in range(retries + 1):
        attempt_cluster = dataclasses.replace(cluster, slurm=dataclasses.replace(s, exclude=(*s.exclude, *excluded)))
        try:
            rec = _run_once(attempt_cluster, job, fn, on_running, log, max_requeues)
        except SlurmRejected:
            if last_failure is None:
                raise
            # Too few nodes left, say: the preflight failure is what the user must see.
            raise last_failure from None
        except TaskFailed as e:
            last_failure = e
            unseen = [f["node"] for f in e.failures if f.get("unseen_folder")]
            found = [*_preflight_verdict(job, e.job_id).get("excludable", []), *unseen]
            bad = [n for n in dict.fromkeys(found) if n not in excluded]
            if not bad or k == retries:
                raise
            excluded += bad
            retried.append({"job_id": e.job_id, "bad_nodes": bad})
            log(f"[glmsnake] {job.name}: preflight failed on {', '.join(bad)} (job {e.job_id}); submitting again "
                f"without {', '.join(excluded)} (retry {k + 1} of {retries})")
            continue
        rec.preflight = _preflight_verdict(job, rec.job_id, rec.attempts - 1)
        rec.excluded, rec.retried = excluded, retried
        return rec
    raise AssertionError("unreachable")


def _preflight_verdict(job: JobSpec, job_id: str | None, attempt: int | None = None) -> dict[str, Any]:
    """The preflight verdict rank 0 wrote into the job's folder ({} if none): of Slurm attempt
    `attempt`, or of the latest attempt that wrote one."""
    if not job_id:
        return {}
    root = JobFolder(Path(job.log_dir).absolute() / "submitit" / str(job_id))
    if attempt is None:
        found = [k for k in range(100) if (root.attempt(k).path / VERDICT).is_file()]  # requeues are few
        attempt = found[-1] if found else 0
    try:
        return json.loads((root.attempt(attempt).path / VERDICT).read_text())
    except (OSError, ValueError):
        return {}


def _run_once(cluster: Cluster, job: JobSpec, fn: Callable[[], T],
              on_running: Callable[[str, list[str]], None] | None, log: Callable[[str], None],
              max_requeues: int) -> JobRecord[T]:
    submitted = submit_tasks(cluster, job, fn, max_requeues=max_requeues)
    log(f"[glmsnake] {job.name}: submitted job {submitted.job_id} ({job.allocation.nodes} node(s) x "
        f"{job.tasks_per_node} task(s), launcher={cluster.launcher}"
        f"{', excluding ' + ','.join(cluster.slurm.exclude) if cluster.slurm.exclude else ''}); "
        f"logs in {submitted.paths.folder}")
    done = False
    # SIGTERM/SIGINT (Ctrl-C, Snakemake's interrupt) raise once, here: the finally cancels the job
    # and a second signal cannot cut that short.
    with signals.raise_once():
        try:
            rec = wait_job(submitted, cluster.launcher, job.tasks_per_node, on_running=on_running)
            done = True
            return rec
        except TaskFailed:
            if cluster.launcher == "slurm":
                # Hand the allocation back before reporting: tasks that are still exiting get a
                # moment, then the job is cancelled.
                if not released(submitted.job_id, knobs.RELEASE_GRACE_S.as_float()):
                    submitted.cancel(check=False)
                    released(submitted.job_id, 30.0)
            done = True
            raise
        finally:
            if not done:
                log(f"[glmsnake] {job.name}: interrupted, cancelling job {submitted.job_id}")
                submitted.cancel(check=False)


def run_tasks(cluster: Cluster, job: JobSpec, fn: Callable[[], T]) -> list[T]:
    """Run `fn` in every task of the job (nodes x tasks_per_node); results in rank order."""
    return run_job(cluster, job, fn).results


__all__ = ["run_job", "run_tasks"]
