"""What the launcher is told: the cluster it submits to and the job it runs there.

Plain frozen dataclasses (picklable, no validation), so the launcher never depends on the
app's configuration: callers translate their own settings into these.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class SlurmSettings:
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    network_interface: str | None = None  # whose address Ray, gloo and NCCL use (e.g. ib0); None: Slurm's NodeAddr
    exclude: tuple[str, ...] = ()  # nodes never to allocate (sbatch --exclude)
    preflight: bool = True  # every node checks itself before the job's work starts (launch/preflight.py)
    exclude_bad_nodes: bool = False  # a node that fails preflight is excluded and the job submitted again
    preflight_retries: int = 2  # at most this many such resubmissions
    preflight_allreduce: bool = True  # preflight ends with one small all-reduce across the nodes (TCP mesh)
    preflight_nccl: bool = True  # and, on GPU nodes, one NCCL all-reduce across them (one GPU each)


@dataclass(frozen=True)
class ContainerSettings:
    runtime: str = "none"  # "none" | "pyxis" | "apptainer"
    image: str = "slimerl/slime:latest"
    mounts: tuple[str, ...] = ()  # already includes the shared base folder; launch adds nothing
    # Where the task runtime (the pure-Python code tasks import in the image) is written, on
    # storage the container mounts; None: next to the job's submitit folder.
    task_runtime: str | None = None


@dataclass(frozen=True)
class Cluster:
    launcher: str  # "local" | "slurm"
    slurm: SlurmSettings = SlurmSettings()
    container: ContainerSettings = ContainerSettings()


@dataclass(frozen=True)
class Allocation:
    nodes: int = 1
    gpus_per_node: int = 0
    cpus_per_task: int = 2
    mem_gb: int = 0  # 0: all of the node's memory
    time_min: int = 60
    exclusive: bool = False


@dataclass(frozen=True)
class JobSpec:
    """One multi-node job: what every entry point used to take as six parameters."""

    name: str
    allocation: Allocation
    log_dir: Path
    tasks_per_node: int = 1
    room_bytes: int = 0  # free space the job will write under log_dir's filesystem (preflight checks it)


__all__ = ["Allocation", "Cluster", "ContainerSettings", "JobSpec", "SlurmSettings"]
