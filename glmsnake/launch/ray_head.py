"""Rank 0's part of a Ray cluster across an allocation: the head, the driver, the teardown.

- The head (`ray start --head --block` as a child process, so Slurm's process tracking sees
  every Ray process) gets an explicit `--node-ip-address`, ports picked per job above Ray's
  default worker range and below the ephemeral range, its own worker port range, a short
  `--temp-dir`, the dashboard bound to the head's address, and token auth (RAY_AUTH_MODE=token;
  the token lives in the job folder, mode 0600) where the image's Ray has it (ray_version).
- It waits, with a deadline, until all nodes and GPUs are registered, then runs the driver
  through the Jobs SDK (`jobs`), streaming its log into the step log; meanwhile a lost raylet
  or a failed worker ends the job with an error naming the Slurm node.
- At the end (also on failure or SIGTERM) it tells the workers it is done, stops exactly the
  Ray processes it started and deletes its temp folder (a failed job's Ray logs are copied to
  `<job folder>/ray-logs/<node>` first).
"""

from __future__ import annotations

import os
import secrets
import time
from typing import TYPE_CHECKING, Any

from glmsnake import knobs
from glmsnake.launch import jobs, signals
from glmsnake.launch.environment import ray_env
from glmsnake.launch.gcs import gcs_nodes
from glmsnake.launch.job_folder import JobFolder
from glmsnake.launch.ray_processes import RayNodeLost, RayProcess, RayStartFailed, node_args, reserve_ports, tail
from glmsnake.launch.ray_temp import node_mark, temp_dir
from glmsnake.launch.ray_version import auth_env

if TYPE_CHECKING:
    from glmsnake.launch.ray_spec import RaySpec

# The head of the Ray cluster this task runs (rank 0 only): what on_checkpoint stops.
_ACTIVE_HEAD: dict[str, Any] = {}


def run_head(spec: RaySpec, node: str, address: str, folder: JobFolder, job_id: str) -> dict[str, Any]:
    """Start the head, wait for every node, run the driver, tear down; the task's result for rank 0."""
    t: dict[str, float] = {"task_start": time.time()}
    token = secrets.token_hex(24)
    folder.write_token(token)
    ports = reserve_ports(16 + spec.worker_ports)
    gcs_port, dash_port, client_port, dash_metric, as_metric = ports[6], ports[7], ports[8], ports[9], ports[11]
    auth = auth_env(token)  # {} where the image's Ray has no token auth (it says so)
    os.environ.update(auth)  # for our own GCS/Jobs clients
    env = ray_env(address, auth, {**spec.extra_env, knobs.RAY_JOB.name: node_mark(job_id, 0),
                                   "DASHBOARD_METRIC_PORT": str(dash_metric),
                                   "AUTOSCALER_METRIC_PORT": str(as_metric)})
    ports = ports[:10] + ports[16:]  # keep 10.. as the worker range
    # No autoscaler monitor (a fixed allocation): one Python process less. (The Ray client
    # server cannot be left out: `ray start` insists on a port for it when it is installed.)
    argv = ["ray", "start", "--head", f"--port={gcs_port}", f"--dashboard-host={address}",
            f"--dashboard-port={dash_port}", "--include-dashboard=true", f"--ray-client-server-port={client_port}",
            "--no-monitor", f"--temp-dir={temp_dir(job_id, 0)}", *node_args(address, ports, spec)]
    gcs = f"{address}:{gcs_port}"
    dashboard = f"http://{address}:{dash_port}"
    log = folder.ray_log(node)
    head_info = {"gcs": gcs, "dashboard": dashboard, "node": node, "address": address}
    if spec.early_join:
        # Workers start their `ray start --address` while the head comes up (it retries the
        # GCS), so the head's start and the joins overlap instead of adding up.
        folder.write_head(head_info)
    proc = RayProcess(argv, env, log, temp_dir(job_id, 0))
    _ACTIVE_HEAD.update(proc=proc, folder=folder, nodes=spec.nodes)
    result: dict[str, Any] = {"role": "head", "node": node, "address": address, "gcs": gcs, "dashboard": dashboard}
    try:
        proc.wait_started(spec.ready_timeout_s)
        t["head_started"] = time.time()
        if not spec.early_join:
            folder.write_head(head_info)
        nodes = _wait_for_cluster(spec, proc, folder, node, address, gcs)
        t["cluster_ready"] = time.time()
        addr_to_node = _addr_to_node(folder, spec.nodes, node, address)
        result["ray_nodes"] = [{**n, "slurm_node": addr_to_node.get(n["address"], "?")} for n in nodes]
        result["gpus"] = sum(n["gpus"] for n in nodes)
        driver = spec.driver_factory(address)

        def watch() -> str | None:
            """Called by the job runner every poll: a reason to stop the job, or None."""
            _check_worker_failures(folder, spec.nodes)
            try:
                cur = gcs_nodes(gcs)
            except Exception:  # noqa: BLE001 - the GCS may be briefly busy
                return None
            for n in cur:
                if not n["alive"]:
                    where = addr_to_node.get(n["address"], "?")
                    raise RayNodeLost(
                        f"Ray node on Slurm node {where} ({n['address']}, node id {n['node_id'][:12]}) died during the job"
                    )
            return None

        jr = jobs.submit_and_wait(dashboard, driver, spec.log_path, env=auth, watch=watch,
                                  name=f"{spec.job_name}-{job_id}")
        t["driver_done"] = time.time()
        result.update(exit_code=jr.exit_code, ray_job_id=jr.job_id, status=jr.status, message=jr.message)
        return result
    finally:
        with signals.shielded():  # e.g. a worker's failure started it, and Slurm's SIGTERM follows
            ok = result.get("exit_code") == 0  # also False when this raised: the workers keep their logs too
            folder.write_done(ok=ok)
            t["teardown_start"] = time.time()
            result["cpu"] = proc.cpu_seconds()
            proc.stop()
            proc.remove_temp(None if ok else folder.ray_logs(node))
            t["teardown_end"] = time.time()
            result["timings"] = t
            folder.write_head_timings(t)


