"""What every task of a Ray job is told: the cluster's shape, the driver, the timing knobs.

Made once on the submitting host and pickled by submitit into every task, so the knobs it
reads from the environment are the submitting shell's, the same on every node.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from glmsnake import knobs


@dataclass
class RaySpec:
    """Everything the tasks need; pickled by submitit."""

    nodes: int
    gpus_per_node: int
    driver_factory: Callable[[str], Any]  # head address -> an object with argv, cwd and env (the driver)
    log_path: str  # the step log: the driver's output goes here
    interface: str | None = None
    cpus_per_node: int | None = None  # None: what Slurm gave the task (SLURM_CPUS_ON_NODE)
    object_store_mb: int | None = None
    # Read when the spec is made (on the submitting host), not when this module is imported.
    worker_ports: int = field(default_factory=knobs.RAY_WORKER_PORTS.as_int)
    # Concurrent `ray start --address` on one host (per-node temp dirs make them safe).
    start_slots: int = field(default_factory=knobs.RAY_START_SLOTS.as_int)
    # Every node runs Ray's log monitor, which forwards what actors print to the driver (slime's
    # training and rollout actors log there). GLMSNAKE_RAY_WORKER_LOG_MONITOR=0 leaves it out on
    # worker nodes (one Python process each; benchmarks/ray_bringup.py compares both).
    worker_log_monitor: bool = field(default_factory=lambda: knobs.RAY_WORKER_LOG_MONITOR.raw() != "0")
    join_attempts: int = 3
    early_join: bool = True  # workers get the head's address before the head has started
    ready_timeout_s: float = 300.0
    head_lost_s: float = 15.0  # a worker gives up after the head's GCS is unreachable this long
    job_name: str = "glmsnake"
    extra_env: dict[str, str] = field(default_factory=dict)


__all__ = ["RaySpec"]
