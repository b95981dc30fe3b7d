"""Waiting for a submitted multi-node job, and the report of its failure.

`wait_job` blocks until every task has finished and returns their results in rank order.
It follows the job in Slurm (pending reasons that never resolve, requeues, the job ending
without results); after the first task fails the others get a grace period, then the job is
cancelled (a rank stuck in a collective would otherwise hold the allocation until its time
limit). `failure_report` turns what the failed tasks left into one `TaskFailed` that names
rank, node and cause first, and Slurm's own reason when Slurm ended the job.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Generic, TypeVar

from submitit.core import utils as submitit_utils

from glmsnake import disk, knobs
from glmsnake.errors import GlmsnakeError
from glmsnake.launch import slurm
from glmsnake.launch.slurm import SlurmRejected
from glmsnake.launch.task import ATTEMPT_TAG, TaskInfo, requeue_request

T = TypeVar("T")


class TaskFailed(GlmsnakeError):
    """One or more tasks of a multi-node job failed; the message names rank, node and cause."""

    def __init__(self, problem: str, failures: list[dict[str, Any]] | None = None, job_id: str | None = None):
        super().__init__(problem)
        self.failures = failures or []
        self.job_id = job_id


@dataclass
class JobRecord(Generic[T]):
    """What a finished multi-node job leaves for the step's sentinel."""

    job_id: str
    nodes: list[str]
    results: list[T]
    tasks: list[TaskInfo]
    timings: dict[str, float] = field(default_factory=dict)
    folder: str = ""
    attempts: int = 1  # 1 + how often Slurm requeued the job
    preflight: dict[str, Any] = field(default_factory=dict)  # the verdict: per-node seconds, nvls
    excluded: list[str] = field(default_factory=list)  # nodes left out after failing preflight
    retried: list[dict[str, Any]] = field(default_factory=list)  # each resubmission: job id, bad nodes


def _outcome(job: Any, i: int, current: int = 0) -> tuple[str, Any] | None:
    """Task i's result pickle, if it belongs to attempt `current` (a requeued job rewrites them)."""
    sub = job.task(i) if job.num_tasks > 1 else job
    p = sub.paths.result_pickle
    if not p.exists():
        return None
    try:
        out = submitit_utils.pickle_load(p)
    except (EOFError, OSError):
        return None
    if out[0] == "success":
        k = getattr(getattr(out[1], "info", None), "attempt", 0)
    else:
        m = ATTEMPT_TAG.search(str(out[1]))
        k = int(m.group(1)) if m else current
    return out if k == current else None


def _requeue_on_request(job: Any, job_id: str, current: int, asked: set[int]) -> bool:
    """Requeue the job here if its attempt `current` asked for it (a task in a container has no
    scontrol; task.requeue_request); True if it was requeued just now."""
    if current in asked or not requeue_request(job.paths.folder, current).exists():
        return False
    try:
        r = slurm.run(["scontrol", "requeue", job_id])
    except subprocess.TimeoutExpired:
        print(f"[glmsnake] job {job_id}: `scontrol requeue` timed out; trying again", file=sys.stderr, flush=True)
        return False
    asked.add(current)
    how = "requeued it" if r.returncode == 0 else f"`scontrol requeue` failed: {(r.stderr or r.stdout).strip()}"
    print(f"[glmsnake] job {job_id} (attempt {current}) asked to be requeued from here; {how}",
          file=sys.stderr, flush=True)
    if r.returncode != 0:
        return False
    deadline = time.time() + 30  # until Slurm counts the restart: the ending attempt's results are not the job's
    while time.time() < deadline and (slurm.job_restarts(job_id) or 0) <= current:
        time.sleep(0.2)
    return True


LAUNCH_FAILED = re.compile(r"^srun: error: task (\d+) launch failed: (.+)$", re.M)


def _batch_stderr(job: Any) -> Path:
    return (job.task(0) if job.num_tasks > 1 else job).paths.stderr


def _batch_log_size(job: Any) -> int:
    try:
        return _batch_stderr(job).stat().st_size
    except OSError:
        return 0


def _launch_failures(job: Any, start: int = 0) -> dict[int, str]:
    """Tasks srun could not start (`srun: error: task N launch failed: ...` in the batch script's
    log, rank 0's stderr, from offset `start`): they will never write a result, so waiting for one
    is pointless."""
    try:
        with open(_batch_stderr(job), "rb") as f:
            f.seek(start)
            text = f.read(65536).decode(errors="replace")  # launches fail first: the head of the attempt's log
    except OSError:
        return {}
    return {int(m.group(1)): m.group(2).strip() for m in LAUNCH_FAILED.finditer(text)}


def _has_log(job: Any, i: int) -> bool:
    """Whether task i left its stdout or stderr file (Slurm writes them on the task's node)."""
    sub = job.task(i) if job.num_tasks > 1 else job
    return sub.paths.stdout.exists() or sub.paths.stderr.exists()


