"""Picklable task functions and the test driver factory for the slurm tests.

They live in an importable module (`tests.cluster.helpers`, with the repo on PYTHONPATH) so
submitit tasks on the test cluster's nodes can unpickle them.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from glmsnake.launch import task
from glmsnake.launch.spec import Allocation
from glmsnake.recipe import Driver

REPO = Path(__file__).resolve().parents[2]

# The tiny preset's allocations: a 2-node conversion and an 8-node training job (1 CPU per task:
# the test nodes share the host's few cores).
CONVERT_ALLOCATION = Allocation(nodes=2, gpus_per_node=8, cpus_per_task=1, time_min=20)
TRAIN_ALLOCATION = Allocation(nodes=8, gpus_per_node=8, cpus_per_task=1, time_min=30)


def task_env() -> dict[str, str]:
    return task.task_env()


def task_env_and_python() -> dict[str, str]:
    """task_env, and which Python and glmsnake the task ran (container tests pickle it by value:
    inside the emulated image, this repository is hidden)."""
    import glmsnake

    return {**task.task_env(), "executable": sys.executable, "glmsnake": glmsnake.__file__,
            "image": os.environ.get("GLMSNAKE_CONTAINER_IMAGE", "")}


def sleep_unless_requeued() -> int:
    """The first attempt sleeps (to be signalled); a requeued one returns its restart count."""
    import time

    k = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    if k == 0:
        time.sleep(120)
    return k


def fail_on_rank_1() -> int:
    if os.environ["RANK"] == "1":
        raise ValueError("deliberate failure")
    return 0


def test_driver(head: str, nodes: int, gpus: int, code: int = 0, sleep: float = 0.0) -> Driver:
    argv = [sys.executable, "tests/cluster/ray_test_driver.py", "--nodes", str(nodes), "--gpus", str(gpus),
            "--exit-code", str(code), "--sleep", str(sleep)]
    # RAY_DEDUP_LOGS=0: the probes' lines differ only in digits, which Ray's dedup would merge.
    return Driver(argv=argv, cwd=str(REPO), env={"no_proxy": f"localhost,127.0.0.1,{head}", "RAY_DEDUP_LOGS": "0"})
