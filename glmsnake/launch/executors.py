"""Run a function in every task of a multi-node allocation (submitit; design section 5).

    results = run_tasks(wf, allocation, tasks_per_node, fn, name, log_dir)

`fn` (picklable, no arguments) runs in `allocation.nodes * tasks_per_node` tasks with the
torch.distributed environment set: RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
NODE_RANK, MASTER_ADDR (rank 0's node address), MASTER_PORT (picked per job by rank 0 and
passed to the others through a small rendezvous file in the job's log folder). Results come
back in rank order; a failed task raises `TaskFailed` naming the rank and node.

- `wf.user.launcher == "local"`: submitit's LocalExecutor runs every task on this machine
  (MASTER_ADDR=127.0.0.1; node ranks are emulated as rank // tasks_per_node).
- `"slurm"`: submitit's SlurmExecutor (sbatch + srun, one srun task per rank) with the
  allocation's nodes, tasks per node, GPUs per node, CPUs, memory and time, the `slurm:`
  section's partition/account/qos/constraint, `--exclusive`, and the preset's container
  (pyxis `--container-image/--container-mounts` on srun, or `apptainer exec`).

The caller blocks until every task is done. SIGINT/SIGTERM (Snakemake's interrupt) cancel
the job. Job state comes from `squeue` (no accounting database needed), never `sacct`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Generic, TypeVar

import submitit
from submitit.core import utils as submitit_utils

from glmsnake.errors import GlmsnakeError
from glmsnake.launch import addresses, signals

if TYPE_CHECKING:
    from glmsnake.config import Allocation, Workflow

T = TypeVar("T")

# After the first task fails, give the others this long to finish (or fail) on their own
# before the job is cancelled: a rank stuck in a collective would otherwise hold the
# allocation until its time limit.
FAIL_GRACE_S = float(os.environ.get("GLMSNAKE_FAIL_GRACE_S", "10"))
# After Slurm says the job ended, how long to wait for result files (shared file systems lag).
RESULT_GRACE_S = float(os.environ.get("GLMSNAKE_RESULT_GRACE_S", "15"))
RENDEZVOUS_TIMEOUT_S = float(os.environ.get("GLMSNAKE_RENDEZVOUS_TIMEOUT_S", "300"))
TERMINAL = {
    "BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL",
    "OUT_OF_MEMORY", "PREEMPTED", "TIMEOUT", "SPECIAL_EXIT", "REVOKED",
}


# Job states in which Slurm itself ended the job: named first in the error.
SLURM_ENDED = ("TIMEOUT", "PREEMPTED", "NODE_FAIL", "DEADLINE", "OUT_OF_MEMORY", "BOOT_FAIL")


class TaskFailed(GlmsnakeError):
    """One or more tasks of a multi-node job failed; the message names rank, node and cause."""

    def __init__(self, problem: str, failures: list[dict[str, Any]] | None = None, job_id: str | None = None):
        super().__init__(problem)
        self.failures = failures or []
        self.job_id = job_id


class SlurmRejected(GlmsnakeError):
    """sbatch refused the job; the message holds Slurm's own words."""


# --------------------------------------------------------------------------- in the task


@dataclass
class TaskInfo:
    """Where a task ran; returned with its result."""

    rank: int
    node_rank: int
    local_rank: int
    node: str
    address: str
    attempt: int = 0  # Slurm's restart count of the job when this task ran (requeues)


@dataclass
class _TaskOutput(Generic[T]):
    info: TaskInfo
    result: T


def task_env() -> dict[str, str]:
    """The torch.distributed variables of the current task (inside `fn`)."""
    keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT",
            "GLMSNAKE_NODE", "GLMSNAKE_NODE_ADDR", "GLMSNAKE_JOB_ID", "GLMSNAKE_JOB_DIR")
    return {k: os.environ[k] for k in keys if k in os.environ}


def _wait_for_file(path: Path, timeout: float, what: str) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    delay = 0.05
    while True:
        try:
            return json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: {path} did not appear within {timeout:.0f} s")
        time.sleep(delay)
        delay = min(delay * 1.5, 1.0)


