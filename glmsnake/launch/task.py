"""The code that runs inside every task of a multi-node job (what submitit pickles).

`Task` sets the torch.distributed environment, then calls the user's function: RANK,
WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, NODE_RANK, MASTER_ADDR (rank 0's node address) and
MASTER_PORT (picked per job by rank 0 and passed to the others through a rendezvous file in
the job folder). A failure is re-raised naming the rank, node and attempt, which the waiting
side reads back from submitit's result file.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Generic, TypeVar

import cloudpickle
import submitit

from glmsnake import atomic, knobs
from glmsnake.errors import GlmsnakeError
from glmsnake.launch import addresses, preflight
from glmsnake.launch.job_folder import JobFolder

T = TypeVar("T")

# What a task's error message says about its attempt (read back by the waiting side).
ATTEMPT_TAG = re.compile(r"\[attempt (\d+)\]")


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
class TaskOutput(Generic[T]):
    info: TaskInfo
    result: T


def task_env() -> dict[str, str]:
    """The torch.distributed variables of the current task (inside `fn`)."""
    keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT",
            knobs.NODE.name, knobs.NODE_ADDR.name, knobs.JOB_ID.name, knobs.JOB_DIR.name)
    return {k: os.environ[k] for k in keys if k in os.environ}


def attempt() -> int:
    """How often Slurm has restarted (requeued) the current job: 0 on the first run."""
    try:
        return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    except ValueError:
        return 0


def where_this_runs() -> str:
    """The image (and its Python) a task runs in, or this node's Python outside a container: for errors."""
    image = knobs.CONTAINER_IMAGE.raw()
    return f"{image} (python3 {sys.version.split()[0]})" if image else f"this node's Python ({sys.executable})"


def check_image(needs: tuple[str, ...]) -> None:
    """The packages a task needs from its Python (the container image's): a clear error, naming
    the image and each missing package, before the task starts anything."""
    missing = [m for m in needs if importlib.util.find_spec(m) is None]
    if not missing:
        return
    image = knobs.CONTAINER_IMAGE.raw()
    raise GlmsnakeError(
        f"{where_this_runs()} has no {', '.join(missing)}; this task needs it",
        "use an image that has it (slime's own image has ray and torch)" if image else
        f"install {' '.join(missing)} into the Python the tasks run with",
    )


class Task:
    """What submitit pickles: sets the distributed env, then calls the user's function.

    `fn.needs` (optional): the packages `fn` imports from the task's Python, checked first.
    """

    def __init__(self, fn: Callable[[], Any], launcher: str, tasks_per_node: int, interface: str | None,
                 preflight_spec: preflight.PreflightSpec | None = None):
        # `fn` travels as bytes, loaded only after the image has been checked for what it needs:
        # loading it imports its module (torch, for the writer), which would fail unexplained.
        self.needs = tuple(getattr(fn, "needs", ()))
        self._fn_blob = cloudpickle.dumps(fn)
        self._fn: Callable[[], Any] | None = fn
        self.launcher = launcher
        self.tasks_per_node = tasks_per_node
        self.interface = interface
        self.preflight_spec = preflight_spec

    @property
    def fn(self) -> Callable[[], Any]:
        if self._fn is None:
            self._fn = cloudpickle.loads(self._fn_blob)
        return self._fn

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fn": None}

    def __call__(self) -> TaskOutput[Any]:
        env = submitit.JobEnvironment()
        rank, world = env.global_rank, env.num_tasks
        if self.launcher == "local":
            node_rank, local_rank = divmod(rank, self.tasks_per_node)
            node, address = f"local{node_rank}", "127.0.0.1"
        else:
            node_rank, local_rank = env.node, env.local_rank
            node = os.environ.get("SLURMD_NODENAME") or env.hostname
            try:
                address = addresses.this_node_address(self.interface)
            except GlmsnakeError:
                if self.preflight_spec is None:
                    raise
                # Preflight names the missing interface with this node among the others'
                # findings (and can leave the node out); until then, Slurm's address will do.
                address = addresses.this_node_address(None)
        if self.launcher == "slurm" and not hasattr(self, "checkpoint"):
            # Not checkpointable: Slurm's early USR2 (before the time limit) must not end the
            # step early (submitit would raise); the step keeps its whole time limit.
            with contextlib.suppress(ValueError):  # not the main thread
                signal.signal(signal.SIGUSR2, lambda *_: print("[glmsnake] USR2 ignored (step is not requeueable)",
                                                                file=sys.stderr, flush=True))
        k = attempt()
        # Rendezvous files of a requeued attempt never mix with those of the one before.
        folder = JobFolder(env.paths.folder).attempt(k)
        folder.path.mkdir(parents=True, exist_ok=True)
        info = TaskInfo(rank=rank, node_rank=node_rank, local_rank=local_rank, node=node, address=address, attempt=k)
        try:
            check_image(self.needs)
            if self.preflight_spec is not None:  # before the port is picked: it may take a while
                verdict = preflight.run(self.preflight_spec, folder.path, rank, local_rank, node, env.num_nodes,
                                        node_rank=node_rank, address=address)
                os.environ[knobs.NVLS_ENABLE.name] = str(verdict["nvls"])
            if rank == 0:
                port = addresses.free_port(address)
                folder.write_rendezvous(address, port, node, env.job_id)
                master = {"addr": address, "port": port}
            else:
                master = folder.wait_rendezvous(knobs.RENDEZVOUS_TIMEOUT_S.as_float(),
                                                f"rank {rank} waiting for rank 0's address")
            os.environ.update({
                "RANK": str(rank),
                "WORLD_SIZE": str(world),
                "LOCAL_RANK": str(local_rank),
                "LOCAL_WORLD_SIZE": str(self.tasks_per_node),
                "NODE_RANK": str(node_rank),
                "MASTER_ADDR": str(master["addr"]),
                "MASTER_PORT": str(master["port"]),
                knobs.NODE.name: node,
                knobs.NODE_ADDR.name: address,
                knobs.JOB_ID.name: str(env.job_id),
                knobs.JOB_DIR.name: str(folder.path),
            })
            return TaskOutput(info=info, result=self.fn())
        except BaseException as e:  # noqa: BLE001 - re-raised with where it happened
            # A problem the user can fix (GlmsnakeError: problem and fix) needs no traceback.
            where = "" if isinstance(e, GlmsnakeError) else "".join(traceback.format_exception(e))
            raise RuntimeError(
                f"rank {rank} on node {node} ({address}) failed [attempt {k}]: {type(e).__name__}: {e}\n" + where
            ) from None


