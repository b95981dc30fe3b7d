"""Every environment variable glmsnake reads, in one place.

What a user decides belongs in config/config.yaml. What is left here is of three kinds:
- machine settings a user may set in the shell (a cache folder, a kernel switch);
- timing knobs that tests shorten and benchmarks vary (defaults are the production values);
- variables glmsnake sets itself for its own child processes (never set them by hand).

Each is read when asked for, not at import, so a test or a benchmark can set it late.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Knob:
    name: str
    default: str
    kind: str  # "machine" | "timing" | "internal"
    doc: str

    def raw(self) -> str:
        return os.environ.get(self.name, self.default)

    def as_float(self) -> float:
        return float(self.raw())

    def as_int(self) -> int:
        return int(self.raw())

    def as_bool(self) -> bool:
        return self.raw() not in ("", "0", "false", "no")


def _knob(name: str, default: str, kind: str, doc: str) -> Knob:
    k = Knob(name, default, kind, doc)
    KNOBS[name] = k
    return k


KNOBS: dict[str, Knob] = {}

# machine settings
CACHE_DIR = _knob("GLMSNAKE_CACHE_DIR", "", "machine", "where the FP8 kernel is built and cached (default ~/.cache/glmsnake)")
FP8_NATIVE = _knob("GLMSNAKE_FP8_NATIVE", "1", "machine", "0: the FP8 converter keeps to torch ops (no C kernel)")
TEST_NETNS = _knob("GLMSNAKE_TEST_NETNS", "1", "machine", "0: the test session stays in the host's network namespace")

# timing knobs (launch)
FAIL_GRACE_S = _knob("GLMSNAKE_FAIL_GRACE_S", "10", "timing", "after a task fails, how long the others get before the job is cancelled")
RESULT_GRACE_S = _knob("GLMSNAKE_RESULT_GRACE_S", "15", "timing", "after Slurm ends a job, how long to wait for result files")
RELEASE_GRACE_S = _knob("GLMSNAKE_RELEASE_GRACE_S", "10", "timing", "after a failure, how long tasks get to exit before the job is cancelled")
RENDEZVOUS_TIMEOUT_S = _knob("GLMSNAKE_RENDEZVOUS_TIMEOUT_S", "300", "timing", "how long a task waits for rank 0's address and port")
RAY_WORKER_PORTS = _knob("GLMSNAKE_RAY_WORKER_PORTS", "200", "timing", "Ray worker ports reserved per node")
RAY_START_SLOTS = _knob("GLMSNAKE_RAY_START_SLOTS", "4", "timing", "concurrent `ray start --address` on one host")
WRITEBACK_MB = _knob("GLMSNAKE_WRITEBACK_MB", "256", "timing", "torch_dist writers flush to disk every this many MB while writing; 0: only at the end")
PRUNE_INTERVAL_S = _knob("GLMSNAKE_PRUNE_INTERVAL_S", "30", "timing", "how often checkpoints are pruned while training runs")
RAY_WORKER_LOG_MONITOR = _knob("GLMSNAKE_RAY_WORKER_LOG_MONITOR", "1", "timing", "0: no Ray log monitor on worker nodes (benchmark comparison)")

# set by glmsnake for its own processes
CONFIG = _knob("GLMSNAKE_CONFIG", "", "internal", "the user config (JSON) and its files, for the steps (set by the Snakefile)")
LOCAL_RAY_IP = _knob("GLMSNAKE_LOCAL_RAY_IP", "", "internal", "the loopback address of the local trainer's private Ray")
LOCAL_RAY_TMP = _knob("GLMSNAKE_LOCAL_RAY_TMP", "", "internal", "the local trainer's Ray temp folder")
RAY_JOB = _knob("GLMSNAKE_RAY_JOB", "", "internal", "`<slurm job>n<rank>` (`<job>r<k>n<rank>` after the k-th requeue) in every Ray process glmsnake starts (teardown finds them by it)")
BIND_ADDR = _knob("GLMSNAKE_BIND_ADDR", "", "internal", "the node address Ray's Python servers bind (read by launch/_ray_site)")
NODE = _knob("GLMSNAKE_NODE", "", "internal", "a task's Slurm node name")
NODE_ADDR = _knob("GLMSNAKE_NODE_ADDR", "", "internal", "a task's node address")
JOB_ID = _knob("GLMSNAKE_JOB_ID", "", "internal", "a task's Slurm job id")
JOB_DIR = _knob("GLMSNAKE_JOB_DIR", "", "internal", "a task's submitit job folder (rendezvous files)")
NODE_ADDRS = _knob("GLMSNAKE_NODE_ADDRS", "", "internal", "node=NodeAddr,... of the job's nodes, as the batch script asked Slurm (tasks in a container have no scontrol)")
CONTAINER_IMAGE = _knob("GLMSNAKE_CONTAINER_IMAGE", "", "internal", "the image a task runs in (set by container_boot.py), for error messages")
NVLS_ENABLE = _knob("GLMSNAKE_NVLS_ENABLE", "0", "internal", "1 when preflight found NVLink on every node: the driver's NCCL_NVLS_ENABLE")