def _atomic_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def attempt() -> int:
    """How often Slurm has restarted (requeued) the current job: 0 on the first run."""
    try:
        return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    except ValueError:
        return 0


_ATTEMPT_TAG = re.compile(r"\[attempt (\d+)\]")


class _Task:
    """What submitit pickles: sets the distributed env, then calls the user's function."""

    def __init__(self, fn: Callable[[], Any], launcher: str, tasks_per_node: int, interface: str | None):
        self.fn = fn
        self.launcher = launcher
        self.tasks_per_node = tasks_per_node
        self.interface = interface

    def __call__(self) -> _TaskOutput[Any]:
        env = submitit.JobEnvironment()
        rank, world = env.global_rank, env.num_tasks
        if self.launcher == "local":
            node_rank, local_rank = divmod(rank, self.tasks_per_node)
            node, address = f"local{node_rank}", "127.0.0.1"
        else:
            node_rank, local_rank = env.node, env.local_rank
            node = os.environ.get("SLURMD_NODENAME") or env.hostname
            address = addresses.this_node_address(self.interface)
        if self.launcher == "slurm" and not hasattr(self, "checkpoint"):
            # Not checkpointable: Slurm's early USR2 (before the time limit) must not end the
            # step early (submitit would raise); the step keeps its whole time limit.
            with contextlib.suppress(ValueError):  # not the main thread
                signal.signal(signal.SIGUSR2, lambda *_: print("[glmsnake] USR2 ignored (step is not requeueable)",
                                                                file=sys.stderr, flush=True))
        k = attempt()
        # Rendezvous files of a requeued attempt never mix with those of the one before.
        job_dir = env.paths.folder if k == 0 else env.paths.folder / f"attempt{k}"
        job_dir.mkdir(parents=True, exist_ok=True)
        info = TaskInfo(rank=rank, node_rank=node_rank, local_rank=local_rank, node=node, address=address, attempt=k)
        try:
            rdzv = job_dir / "glmsnake.rendezvous.json"
            if rank == 0:
                port = addresses.free_port(address)
                _atomic_json(rdzv, {"addr": address, "port": port, "node": node, "job_id": env.job_id})
                master = {"addr": address, "port": port}
            else:
                master = _wait_for_file(rdzv, RENDEZVOUS_TIMEOUT_S, f"rank {rank} waiting for rank 0's address")
            os.environ.update(
                RANK=str(rank),
                WORLD_SIZE=str(world),
                LOCAL_RANK=str(local_rank),
                LOCAL_WORLD_SIZE=str(self.tasks_per_node),
                NODE_RANK=str(node_rank),
                MASTER_ADDR=str(master["addr"]),
                MASTER_PORT=str(master["port"]),
                GLMSNAKE_NODE=node,
                GLMSNAKE_NODE_ADDR=address,
                GLMSNAKE_JOB_ID=str(env.job_id),
                GLMSNAKE_JOB_DIR=str(job_dir),
            )
            return _TaskOutput(info=info, result=self.fn())
        except BaseException as e:  # noqa: BLE001 - re-raised with where it happened
            raise RuntimeError(
                f"rank {rank} on node {node} ({address}) failed [attempt {k}]: {type(e).__name__}: {e}\n"
                + "".join(traceback.format_exception(e))
            ) from None


class _CheckpointableTask(_Task):
    """A task submitit requeues on USR2 (Slurm's signal before the time limit, or preemption).

    The step resumes by itself (from its own checkpoints), so the requeued job simply runs the
    same task again. Before the requeue, `fn.on_checkpoint()` (if any) runs on rank 0, e.g.
    to stop the Ray cluster cleanly while the tasks are still alive.
    """

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        hook = getattr(self.fn, "on_checkpoint", None)
        if hook is not None:
            try:
                hook()
            except Exception as e:  # noqa: BLE001 - requeue anyway; the next attempt starts clean
                print(f"[glmsnake] on_checkpoint failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        print(f"[glmsnake] requeueing job {os.environ.get('SLURM_JOB_ID')} (attempt {attempt()} ends)",
              file=sys.stderr, flush=True)
        return submitit.helpers.DelayedSubmission(self)


# --------------------------------------------------------------------------- submitting


