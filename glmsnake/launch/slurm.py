"""Questions to Slurm (`squeue`, `scontrol`, `sinfo`), and the one parser of `scontrol -o` lines.

Job state comes from `squeue` and `scontrol` (no accounting database needed), never `sacct`.
Every query that can fail answers "unknown" (None, an empty record) instead of raising:
the callers poll, and a briefly busy slurmctld must not end a job.
"""

from __future__ import annotations

import subprocess

from glmsnake.errors import GlmsnakeError

# States in which Slurm no longer runs a job.
TERMINAL = {
    "BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL",
    "OUT_OF_MEMORY", "PREEMPTED", "TIMEOUT", "SPECIAL_EXIT", "REVOKED",
}
# Job states in which Slurm itself ended the job: named first in the error.
SLURM_ENDED = ("TIMEOUT", "PREEMPTED", "NODE_FAIL", "DEADLINE", "OUT_OF_MEMORY", "BOOT_FAIL")
# Pending reasons that never resolve by waiting: cancel and report Slurm's words.
HOPELESS = ("PartitionNodeLimit", "PartitionTimeLimit", "PartitionConfig", "BadConstraints", "InvalidQOS",
            "InvalidAccount", "QOSMaxNodePerJobLimit", "AssocMaxNodesPerJob", "ReqNodeNotAvail, UnavailableNodes")


class SlurmRejected(GlmsnakeError):
    """sbatch refused the job; the message holds Slurm's own words."""


def run(cmd: list[str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def parse_scontrol_line(line: str) -> dict[str, str]:
    """The `Key=Value` fields of one record of `scontrol show <kind> -o` (one record a line)."""
    return dict(kv.split("=", 1) for kv in line.split() if "=" in kv)


# --------------------------------------------------------------------------- jobs


def scontrol_job(job_id: str) -> dict[str, str]:
    """`scontrol show job -o` as fields (JobState, Reason, Restarts, TimeLimit, ...); {} if Slurm cannot say."""
    r = run(["scontrol", "show", "job", "-o", str(job_id)])
    if r.returncode != 0:
        return {}
    return parse_scontrol_line(r.stdout)


def job_restarts(job_id: str) -> int | None:
    """How often Slurm has requeued the job (its Restarts field); None if Slurm cannot say."""
    try:
        return int(scontrol_job(job_id).get("Restarts", ""))
    except ValueError:
        return None


def squeue_state(job_id: str) -> tuple[str | None, str]:
    """(state, nodelist) of a job from squeue; (None, "") once Slurm has forgotten it."""
    r = run(["squeue", "-h", "--states=all", "-j", str(job_id), "-o", "%T|%N|%r"])
    line = r.stdout.strip().splitlines()
    if r.returncode != 0 or not line:
        return None, ""
    state, nodes, _reason = (line[0].split("|") + ["", ""])[:3]
    return state.strip(), nodes.strip()


def unfinished_jobs(job_ids: list[str]) -> set[str] | None:
    """Which of these jobs Slurm still has pending, running or completing; None if Slurm cannot say."""
    if not job_ids:
        return set()
    r = run(["squeue", "-h", "-j", ",".join(job_ids), "-o", "%i"])
    if r.returncode != 0:
        return set() if "Invalid job id" in r.stderr else None  # squeue -j <one unknown id> fails so
    return set(r.stdout.split())


def expand_nodelist(nodelist: str) -> list[str]:
    if not nodelist or nodelist in ("(null)",):
        return []
    r = run(["scontrol", "show", "hostnames", nodelist])
    return r.stdout.split() if r.returncode == 0 else [nodelist]


# --------------------------------------------------------------------------- partitions and nodes


def partition_record(name: str) -> tuple[dict[str, str] | None, str]:
    """(fields of `scontrol show partition -o NAME`, scontrol's complaint); None if there is no such partition."""
    r = run(["scontrol", "show", "partition", "-o", name])
    if r.returncode != 0 or not r.stdout.strip():
        return None, (r.stderr or r.stdout).strip()
    return parse_scontrol_line(r.stdout), ""


def partition_names() -> list[str]:
    """Every partition's name as sinfo lists them (one per node state: may repeat)."""
    return run(["sinfo", "-h", "-o", "%R"]).stdout.split()


def default_partition() -> str | None:
    r = run(["scontrol", "show", "partition", "-o"])
    for line in r.stdout.splitlines():
        fields = parse_scontrol_line(line)
        if fields.get("Default") == "YES":
            return fields.get("PartitionName")
    return None


def node_record(node: str) -> dict[str, str]:
    """`scontrol show node -o NODE` as fields (NodeAddr, NodeHostName, ...); raises if scontrol fails."""
    out = subprocess.run(
        ["scontrol", "show", "node", "-o", node], capture_output=True, text=True, timeout=30, check=True
    ).stdout
    return parse_scontrol_line(out)


__all__ = [
    "HOPELESS",
    "SLURM_ENDED",
    "TERMINAL",
    "SlurmRejected",
    "default_partition",
    "expand_nodelist",
    "job_restarts",
    "node_record",
    "parse_scontrol_line",
    "partition_names",
    "partition_record",
    "run",
    "scontrol_job",
    "squeue_state",
    "unfinished_jobs",
]