def _wait_for_cluster(
    spec: RaySpec, proc: RayProcess, folder: JobFolder, node: str, address: str, gcs: str
) -> list[dict[str, Any]]:
    """Until every node and GPU has registered with the GCS (the live nodes), within spec.ready_timeout_s."""
    want_gpus = spec.nodes * spec.gpus_per_node
    deadline = time.time() + spec.ready_timeout_s
    nodes: list[dict[str, Any]] = []
    last_error = ""
    while True:
        _check_worker_failures(folder, spec.nodes)
        if not proc.alive():
            raise RayStartFailed(f"the Ray head on {node} ({address}) exited:\n"
                                 + tail(proc.log.read_text(errors='replace'), 25))
        try:
            nodes = [n for n in gcs_nodes(gcs) if n["alive"]]
            last_error = ""
        except Exception as e:  # noqa: BLE001 - the GCS may be busy while nodes join: retried
            last_error = f"{type(e).__name__}: {e}"
        gpus = sum(n["gpus"] for n in nodes)
        if len(nodes) >= spec.nodes and gpus >= want_gpus:
            return nodes
        if time.time() > deadline:
            raise RayStartFailed(
                f"Ray cluster not ready after {spec.ready_timeout_s:.0f} s: {len(nodes)}/{spec.nodes} nodes, "
                f"{gpus:.0f}/{want_gpus} GPUs registered"
                + (f" (asking the GCS at {gcs} failed: {last_error})" if last_error else "")
                + f"; worker logs: {folder.path}/ray-*.log"
            )
        time.sleep(0.2)


def _addr_to_node(folder: JobFolder, n: int, head_node: str, head_addr: str) -> dict[str, str]:
    """Ray node address -> Slurm node name, from what each worker wrote before joining."""
    m = {head_addr: head_node}
    for r in range(1, n):
        info = folder.read(folder.worker(r))
        if info:
            m[info["address"]] = info["node"]
    return m


def _check_worker_failures(folder: JobFolder, n: int) -> None:
    for r in range(1, n):
        f = folder.read(folder.worker_failed(r))
        if f:
            raise RayNodeLost(f"Ray worker on Slurm node {f['node']} ({f['address']}) failed: {f['error']}")


def stop_for_requeue(wait_s: float = 15.0) -> None:
    """Rank 0, before submitit requeues the job: end the driver and Ray on every node now.

    Tells the workers the head is done (they stop their raylets and exit), stops the head's
    Ray session and waits a little for the workers, so that nothing of this attempt is left
    when Slurm restarts the job. The driver resumes from its last checkpoint next time.
    """
    proc, folder, n = _ACTIVE_HEAD.get("proc"), _ACTIVE_HEAD.get("folder"), _ACTIVE_HEAD.get("nodes", 1)
    if folder is not None:
        folder.write_done(why="requeue")
    if proc is not None:
        proc.stop()
        proc.remove_temp()
    if folder is not None:
        deadline = time.time() + wait_s
        while time.time() < deadline and not folder.workers_stopped(n):
            time.sleep(0.2)


__all__ = ["run_head", "stop_for_requeue"]