def _container_python(wf: "Workflow") -> tuple[str | None, list[str]]:
    """(python command, extra srun args) for the preset's container runtime."""
    c = wf.preset.container
    mounts = list(dict.fromkeys([*c.mounts, str(wf.base)]))
    if c.runtime == "pyxis":
        args = [f"--container-image={c.image}", "--container-mount-home"]
        if mounts:
            args.append("--container-mounts=" + ",".join(mounts))
        return "python3", args
    if c.runtime == "apptainer":
        bind = f"--bind {shlex.quote(','.join(mounts))} " if mounts else ""
        return f"apptainer exec --nv {bind}{shlex.quote(c.image)} python3", []
    return None, []


def signal_delay_s(allocation: "Allocation") -> int:
    """Seconds before the time limit at which Slurm sends USR2: 90, less for very short jobs."""
    return int(min(90, max(10, allocation.time_min * 60 // 4)))


def make_executor(
    wf: "Workflow", allocation: "Allocation", tasks_per_node: int, name: str, folder: Path, max_requeues: int = 0
) -> submitit.Executor:
    """The submitit executor for one multi-node step (Slurm or local, from `wf.user.launcher`).

    `max_requeues` > 0: how often a job that reaches its time limit is requeued (submitit's
    max_num_timeout; preemptions requeue without limit), for checkpointable tasks.
    """
    folder = Path(folder)
    if wf.user.launcher == "local":
        ex = submitit.LocalExecutor(folder=folder)
        ex.update_parameters(
            tasks_per_node=allocation.nodes * tasks_per_node,
            timeout_min=allocation.time_min,
            gpus_per_node=0,
        )
        return ex
    python, srun_args = _container_python(wf)
    ex = submitit.SlurmExecutor(folder=folder, python=python, max_num_timeout=max_requeues)
    s = wf.user.slurm
    params: dict[str, Any] = dict(
        job_name=name,
        nodes=allocation.nodes,
        ntasks_per_node=tasks_per_node,
        cpus_per_task=allocation.cpus_per_task,
        time=allocation.time_min,
        mem=f"{allocation.mem_gb}G" if allocation.mem_gb else "0",
        signal_delay_s=signal_delay_s(allocation),
        stderr_to_stdout=False,
    )
    if allocation.gpus_per_node:
        params["gpus_per_node"] = allocation.gpus_per_node
    if allocation.exclusive:
        params["exclusive"] = True
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(s, key):
            params[key] = getattr(s, key)
    if srun_args:
        params["srun_args"] = srun_args
    # Tasks get no hand-set MASTER_ADDR / NODE_RANK: they learn them from the allocation.
    params["setup"] = ["unset MASTER_ADDR MASTER_PORT NODE_RANK RANK WORLD_SIZE LOCAL_RANK"]
    ex.update_parameters(**params)
    return ex


def _run(cmd: list[str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def preflight(wf: "Workflow", allocation: "Allocation", name: str = "step") -> None:
    """Errors a user can fix, found before anything is allocated."""
    if allocation.time_min < allocation.min_time_min:
        raise GlmsnakeError(
            f"{name}: time_min={allocation.time_min} is shorter than the step's minimum of "
            f"{allocation.min_time_min} minutes",
            f"raise the allocation's time_min to at least {allocation.min_time_min}",
        )
    if wf.user.launcher != "slurm":
        return
    part = wf.user.slurm.partition or _default_partition()
    if part:
        r = _run(["scontrol", "show", "partition", "-o", part])
        if r.returncode != 0 or not r.stdout.strip():
            have = _run(["sinfo", "-h", "-o", "%R"]).stdout.split()
            raise GlmsnakeError(
                f"{name}: Slurm partition {part!r} does not exist "
                f"(scontrol: {(r.stderr or r.stdout).strip() or 'no such partition'})",
                f"set `slurm.partition` in config/config.yaml to one of {sorted(set(have))}",
            )
        fields = dict(kv.split("=", 1) for kv in r.stdout.split() if "=" in kv)
        total = int(fields.get("TotalNodes", "0") or 0)
        if total and allocation.nodes > total:
            raise GlmsnakeError(
                f"{name}: asks for {allocation.nodes} nodes but partition {part!r} has only {total}",
                f"lower the allocation's nodes to at most {total}, or pick a larger partition",
            )


_KEEP_ENV = ("SLURM_CONF",)  # where the cluster's slurm.conf is: needed by sbatch/srun/scontrol


def _default_partition() -> str | None:
    r = _run(["scontrol", "show", "partition", "-o"])
    for line in r.stdout.splitlines():
        fields = dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
        if fields.get("Default") == "YES":
            return fields.get("PartitionName")
    return None


# Pending reasons that never resolve by waiting: cancel and report Slurm's words.
HOPELESS = ("PartitionNodeLimit", "PartitionTimeLimit", "PartitionConfig", "BadConstraints", "InvalidQOS",
            "InvalidAccount", "QOSMaxNodePerJobLimit", "AssocMaxNodesPerJob", "ReqNodeNotAvail, UnavailableNodes")


def _submit(ex: submitit.Executor, task: _Task) -> Any:
    keep = {k: os.environ[k] for k in _KEEP_ENV if k in os.environ}
    try:
        with submitit.helpers.clean_env():  # Snakemake may itself run inside a Slurm job
            os.environ.update(keep)
            return ex.submit(task)
    except submitit_utils.FailedJobError as e:
        # CommandFunction puts sbatch's stderr into the message: surface it verbatim.
        msg = str(e)
        lines = [ln for ln in msg.splitlines() if "sbatch:" in ln or "error" in ln.lower()]
        raise SlurmRejected("Slurm rejected the job:\n" + ("\n".join(lines) or msg)) from None


# --------------------------------------------------------------------------- watching


def squeue_state(job_id: str) -> tuple[str | None, str]:
    """(state, nodelist) of a job from squeue; (None, "") once Slurm has forgotten it."""
    r = _run(["squeue", "-h", "--states=all", "-j", str(job_id), "-o", "%T|%N|%r"])
    line = r.stdout.strip().splitlines()
    if r.returncode != 0 or not line:
        return None, ""
    state, nodes, _reason = (line[0].split("|") + ["", ""])[:3]
    return state.strip(), nodes.strip()


def unfinished_jobs(job_ids: list[str]) -> set[str] | None:
    """Which of these jobs Slurm still has pending, running or completing; None if Slurm cannot say."""
    if not job_ids:
        return set()
    r = _run(["squeue", "-h", "-j", ",".join(job_ids), "-o", "%i"])
    if r.returncode != 0:
        return set() if "Invalid job id" in r.stderr else None  # squeue -j <one unknown id> fails so
    return set(r.stdout.split())


def expand_nodelist(nodelist: str) -> list[str]:
    if not nodelist or nodelist in ("(null)",):
        return []
    r = _run(["scontrol", "show", "hostnames", nodelist])
    return r.stdout.split() if r.returncode == 0 else [nodelist]


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
        m = _ATTEMPT_TAG.search(str(out[1]))
        k = int(m.group(1)) if m else current
    return out if k == current else None


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


def _restarts(job_id: str) -> int | None:
    try:
        return int(_scontrol_job(job_id).get("Restarts", ""))
    except ValueError:
        return None


def _scontrol_job(job_id: str) -> dict[str, str]:
    r = _run(["scontrol", "show", "job", "-o", str(job_id)])
    if r.returncode != 0:
        return {}
    return dict(kv.split("=", 1) for kv in r.stdout.split() if "=" in kv)


def wait_job(
    job: Any,
    launcher: str,
    tasks_per_node: int,
    *,
    on_running: Callable[[str, list[str]], None] | None = None,
    poll_s: float = 0.5,
) -> JobRecord[Any]:
    """Block until every task of `job` has finished; collect results in rank order."""
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
    while True:
        if launcher == "slurm":
            # Before results are read: a requeue is registered (Restarts) before the tasks of
            # the ending attempt write their results, so those are never taken for the job's.
            restarts = _restarts(job_id)
            if restarts is not None and restarts > current:
                # Requeued (submitit's checkpoint on USR2, preemption, `scontrol requeue`): the
                # job runs again from the start; only the new attempt's results count.
                current = restarts
                requeues.append(time.time())
                outcomes = [None] * n
                first_error_at, cancelled_for_failure, ended_at, nodes = None, False, None, []
                print(f"[glmsnake] job {job_id} was requeued (attempt {current}); waiting for it to run again",
                      file=sys.stderr, flush=True)
        for i in range(n):
            if outcomes[i] is None:
                outcomes[i] = _outcome(job, i, current)
        if all(o is not None for o in outcomes):
            r = _restarts(job_id) if launcher == "slurm" else None
            if r is not None and r > current:
                continue  # requeued while we read: those were the ending attempt's results
            break
        now = time.time()
        if first_error_at is None and any(o is not None and o[0] == "error" for o in outcomes):
            first_error_at = now
        if first_error_at is not None and not cancelled_for_failure and now - first_error_at > FAIL_GRACE_S:
            job.cancel(check=False)
            cancelled_for_failure = True
        if launcher == "local":
            if job.done() and ended_at is None:
                ended_at = now
        elif now - last_q >= poll_s * 2 or ended_at is None and now - t0 < 5:
            last_q = now
            state, nodelist = squeue_state(job_id)
            if state == "RUNNING" and not nodes and nodelist:
                nodes = expand_nodelist(nodelist)
                timings["running"] = now
                if on_running:
                    on_running(job_id, nodes)
            if (state is None or state in TERMINAL) and ended_at is None:
                ended_at = now
            if state == "PENDING":
                reason = _scontrol_job(job_id).get("Reason", "")
                if any(reason.startswith(h) for h in HOPELESS):
                    job.cancel(check=False)
                    raise SlurmRejected(
                        f"Slurm will never start job {job_id}: it is pending with reason {reason!r} "
                        f"(`scontrol show job {job_id}`); cancelled it"
                    )
        if ended_at is not None and time.time() - ended_at > RESULT_GRACE_S:
            break
        time.sleep(poll_s)
    timings["ended"] = time.time()
    if requeues:
        timings["requeued"] = requeues[-1]
    if launcher == "local":
        nodes = [f"local{k}" for k in range(n // tasks_per_node)]

    failures = []
    for i, o in enumerate(outcomes):
        node = nodes[i // tasks_per_node] if i // tasks_per_node < len(nodes) else "?"
        if o is None:
            info = _scontrol_job(job_id) if launcher == "slurm" else {}
            why = info.get("JobState", state or "gone")
            reason = info.get("Reason", "")
            failures.append({
                "rank": i, "node": node,
                "error": f"no result (job state {why}{', reason ' + reason if reason and reason != 'None' else ''})",
                "log": _log_tail(job, i),
            })
        elif o[0] == "error":
            failures.append({"rank": i, "node": node, "error": str(o[1]).strip(), "log": ""})
    if failures:
        # Report real failures first: ranks that merely got cancelled afterwards are noise.
        failures.sort(key=lambda f: (f["error"].startswith("no result"), f["rank"]))
        head = failures[0]
        m = re.search(r"^.*rank \d+ on node .*$", head["error"], re.M)
        first_line = m.group(0).replace("RuntimeError: ", "", 1) if m else (head["error"].splitlines() or [""])[-1]
        if head["error"].startswith("no result"):
            first_line = f"rank {head['rank']} on node {head['node']}: {head['error']}"
        detail = "\n\n".join(
            f"[rank {f['rank']} on node {f['node']}]\n{f['error']}\n{f['log']}".rstrip() for f in failures[:4]
        )
        ended = ""
        if launcher == "slurm":
            info = _scontrol_job(job_id)
            deadline = time.time() + 10  # the job may still be completing: its final state is the cause
            while info.get("JobState") in ("RUNNING", "COMPLETING", "CONFIGURING") and time.time() < deadline:
                time.sleep(0.5)
                info = _scontrol_job(job_id)
            if info.get("JobState") in SLURM_ENDED:
                ended = (f"Slurm ended job {job_id}: {info['JobState']} (time limit {info.get('TimeLimit', '?')}, "
                         f"ran {info.get('RunTime', '?')}); ")
        raise TaskFailed(
            f"{ended}job {job_id}: {len(failures)} of {n} task(s) failed; first: {first_line}\n{detail}",
            failures=failures, job_id=job_id,
        )
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


RELEASE_GRACE_S = float(os.environ.get("GLMSNAKE_RELEASE_GRACE_S", "10"))


def _released(job_id: str, timeout: float) -> bool:
    wait_released(job_id, timeout)
    state, _ = squeue_state(job_id)
    return state is None or state in TERMINAL


def wait_released(job_id: str, timeout: float = 60.0) -> float:
    """Block until Slurm no longer holds the job's nodes; returns the seconds waited."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        state, _ = squeue_state(job_id)
        if state is None or state in TERMINAL:
            return time.time() - t0
        time.sleep(0.2)
    return time.time() - t0


# --------------------------------------------------------------------------- the entry points


def submit_tasks(
    wf: "Workflow",
    allocation: "Allocation",
    tasks_per_node: int,
    fn: Callable[[], Any],
    name: str,
    log_dir: Path,
    max_requeues: int = 0,
) -> Any:
    """Submit without waiting; returns the submitit job (see `wait_job`).

    `max_requeues` > 0 makes the job checkpointable: on USR2 (time limit near, preemption)
    submitit requeues it and it runs `fn` again, which must resume by itself.
    """
    if tasks_per_node < 1:
        raise GlmsnakeError(f"{name}: tasks_per_node must be >= 1 (got {tasks_per_node})")
    preflight(wf, allocation, name)
    folder = Path(log_dir).absolute() / "submitit" / "%j"
    checkpointable = max_requeues > 0 and wf.user.launcher == "slurm"
    ex = make_executor(wf, allocation, tasks_per_node, name, folder, max_requeues if checkpointable else 0)
    cls = _CheckpointableTask if checkpointable else _Task
    task = cls(fn, wf.user.launcher, tasks_per_node, wf.user.slurm.network_interface)
    return _submit(ex, task)


def run_job(
    wf: "Workflow",
    allocation: "Allocation",
    tasks_per_node: int,
    fn: Callable[[], T],
    name: str,
    log_dir: Path,
    *,
    on_running: Callable[[str, list[str]], None] | None = None,
    log: Callable[[str], None] | None = None,
    max_requeues: int = 0,
) -> JobRecord[T]:
    """Like `run_tasks`, returning the job id, node list and timings as well."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    job = submit_tasks(wf, allocation, tasks_per_node, fn, name, log_dir, max_requeues=max_requeues)
    log(f"[glmsnake] {name}: submitted job {job.job_id} ({allocation.nodes} node(s) x {tasks_per_node} task(s), "
        f"launcher={wf.user.launcher}); logs in {job.paths.folder}")
    done = False
    # SIGTERM/SIGINT (Ctrl-C, Snakemake's interrupt) raise once, here: the finally cancels the job
    # and a second signal cannot cut that short.
    with signals.raise_once():
        try:
            rec = wait_job(job, wf.user.launcher, tasks_per_node, on_running=on_running)
            done = True
            return rec
        except TaskFailed:
            if wf.user.launcher == "slurm":
                # Hand the allocation back before reporting: tasks that are still exiting get a
                # moment, then the job is cancelled.
                if not _released(job.job_id, RELEASE_GRACE_S):
                    job.cancel(check=False)
                    _released(job.job_id, 30.0)
            done = True
            raise
        finally:
            if not done:
                log(f"[glmsnake] {name}: interrupted, cancelling job {job.job_id}")
                job.cancel(check=False)


def run_tasks(
    wf: "Workflow",
    allocation: "Allocation",
    tasks_per_node: int,
    fn: Callable[[], T],
    name: str,
    log_dir: Path,
) -> list[T]:
    """Run `fn` in every task of `allocation` (nodes x tasks_per_node); results in rank order."""
    return run_job(wf, allocation, tasks_per_node, fn, name, log_dir).results


__all__ = [
    "JobRecord",
    "SlurmRejected",
    "TaskFailed",
    "TaskInfo",
    "attempt",
    "make_executor",
    "preflight",
    "run_job",
    "run_tasks",
    "squeue_state",
    "submit_tasks",
    "task_env",
    "unfinished_jobs",
    "wait_job",
    "wait_released",
]
