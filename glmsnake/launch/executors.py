"""The submitit executor of a multi-node job: sbatch parameters, container, submission.

- `cluster.launcher == "local"`: submitit's LocalExecutor runs every task on this machine
  (MASTER_ADDR=127.0.0.1; node ranks are emulated as rank // tasks_per_node).
- `"slurm"`: submitit's SlurmExecutor (sbatch + srun, one srun task per rank) with the
  allocation's nodes, tasks per node, GPUs per node, CPUs, memory and time, the cluster's
  partition/account/qos/constraint, `--exclusive`, and the container (pyxis
  `--container-image/--container-mounts` on srun, or `apptainer exec`).

Mistakes a user can fix (an unknown partition, more nodes than it has) are reported before
anything is submitted; what only sbatch knows comes back in sbatch's own words.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Any, Callable

import submitit
from submitit.core import utils as submitit_utils

from glmsnake import knobs
from glmsnake.errors import GlmsnakeError
from glmsnake.launch import slurm, task_runtime
from glmsnake.launch.preflight import PreflightSpec
from glmsnake.launch.slurm import SlurmRejected
from glmsnake.launch.spec import Allocation, Cluster, ContainerSettings, JobSpec
from glmsnake.launch.task import CheckpointableTask, Task

# Kept in the environment sbatch sees: where the cluster's slurm.conf is (sbatch/srun/scontrol need it).
KEEP_ENV = ("SLURM_CONF",)
# In the batch script (on the host, outside any container): every node's address, asked once.
NODE_ADDRS_SETUP = (
    f'export {knobs.NODE_ADDRS.name}="$(scontrol show node -o "$SLURM_JOB_NODELIST" 2>/dev/null'
    r" | sed -n 's/^NodeName=\([^ ]*\) .* NodeAddr=\([^ ]*\) .*/\1=\2/p' | paste -sd, -)" + '"'
)


def container_python(container: ContainerSettings, runtime: Path | None = None) -> tuple[str | None, list[str]]:
    """(python command, extra srun args) for the container runtime; (None, []) without one.

    In a container the task starts from the task runtime folder `runtime` (see task_runtime):
    the image's python3 imports glmsnake and submitit from there.
    """
    mounts = list(dict.fromkeys(container.mounts))
    if container.runtime == "none":
        return None, []
    boot = task_runtime.boot_command(runtime, container.image) if runtime else "python3"
    if container.runtime == "pyxis":
        args = [f"--container-image={container.image}", "--container-mount-home"]
        if mounts:
            args.append("--container-mounts=" + ",".join(mounts))
        return boot, args
    bind = f"--bind {shlex.quote(','.join(mounts))} " if mounts else ""
    return f"apptainer exec --nv {bind}{shlex.quote(container.image)} {boot}", []


def require_mounted(container: ContainerSettings, path: Path, what: str) -> None:
    """`path` must be seen at the same place inside the container: under a mount (SRC, or SRC:SRC),
    or under $HOME for pyxis (--container-mount-home). Otherwise the task cannot start there."""
    path = Path(path).absolute()
    roots = [Path(m.split(":")[0]) for m in container.mounts
             if len(m.split(":")) == 1 or m.split(":")[1] == m.split(":")[0]]
    if container.runtime == "pyxis":
        roots.append(Path.home())
    if not any(path == r or r in path.parents for r in roots):
        raise GlmsnakeError(
            f"{what} {path} is not inside the container (its mounts: {', '.join(container.mounts) or 'none'})",
            "keep it under base_dir (the steps mount base_dir), or add its folder to `container.mounts`",
        )


def signal_delay_s(allocation: Allocation) -> int:
    """Seconds before the time limit at which Slurm sends USR2: 90, less for very short jobs."""
    return int(min(90, max(10, allocation.time_min * 60 // 4)))


def make_executor(cluster: Cluster, job: JobSpec, folder: Path, max_requeues: int = 0) -> submitit.Executor:
    """The submitit executor for one multi-node job (Slurm or local, from `cluster.launcher`).

    `max_requeues` > 0: how often a job that reaches its time limit is requeued (submitit's
    max_num_timeout; preemptions requeue without limit), for checkpointable tasks.
    """
    folder = Path(folder)
    allocation = job.allocation
    if cluster.launcher == "local":
        ex = submitit.LocalExecutor(folder=folder)
        ex.update_parameters(
            tasks_per_node=allocation.nodes * job.tasks_per_node,
            timeout_min=allocation.time_min,
            gpus_per_node=0,
        )
        return ex
    runtime = None
    if cluster.container.runtime != "none":
        shared = folder.parent if "%j" in folder.name else folder  # submitit's folder: on shared storage
        root = Path(cluster.container.task_runtime or shared / "task-runtime")
        for what, path in (("the job folder", shared), ("the task runtime", root)):
            require_mounted(cluster.container, path, what)
        runtime = task_runtime.ensure(root)
    python, srun_args = container_python(cluster.container, runtime)
    ex = submitit.SlurmExecutor(folder=folder, python=python, max_num_timeout=max_requeues)
    s = cluster.slurm
    params: dict[str, Any] = dict(
        job_name=job.name,
        nodes=allocation.nodes,
        ntasks_per_node=job.tasks_per_node,
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
    if s.exclude:
        params["exclude"] = ",".join(s.exclude)
    if srun_args:
        params["srun_args"] = srun_args
    # Tasks get no hand-set MASTER_ADDR / NODE_RANK: they learn them from the allocation.
    params["setup"] = ["unset MASTER_ADDR MASTER_PORT NODE_RANK RANK WORLD_SIZE LOCAL_RANK", NODE_ADDRS_SETUP]
    ex.update_parameters(**params)
    return ex


def check_partition(cluster: Cluster, job: JobSpec) -> None:
    """Errors a user can fix, found before anything is allocated."""
    if cluster.launcher != "slurm":
        return
    name, allocation = job.name, job.allocation
    part = cluster.slurm.partition or slurm.default_partition()
    if part:
        fields, complaint = slurm.partition_record(part)
        if fields is None:
            have = slurm.partition_names()
            raise GlmsnakeError(
                f"{name}: Slurm partition {part!r} does not exist "
                f"(scontrol: {complaint or 'no such partition'})",
                f"set `slurm.partition` in config/config.yaml to one of {sorted(set(have))}",
            )
        total = int(fields.get("TotalNodes", "0") or 0)
        if total and allocation.nodes > total:
            raise GlmsnakeError(
                f"{name}: asks for {allocation.nodes} nodes but partition {part!r} has only {total}",
                f"lower the allocation's nodes to at most {total}, or pick a larger partition",
            )


def submit(ex: submitit.Executor, task: Task) -> Any:
    """`ex.submit(task)` from a clean environment; sbatch's refusal becomes SlurmRejected."""
    keep = {k: os.environ[k] for k in KEEP_ENV if k in os.environ}
    try:
        with submitit.helpers.clean_env():  # Snakemake may itself run inside a Slurm job
            os.environ.update(keep)
            return ex.submit(task)
    except submitit_utils.FailedJobError as e:
        # CommandFunction puts sbatch's stderr into the message: surface it verbatim.
        msg = str(e)
        lines = [ln for ln in msg.splitlines() if "sbatch:" in ln or "error" in ln.lower()]
        raise SlurmRejected("Slurm rejected the job:\n" + ("\n".join(lines) or msg)) from None


