"""Ray bring-up on the Slurm test cluster: job start -> N nodes & GPUs registered, driver exit -> released.

    python benchmarks/ray_bringup.py [--nodes 8] [--slots 8] [--repeat 1] [--worker-log-monitor on|off|both]
                                     [--python-also OTHER_VENV/bin/python]

Needs the loopback test cluster (`python -m tests.cluster.slurm_cluster up`; SLURM_CONF set) or
starts one itself with --start-cluster (then in a loopback-only network namespace, tests/netns.py).
Goals (on 2 cores): job start (Slurm runs it) -> ready <= 20 s, driver exit -> released
<= 10 s, preflight (every node checks itself before Ray starts; part of job start -> ready) <= 3 s;
"from sbatch" adds Slurm's scheduling of the job.
Also reports the CPU seconds one idle raylet node costs (head and worker process sessions), and
how busy the whole machine was between job start and ready (CPU-bound or not). `both` runs each
repetition without, then with, the worker nodes' log monitors and prints the ratio. `--python-also`
runs each repetition a second time with another environment's interpreter (its `ray`, its submitit
tasks, so every Ray process) on the same cluster, and prints the ratio: e.g. a venv of pyenv's
CPython (no PGO/LTO) against one of Debian's.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))

from glmsnake import knobs  # noqa: E402
from glmsnake.launch import Allocation, Cluster, JobSpec, run_ray_job  # noqa: E402
from glmsnake.recipe import Driver  # noqa: E402


def trivial_driver(head: str) -> Driver:
    code = "import ray; ray.init(address='auto'); print('GPUs', ray.cluster_resources().get('GPU'))"
    return Driver(argv=[sys.executable, "-c", code], cwd=str(REPO), env={})


class CpuSampler:
    """Machine-wide busy/idle CPU time (/proc/stat) sampled in the background: was a window CPU-bound?"""

    def __init__(self, every_s: float = 0.2):
        self.samples: list[tuple[float, int, int]] = []  # (time, idle jiffies, all jiffies)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every_s,), daemon=True)

    def _run(self, every_s: float) -> None:
        while not self._stop.is_set():
            fields = [int(x) for x in open("/proc/stat").readline().split()[1:]]
            self.samples.append((time.time(), fields[3] + fields[4], sum(fields[:8])))
            self._stop.wait(every_s)

    def __enter__(self) -> "CpuSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def window(self, start: float, end: float) -> tuple[float, float]:
        """(busy CPU-s, idle CPU-s) between the samples nearest to start and end."""
        a = min(self.samples, key=lambda s: abs(s[0] - start))
        b = min(self.samples, key=lambda s: abs(s[0] - end))
        tck = os.sysconf("SC_CLK_TCK")
        idle, total = (b[1] - a[1]) / tck, (b[2] - a[2]) / tck
        return total - idle, idle


def interpreter(python: str = sys.executable) -> str:
    """The base interpreter behind a (venv) python, for the report."""
    code = "import os, sys; print(os.path.realpath(getattr(sys, '_base_executable', sys.executable)))"
    return subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout.strip()


def run_with(python: str, nodes: int, slots: int, monitor: str) -> float:
    """One repetition by `python` (another venv) on this cluster; returns its job start -> ready (s)."""
    env = {**os.environ, "PATH": os.pathsep.join([str(Path(python).parent), os.environ["PATH"]])}
    argv = [python, __file__, "--nodes", str(nodes), "--slots", str(slots),
            "--worker-log-monitor", {"1": "on", "0": "off"}[monitor]]
    out = subprocess.run(argv, env=env, stdout=subprocess.PIPE, text=True, check=True).stdout
    print(out, end="", flush=True)
    return next(json.loads(line)["running_to_cluster_ready_s"] for line in out.splitlines()
                if line.startswith("{") and "running_to_cluster_ready_s" in line)


def one_run(cluster: Cluster, alloc: Allocation, name: str, base: Path, nodes: int, slots: int) -> float:
    """One 8-node job with a trivial driver; prints the timings; returns job start -> ready (s)."""
    t0 = time.time()
    with CpuSampler() as cpu:
        r = run_ray_job(cluster, JobSpec(name, alloc, base / "logs"), functools.partial(trivial_driver),
                        object_store_mb=128)
    t = r.timings
    # t0 is the submit time to within milliseconds (run_ray_job only builds its spec first).
    busy, idle = cpu.window(t0 + t["submit_to_running_s"], t0 + t["submit_to_cluster_ready_s"])
    monitor = knobs.RAY_WORKER_LOG_MONITOR.raw() != "0"
    print(json.dumps({"exit_code": r.exit_code, "nodes": len(r.nodes), "gpus": r.gpus, "slots": slots,
                      "worker_log_monitor": monitor, **{k: round(v, 2) for k, v in t.items()}}))
    head_cpu = next(iter(r.cpu.values()), {})
    workers_cpu = [c for c in list(r.cpu.values())[1:] if c]
    kinds = sorted({k for c in workers_cpu for k in c})
    mean = {k: round(sum(c.get(k, 0.0) for c in workers_cpu) / max(1, len(workers_cpu)), 2) for k in kinds}
    print(json.dumps({"cpu_s_head": head_cpu, "cpu_s_per_worker_mean": mean,
                      "cpu_s_total": round(sum(sum(c.values()) for c in r.cpu.values()), 1),
                      "machine_cpu_s_job_start_to_ready": {"busy": round(busy, 1), "idle": round(idle, 1)}}))
    pre = r.preflight.get("wall_s", float("nan"))  # before any Ray process: all of it adds to job start -> ready
    print(f"[{interpreter()}, worker log monitors {'on' if monitor else 'off'}] preflight {pre:.1f}s (goal 3) "
          f"| head start {t['head_start_s']:.1f}s "
          f"| workers joined {t.get('last_worker_joined_s', 0):.1f}s "
          f"| job start -> {nodes} nodes/{r.gpus:.0f} GPUs {t['running_to_cluster_ready_s']:.1f}s (goal 20; "
          f"from sbatch {t['submit_to_cluster_ready_s']:.1f}s; machine busy {busy:.0f} of {busy + idle:.0f} CPU-s) "
          f"| driver exit -> released {t['driver_exit_to_released_s']:.1f}s (goal 10; head teardown "
          f"{t['head_teardown_s']:.1f}s) | total {time.time() - t0:.1f}s", flush=True)
    return t["running_to_cluster_ready_s"]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", type=int, default=8)
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--slots", type=int, default=8, help="concurrent `ray start --address` per host")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--start-cluster", action="store_true")
    ap.add_argument("--worker-log-monitor", choices=("on", "off", "both"), default="on")
    ap.add_argument("--python-also", help="another environment's python: each repetition runs with it too")
    a = ap.parse_args()
    monitors = {"on": ["1"], "off": ["0"], "both": ["0", "1"]}[a.worker_log_monitor]
    os.environ[knobs.RAY_START_SLOTS.name] = str(a.slots)
    cluster = None
    if a.start_cluster:
        sys.path.insert(0, str(REPO / "tests"))
        import netns  # the cluster and Ray live in a loopback-only network namespace, as in the tests

        why_not = netns.enter_loopback_only()
        print(f"network: {f'host ({why_not})' if why_not else 'own namespace, loopback only'}", flush=True)
        from tests.cluster.slurm_cluster import Cluster as SlurmTestCluster

        cluster = SlurmTestCluster(Path(tempfile.mkdtemp(prefix="gsb", dir="/tmp")))
        cluster.up()
        os.environ["SLURM_CONF"] = str(cluster.conf)
    try:
        base = Path(tempfile.mkdtemp(prefix="gsbench", dir="/tmp"))
        target = Cluster(launcher="slurm")  # Slurm's default partition, no container
        # The tiny preset's training allocation (1 CPU per task), with the nodes and GPUs asked for.
        alloc = Allocation(nodes=a.nodes, gpus_per_node=a.gpus_per_node, cpus_per_task=1, time_min=30)
        for i in range(a.repeat):
            ready: dict[str, float] = {}
            for monitor in monitors:
                os.environ[knobs.RAY_WORKER_LOG_MONITOR.name] = monitor  # read when run_ray_job makes its spec
                ready[monitor] = one_run(target, alloc, f"bench{i}m{monitor}", base, a.nodes, a.slots)
                if a.python_also:
                    other = run_with(a.python_also, a.nodes, a.slots, monitor)
                    print(f"{interpreter(a.python_also)} / {interpreter()}: job start -> ready "
                          f"{other:.1f}s / {ready[monitor]:.1f}s = {other / ready[monitor]:.2f}x", flush=True)
            if len(ready) == 2:
                print(f"worker log monitors on/off: job start -> ready {ready['1']:.1f}s / {ready['0']:.1f}s "
                      f"= {ready['1'] / ready['0']:.2f}x", flush=True)
    finally:
        if cluster:
            cluster.down()
    return 0


if __name__ == "__main__":
    sys.exit(main())