def requeue_request(folder: str | os.PathLike, k: int) -> Path:
    """The file by which attempt `k` asks the submitting side to requeue the job."""
    return Path(folder) / f"glmsnake.requeue.{k}.json"


def _requeue_or_ask(original: Callable[[Any, int], None]) -> Callable[[Any, int], None]:
    """submitit's `_requeue` (scontrol requeue), else a request to the submitting side."""

    def requeue(env: Any, countdown: int) -> None:
        if shutil.which("scontrol") is not None:
            try:
                return original(env, countdown)
            except (OSError, subprocess.SubprocessError) as e:
                print(f"[glmsnake] scontrol requeue failed here ({e})", file=sys.stderr, flush=True)
        _ask_submitter_to_requeue(env, countdown)

    requeue.glmsnake = True  # type: ignore[attr-defined]
    return requeue


def _ask_submitter_to_requeue(env: Any, countdown: int) -> None:
    """submitit's `_requeue` where the task has no scontrol (a container): leave a request in the
    job folder; the submitting side, which waits on the job with Slurm's tools, requeues it."""
    path = requeue_request(env.paths.folder, attempt())
    atomic.write_json(path, {"job_id": env.job_id, "attempt": attempt(), "at": time.time(), "countdown": countdown})
    print(f"[glmsnake] job {env.job_id}: no scontrol here; asked the submitting side to requeue it ({path.name})",
          file=sys.stderr, flush=True)


class CheckpointableTask(Task):
    """A task submitit requeues on USR2 (Slurm's signal before the time limit, or preemption).

    The step resumes by itself (from its own checkpoints), so the requeued job simply runs the
    same task again. Before the requeue, `fn.on_checkpoint()` (if any) runs on rank 0, e.g.
    to stop the Ray cluster cleanly while the tasks are still alive.
    """

    def __call__(self) -> TaskOutput[Any]:
        # Where scontrol is missing or fails (a container), the submitting side requeues (waiting.py).
        from submitit.slurm import slurm as submitit_slurm

        env_cls = submitit_slurm.SlurmJobEnvironment
        if not getattr(env_cls._requeue, "glmsnake", False):
            env_cls._requeue = _requeue_or_ask(env_cls._requeue)
        return super().__call__()

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


__all__ = ["ATTEMPT_TAG", "CheckpointableTask", "Task", "TaskInfo", "TaskOutput", "attempt", "check_image", "requeue_request",
           "task_env"]
