"""Multi-node jobs on Slurm (or on this machine): run a function in every task, or a Ray cluster.

The launcher knows nothing of the app's configuration: callers describe the cluster and the
job with the dataclasses of `spec` and call one of the entry points.

    spec.py           what the launcher is told: Cluster, Allocation, JobSpec
    executors.py      the submitit executor: sbatch parameters, container, submission
    task.py           the code inside every task: torch.distributed env, rendezvous
    waiting.py        waiting for a job, and the report of its failure
    run.py            submit + wait + cancel: run_job, run_tasks
    slurm.py          questions to Slurm (squeue, scontrol, sinfo)
    job_folder.py     the files the tasks of a job leave for each other
    ray_cluster.py    a Ray cluster across an allocation: run_ray_job
    ray_spec.py       what every task of a Ray job is told
    ray_head.py       rank 0: the head, the driver, the teardown
    ray_worker.py     the other ranks: join, watch, leave
    ray_processes.py  Ray's processes of one node: start, find (/proc), stop
    ray_temp.py       Ray's temp folders
    gcs.py            polling the head's GCS
    environment.py    the environment of Ray's processes (no proxies, token, node mark)
    jobs.py           the driver through Ray's Jobs SDK
    addresses.py      node addresses and per-job ports
    follow.py         following the driver log into the rule's log
    signals.py        SIGTERM/SIGINT as one exception, cleanups shielded
"""

from glmsnake.launch.executors import check_partition, make_executor, submit_tasks
from glmsnake.launch.ray_cluster import JobResult, RaySpec, run_ray_job
from glmsnake.launch.run import run_job, run_tasks
from glmsnake.launch.slurm import SlurmRejected
from glmsnake.launch.spec import Allocation, Cluster, ContainerSettings, JobSpec, SlurmSettings
from glmsnake.launch.waiting import JobRecord, TaskFailed

__all__ = [
    "Allocation",
    "Cluster",
    "ContainerSettings",
    "JobRecord",
    "JobResult",
    "JobSpec",
    "RaySpec",
    "SlurmRejected",
    "SlurmSettings",
    "TaskFailed",
    "make_executor",
    "check_partition",
    "run_job",
    "run_ray_job",
    "run_tasks",
    "submit_tasks",
]
