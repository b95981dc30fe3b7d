"""What the steps share: the launcher's explicit parameters from the config, job records, input checks."""

from __future__ import annotations

from typing import Any

from glmsnake import contents
from glmsnake.config import Allocation as AllocationConfig
from glmsnake.config import Workflow
from glmsnake.launch.spec import Allocation, Cluster, ContainerSettings, SlurmSettings


def cluster(wf: Workflow) -> Cluster:
    """Where multi-node jobs run: the launcher, the `slurm:` section, the preset's container."""
    s, c = wf.user.slurm, wf.preset.container
    return Cluster(
        launcher=wf.user.launcher,
        slurm=SlurmSettings(partition=s.partition, account=s.account, qos=s.qos, constraint=s.constraint,
                            network_interface=s.network_interface, exclude=tuple(s.exclude), preflight=s.preflight,
                            exclude_bad_nodes=s.exclude_bad_nodes, preflight_retries=s.preflight_retries,
                            preflight_allreduce=s.preflight_allreduce, preflight_nccl=s.preflight_nccl),
        # base_dir is mounted too: every task reads and writes there.
        container=ContainerSettings(runtime=c.runtime, image=c.image,
                                    mounts=tuple(dict.fromkeys([*c.mounts, str(wf.base)])),
                                    task_runtime=str(wf.paths.task_runtime)),
    )


def allocation(a: AllocationConfig) -> Allocation:
    return Allocation(nodes=a.nodes, gpus_per_node=a.gpus_per_node, cpus_per_task=a.cpus_per_task,
                      mem_gb=a.mem_gb, time_min=a.time_min, exclusive=a.exclusive)


def job_record(rec: Any) -> dict[str, Any]:
    """The job id and nodes of a launch record, for a sentinel; with preflight's cost and any nodes
    it left out (and the jobs that found them)."""
    out = {}
    for k in ("job_id", "nodes"):
        v = getattr(rec, k, None)
        if v is not None:
            out[k] = v if isinstance(v, (str, int, list)) else str(v)
    verdict = getattr(rec, "preflight", None) or {}
    if "wall_s" in verdict:
        out["preflight_s"] = verdict["wall_s"]
    if getattr(rec, "excluded", None):
        out["excluded"] = list(rec.excluded)
        out["retried"] = list(rec.retried)
    return out


def check_hf_unchanged(wf: Workflow) -> None:
    """The HF folder still holds what download_hf recorded (names, sizes, small files' sha256)."""
    contents.require_unchanged(wf.paths.hf_dir, contents.recorded_in(wf.paths.hf_manifest, "files"),
                               f"the HF weights in {wf.paths.hf_dir}", "download_hf")
