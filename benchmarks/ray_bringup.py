"""Ray bring-up on the Slurm test cluster: job start -> N nodes & GPUs registered, driver exit -> released.

    python benchmarks/ray_bringup.py [--nodes 8] [--slots 1] [--repeat 1]

Needs the loopback test cluster (`python -m tests.cluster.slurm_cluster up`; SLURM_CONF set) or
starts one itself with --start-cluster. Goals (issue 5, 2 cores): job start (Slurm runs it) -> ready
<= 20 s, driver exit -> released <= 10 s; "from sbatch" adds Slurm's scheduling of the job.
Also reports the CPU seconds one idle raylet node costs (head and worker process sessions).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))

from glmsnake import config  # noqa: E402
from glmsnake.launch.ray_cluster import run_ray_job  # noqa: E402
from glmsnake.recipe import Driver  # noqa: E402


def trivial_driver(head: str) -> Driver:
    code = "import ray; ray.init(address='auto'); print('GPUs', ray.cluster_resources().get('GPU'))"
    return Driver(argv=[sys.executable, "-c", code], cwd=str(REPO), env={})


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", type=int, default=8)
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--slots", type=int, default=8, help="concurrent `ray start --address` per host")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--start-cluster", action="store_true")
    a = ap.parse_args()
    os.environ["GLMSNAKE_RAY_START_SLOTS"] = str(a.slots)
    cluster = None
    if a.start_cluster:
        from tests.cluster.slurm_cluster import Cluster

        cluster = Cluster(Path(tempfile.mkdtemp(prefix="gsb", dir="/tmp")))
        cluster.up()
        os.environ["SLURM_CONF"] = str(cluster.conf)
    try:
        base = Path(tempfile.mkdtemp(prefix="gsbench", dir="/tmp"))
        wf = config.load({"base_dir": str(base), "launcher": "slurm"})
        alloc = wf.runs["default"].train.allocation.model_copy(
            update={"nodes": a.nodes, "gpus_per_node": a.gpus_per_node})
        for i in range(a.repeat):
            t0 = time.time()
            r = run_ray_job(wf, alloc, functools.partial(trivial_driver), f"bench{i}", base / "logs",
                            object_store_mb=128)
            t = r.timings
            print(json.dumps({"exit_code": r.exit_code, "nodes": len(r.nodes), "gpus": r.gpus, "slots": a.slots,
                              **{k: round(v, 2) for k, v in t.items()}}))
            head_cpu = next(iter(r.cpu.values()), {})
            workers_cpu = [c for c in list(r.cpu.values())[1:] if c]
            kinds = sorted({k for c in workers_cpu for k in c})
            mean = {k: round(sum(c.get(k, 0.0) for c in workers_cpu) / max(1, len(workers_cpu)), 2) for k in kinds}
            print(json.dumps({"cpu_s_head": head_cpu, "cpu_s_per_worker_mean": mean,
                              "cpu_s_total": round(sum(sum(c.values()) for c in r.cpu.values()), 1)}))
            print(f"head start {t['head_start_s']:.1f}s | workers joined {t.get('last_worker_joined_s', 0):.1f}s "
                  f"| job start -> {a.nodes} nodes/{r.gpus:.0f} GPUs {t['running_to_cluster_ready_s']:.1f}s (goal 20; "
                  f"from sbatch {t['submit_to_cluster_ready_s']:.1f}s) "
                  f"| driver exit -> released {t['driver_exit_to_released_s']:.1f}s (goal 10; head teardown "
                  f"{t['head_teardown_s']:.1f}s) | total {time.time() - t0:.1f}s", flush=True)
    finally:
        if cluster:
            cluster.down()
    return 0


if __name__ == "__main__":
    sys.exit(main())
