"""`glmsnake preflight`: the allocation checks alone, on a fresh allocation, before a long run.

The same per-node checks every multi-node step runs first (launch/preflight.py), on the shape of
a run's training allocation (or `--nodes N` of it), with nothing started after them. Prints one
line per node; a failed check is an error naming the node, the check and the fix.
"""

from __future__ import annotations

import dataclasses
import json

from glmsnake.config import Workflow
from glmsnake.errors import GlmsnakeError
from glmsnake.launch import JobSpec, run_job
from glmsnake.launch.job_folder import JobFolder
from glmsnake.launch.preflight import REPORTS
from glmsnake.launch.task import task_env
from glmsnake.steps.common import allocation, cluster


def check_cluster(wf: Workflow, run: str | None = None, nodes: int | None = None) -> int:
    if wf.user.launcher != "slurm":
        raise GlmsnakeError("preflight checks a Slurm allocation (launcher is local)",
                            "set `launcher: slurm` in the config, or pass --config launcher=slurm")
    name = run or next(iter(wf.runs))
    if name not in wf.runs:
        raise GlmsnakeError(f"no run named {name!r}", f"choose one of {sorted(wf.runs)}")
    alloc = allocation(wf.runs[name].train.allocation)
    if nodes is not None:
        if nodes < 1:
            raise GlmsnakeError(f"--nodes must be at least 1 (got {nodes})", "pass --nodes 1 or more")
        alloc = type(alloc)(**{**alloc.__dict__, "nodes": nodes})
    job = JobSpec(name="preflight", allocation=alloc, log_dir=wf.paths.job_logs("preflight"))
    c = cluster(wf)  # the checks always run here, and a bad node is reported, not swapped out
    c = dataclasses.replace(c, slurm=dataclasses.replace(c.slurm, preflight=True, exclude_bad_nodes=False))
    rec = run_job(c, job, task_env)
    reports = JobFolder(rec.folder).attempt(rec.attempts - 1).path / REPORTS
    print(f"preflight: {len(rec.nodes)} node(s) x {alloc.gpus_per_node} GPU(s) passed in "
          f"{rec.preflight.get('wall_s', 0):.1f} s (job {rec.job_id}); NCCL_NVLS_ENABLE={rec.preflight.get('nvls', 0)}")
    for node in rec.nodes:
        try:
            r = json.loads((reports / f"{node}.json").read_text())
        except (OSError, ValueError):
            continue
        print(f"  {node}: GPUs {r.get('smi_gpus', r.get('visible_gpus'))}, driver {r.get('driver') or '-'}, "
              f"CUDA {r.get('cuda') or '-'}, NCCL {r.get('nccl') or '-'}, torch {r.get('torch') or '-'}, "
              f"Ray {r.get('ray') or '-'}, image {r.get('image') or '-'}, {r['free_bytes'] / 1e12:.2f} TB free, "
              f"{_allreduce(r)}{_nccl(r)}, {r['seconds']:.1f} s")
    return 0


def _allreduce(report: dict) -> str:
    a = report.get("allreduce")
    if not isinstance(a, dict):
        return "all-reduce -"
    return f"all-reduce {a['seconds']:.2f} s" if a.get("ok") else f"all-reduce {a.get('skipped') or 'failed'}"


def _nccl(report: dict) -> str:
    a = report.get("nccl_allreduce")
    return f", NCCL all-reduce {a['seconds']:.2f} s" if isinstance(a, dict) and a.get("ok") else ""


__all__ = ["check_cluster"]