def submit_tasks(cluster: Cluster, job: JobSpec, fn: Callable[[], Any], *, max_requeues: int = 0) -> Any:
    """Submit without waiting; returns the submitit job (see `waiting.wait_job`).

    `max_requeues` > 0 makes the job checkpointable: on USR2 (time limit near, preemption)
    submitit requeues it and it runs `fn` again, which must resume by itself.
    """
    if job.tasks_per_node < 1:
        raise GlmsnakeError(f"{job.name}: tasks_per_node must be >= 1 (got {job.tasks_per_node})")
    check_partition(cluster, job)
    folder = Path(job.log_dir).absolute() / "submitit" / "%j"
    checkpointable = max_requeues > 0 and cluster.launcher == "slurm"
    ex = make_executor(cluster, job, folder, max_requeues if checkpointable else 0)
    cls = CheckpointableTask if checkpointable else Task
    check = None
    if cluster.launcher == "slurm" and cluster.slurm.preflight:
        # The deadline is the rendezvous one: a node whose container image is still being pulled
        # is slow, not bad (a node where srun cannot start the task at all is caught by waiting.py).
        check = PreflightSpec(gpus_per_node=job.allocation.gpus_per_node, nodes=job.allocation.nodes,
                              room_bytes=job.room_bytes, deadline_s=knobs.RENDEZVOUS_TIMEOUT_S.as_float(),
                              interface=cluster.slurm.network_interface,
                              allreduce=cluster.slurm.preflight_allreduce, nccl=cluster.slurm.preflight_nccl)
    task = cls(fn, cluster.launcher, job.tasks_per_node, cluster.slurm.network_interface, check)
    return submit(ex, task)


__all__ = ["check_partition", "container_python", "make_executor", "require_mounted", "signal_delay_s", "submit",
           "submit_tasks"]