def _log_tail(job: Any, i: int, n: int = 30) -> str:
    sub = job.task(i) if job.num_tasks > 1 else job
    out = []
    for p in (sub.paths.stderr, sub.paths.stdout):
        try:
            lines = p.read_text(errors="replace").splitlines()
        except OSError:
            continue
        if lines:
            out.append(f"--- {p}\n" + "\n".join(lines[-n:]))
    return "\n".join(out)


def wait_job(
    job: Any,
    launcher: str,
    tasks_per_node: int,
    *,
    on_running: Callable[[str, list[str]], None] | None = None,
    poll_s: float = 0.5,
) -> JobRecord[Any]:
    """Block until every task of `job` has finished; collect results in rank order."""
    fail_grace_s = knobs.FAIL_GRACE_S.as_float()
    result_grace_s = knobs.RESULT_GRACE_S.as_float()
    n = job.num_tasks
    job_id = str(job.job_id)
    outcomes: list[tuple[str, Any] | None] = [None] * n
    nodes: list[str] = []
    t0 = time.time()
    timings: dict[str, float] = {"submitted": t0}
    first_error_at: float | None = None
    ended_at: float | None = None
    cancelled_for_failure = False
    state: str | None = "PENDING"
    last_q = 0.0
    current = 0  # Slurm's restart count: the attempt whose results count
    requeues: list[float] = []
    asked: set[int] = set()  # attempts whose request to be requeued we carried out
    not_started: dict[int, str] = {}  # rank -> why srun could not launch it (read from the batch log)
    log_from = 0  # where the current attempt's part of the batch log starts
    while True:
        if launcher == "slurm":
            _requeue_on_request(job, job_id, current, asked)
            # Before results are read: a requeue is registered (Restarts) before the tasks of
            # the ending attempt write their results, so those are never taken for the job's.
            restarts = slurm.job_restarts(job_id)
            if restarts is not None and restarts > current:
                # Requeued (submitit's checkpoint on USR2, preemption, `scontrol requeue`): the
                # job runs again from the start; only the new attempt's results count.
                current = restarts
                requeues.append(time.time())
                outcomes = [None] * n
                first_error_at, cancelled_for_failure, ended_at, nodes = None, False, None, []
                not_started = {}
                log_from = _batch_log_size(job)  # Slurm appends a requeued attempt's output
                print(f"[glmsnake] job {job_id} was requeued (attempt {current}); waiting for it to run again",
                      file=sys.stderr, flush=True)
        for i in range(n):
            if outcomes[i] is None:
                outcomes[i] = _outcome(job, i, current)
        if all(o is not None for o in outcomes):
            if launcher == "slurm" and _requeue_on_request(job, job_id, current, asked):
                continue  # the attempt asked to be requeued (it had no scontrol): these results end it
            r = slurm.job_restarts(job_id) if launcher == "slurm" else None
            if r is not None and r > current:
                continue  # requeued while we read: those were the ending attempt's results
            break
        now = time.time()
        if launcher == "slurm" and first_error_at is None:
            not_started.update(_launch_failures(job, log_from))
        if first_error_at is None and (not_started or any(o is not None and o[0] == "error" for o in outcomes)):
            first_error_at = now
        if first_error_at is not None and not cancelled_for_failure and now - first_error_at > fail_grace_s:
            job.cancel(check=False)
            cancelled_for_failure = True
        if launcher == "local":
            if job.done() and ended_at is None:
                ended_at = now
        elif now - last_q >= poll_s * 2 or ended_at is None and now - t0 < 5:
            last_q = now
            state, nodelist = slurm.squeue_state(job_id)
            if state == "RUNNING" and not nodes and nodelist:
                nodes = slurm.expand_nodelist(nodelist)
                timings["running"] = now
                if on_running:
                    on_running(job_id, nodes)
            if (state is None or state in slurm.TERMINAL) and ended_at is None:
                ended_at = now
            if state == "PENDING":
                reason = slurm.scontrol_job(job_id).get("Reason", "")
                if any(reason.startswith(h) for h in slurm.HOPELESS):
                    job.cancel(check=False)
                    raise SlurmRejected(
                        f"Slurm will never start job {job_id}: it is pending with reason {reason!r} "
                        f"(`scontrol show job {job_id}`); cancelled it"
                    )
        if ended_at is not None and time.time() - ended_at > result_grace_s:
            break
        time.sleep(poll_s)
    timings["ended"] = time.time()
    if requeues:
        timings["requeued"] = requeues[-1]
    if launcher == "local":
        nodes = [f"local{k}" for k in range(n // tasks_per_node)]

    failures = _failures(job, outcomes, nodes, launcher, tasks_per_node, state, not_started)
    if failures:
        raise failure_report(job_id, n, failures, launcher, Path(job.paths.folder))
    outs = [o[1] for o in outcomes]  # type: ignore[index]
    if not nodes:
        seen: dict[int, str] = {}
        for out in outs:
            seen.setdefault(out.info.node_rank, out.info.node)
        nodes = [seen[k] for k in sorted(seen)]
    return JobRecord(
        job_id=job_id,
        nodes=nodes,
        results=[o.result for o in outs],
        tasks=[o.info for o in outs],
        timings=timings,
        folder=str(job.paths.folder),
        attempts=current + 1,
    )


def _failures(
    job: Any, outcomes: list[tuple[str, Any] | None], nodes: list[str], launcher: str, tasks_per_node: int,
    state: str | None, not_started: dict[int, str] | None = None,
) -> list[dict[str, Any]]:
    """One record (rank, node, error, log tail) per task that failed or left no result."""
    job_id = str(job.job_id)
    failures = []
    logged = [launcher == "slurm" and _has_log(job, i) for i in range(len(outcomes))]
    for i, o in enumerate(outcomes):
        node = nodes[i // tasks_per_node] if i // tasks_per_node < len(nodes) else "?"
        if o is None:
            info = slurm.scontrol_job(job_id) if launcher == "slurm" else {}
            why = info.get("JobState", state or "gone")
            reason = info.get("Reason", "")
            log = _log_tail(job, i)
            # No log from this rank while srun named it, or while another rank left one: its node
            # did not see the folder. (No log anywhere: srun or the batch script failed instead.)
            unseen = (launcher == "slurm" and node != "?" and not logged[i]
                      and (i in (not_started or {}) or any(logged)))
            start = f"could not start on {node} ({(not_started or {})[i]}); " if i in (not_started or {}) else ""
            failures.append({
                "rank": i, "node": node, "unseen_folder": unseen,
                "error": (f"no result and no log from {node}: {start}it may not see the job folder "
                          f"{job.paths.folder} (base_dir must be on storage every node mounts)") if unseen else
                         f"no result ({start}job state {why}{', reason ' + reason if reason and reason != 'None' else ''})",
                "log": log,
            })
        elif o[0] == "error":
            text = str(o[1]).strip()
            ours = re.search(r"^RuntimeError: (rank \d+ on node .*)", text, re.M | re.S)  # past submitit's traceback
            failures.append({"rank": i, "node": node, "error": ours.group(1) if ours else text, "log": ""})
    return failures


def failure_report(job_id: str, n: int, failures: list[dict[str, Any]], launcher: str,
                   folder: Path | None = None) -> TaskFailed:
    """The error for a job whose tasks failed: Slurm's reason if Slurm ended it, the first real failure,
    a full file system under the job's folder (where results are written), details."""
    # Report real failures first: ranks that merely got cancelled afterwards are noise.
    failures.sort(key=lambda f: (not f.get("unseen_folder"), f["error"].startswith("no result"), f["rank"]))
    head = failures[0]
    m = re.search(r"^.*rank \d+ on node .*$", head["error"], re.M)
    first_line = m.group(0).replace("RuntimeError: ", "", 1) if m else (head["error"].splitlines() or [""])[-1]
    if head["error"].startswith("no result"):
        first_line = f"rank {head['rank']} on node {head['node']}: {head['error']}"
        if head.get("unseen_folder"):
            first_line += "; fix: put base_dir on a shared filesystem, or leave the node out (`slurm.exclude_bad_nodes`)"
    detail = "\n\n".join(
        f"[rank {f['rank']} on node {f['node']}]\n{f['error']}\n{f['log']}".rstrip() for f in failures[:4]
    )
    ended = ""
    if launcher == "slurm":
        info = slurm.scontrol_job(job_id)
        deadline = time.time() + 10  # the job may still be completing: its final state is the cause
        while info.get("JobState") in ("RUNNING", "COMPLETING", "CONFIGURING") and time.time() < deadline:
            time.sleep(0.5)
            info = slurm.scontrol_job(job_id)
        if info.get("JobState") in slurm.SLURM_ENDED:
            ended = (f"Slurm ended job {job_id}: {info['JobState']} (time limit {info.get('TimeLimit', '?')}, "
                     f"ran {info.get('RunTime', '?')}); ")
    full = disk.full_disk_note(folder) if folder is not None else ""
    return TaskFailed(
        f"{ended}job {job_id}: {len(failures)} of {n} task(s) failed; first: {first_line}"
        f"{'; ' + full if full else ''}\n{detail}",
        failures=failures, job_id=job_id,
    )


def wait_released(job_id: str, timeout: float = 60.0) -> float:
    """Block until Slurm no longer holds the job's nodes; returns the seconds waited."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        state, _ = slurm.squeue_state(job_id)
        if state is None or state in slurm.TERMINAL:
            return time.time() - t0
        time.sleep(0.2)
    return time.time() - t0


def released(job_id: str, timeout: float) -> bool:
    """`wait_released`, then whether Slurm really let go of the job."""
    wait_released(job_id, timeout)
    state, _ = slurm.squeue_state(job_id)
    return state is None or state in slurm.TERMINAL


__all__ = ["JobRecord", "TaskFailed", "failure_report", "released", "wait_job", "wait_released"]
