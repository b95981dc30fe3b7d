"""A Ray cluster across a Slurm allocation, one task per node (design sections 5 and 6).

`ray_task(spec)` runs in every task of the allocation (via executors.run_job):

- rank 0 starts the head (`ray start --head --block` as a child process, so Slurm's process
  tracking sees every Ray process) with an explicit `--node-ip-address`, ports picked per job
  above Ray's default worker range and below the ephemeral range, its own worker port range,
  a short `--temp-dir`, the dashboard bound to the head's address, and token auth
  (RAY_AUTH_MODE=token; the token lives in the job folder, mode 0600);
- the other ranks join with retries; on one host at most `start_slots` joins run at once
  (concurrent `ray start --address` on one host timed out here, design section 6);
- the head waits, with a deadline, until all nodes and GPUs are registered, then runs the
  driver through the Jobs SDK (glmsnake.launch.jobs), streaming its log into the step log;
- while the driver runs the head watches every node; a lost raylet ends the job with an
  error naming the Slurm node;
- at the end (also on failure or SIGTERM) every rank stops exactly the Ray processes it
  started and deletes its node's Ray temp folder (a failed job's Ray logs are copied to
  `<job folder>/ray-logs/<node>` first); worker ranks exit as soon as the head says it is
  done, or when the head's GCS has been unreachable for a while, so the allocation is
  released at once.

Rendezvous is through small files in the submitit job folder (shared storage).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable

from glmsnake.errors import GlmsnakeError
from glmsnake.launch import addresses, signals
from glmsnake.launch.follow import FileFollower

SITE_DIR = Path(__file__).resolve().parent / "_ray_site"
PROXY_VARS = ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY")
STATE_ALIVE, STATE_DEAD = 0, 1
# In the environment of every Ray process we start (and so of their workers and the driver):
# `<job>n<rank>`, the Slurm job and node rank they belong to. Ray renames its workers' command
# lines and runs the driver and its watchdog in sessions of their own; the environment stays.
JOB_MARK = "GLMSNAKE_RAY_JOB"


class RayNodeLost(GlmsnakeError):
    """A Ray node of the allocation died while the job ran."""


class RayStartFailed(GlmsnakeError):
    pass


@dataclass
class RaySpec:
    """Everything the tasks need; pickled by submitit."""

    nodes: int
    gpus_per_node: int
    driver_factory: Callable[[str], Any]  # head address -> glmsnake.recipe.Driver (argv, cwd, env)
    log_path: str  # the step log: the driver's output goes here
    interface: str | None = None
    cpus_per_node: int | None = None  # None: what Slurm gave the task (SLURM_CPUS_ON_NODE)
    object_store_mb: int | None = None
    # Read when the spec is made (on the submitting host), not when this module is imported.
    worker_ports: int = field(default_factory=lambda: int(os.environ.get("GLMSNAKE_RAY_WORKER_PORTS", "200")))
    # Concurrent `ray start --address` on one host (per-node temp dirs make them safe).
    start_slots: int = field(default_factory=lambda: int(os.environ.get("GLMSNAKE_RAY_START_SLOTS", "8")))
    # Every node runs Ray's log monitor, which forwards what actors print to the driver (slime's
    # training and rollout actors log there). GLMSNAKE_RAY_WORKER_LOG_MONITOR=0 leaves it out on
    # worker nodes (one Python process each; benchmarks/ray_bringup.py compares both).
    worker_log_monitor: bool = field(
        default_factory=lambda: os.environ.get("GLMSNAKE_RAY_WORKER_LOG_MONITOR", "1") != "0")
    join_attempts: int = 3
    early_join: bool = True  # workers get the head's address before the head has started
    ready_timeout_s: float = 300.0
    head_lost_s: float = 15.0  # a worker gives up after the head's GCS is unreachable this long
    job_name: str = "glmsnake"
    extra_env: dict[str, str] = field(default_factory=dict)


# --------------------------------------------------------------------------- processes


def session_members(sessions: set[int]) -> list[int]:
    """Live (non-zombie) processes whose session id is one of `sessions`: what we started, nothing else."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[3]) in sessions:  # stat field 6: session id
            out.append(int(d.name))
    return out


def _session_members(sid: int) -> list[int]:
    return session_members({sid})


def marked_processes(mark: str | None = None) -> list[int]:
    """Live processes whose environment has JOB_MARK=`mark` (any glmsnake Ray job if None)."""
    want = f"{JOB_MARK}={mark}".encode() if mark else f"{JOB_MARK}=".encode()
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            env = (d / "environ").read_bytes().split(b"\0")
            zombie = (d / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
        except OSError:
            continue
        if not zombie and any(e == want if mark else e.startswith(want) for e in env):
            out.append(int(d.name))
    return out


def node_mark(job_id: str, rank: int) -> str:
    """JOB_MARK's value for one node of a job: the same as its temp folder's name."""
    return f"{job_id}n{rank}"


def _ignore_usr2() -> None:
    """In the forked child before exec: Ray's processes (and the driver) ignore SIGUSR2.

    Slurm sends `--signal=USR2@T` (submitit's warning before the time limit) to every process
    of the job step, and USR2's default action kills; an ignored disposition survives exec.
    Rank 0's submitit handler decides what happens (requeue, or nothing), then stops Ray itself.
    """
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


class RayProcess:
    """One `ray start --block` we started, in its own session; stops exactly what it started
    (that session, and what Ray moved to sessions of its own: they carry the node's JOB_MARK)."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path, temp: str):
        self.argv = argv
        self.log = log
        self.temp = Path(temp)  # its --temp-dir: ours alone (temp_dir()), removed after it stops
        self.mark = env.get(JOB_MARK)
        self.out = open(log, "ab", buffering=0)
        self.p = subprocess.Popen(argv, env=env, stdout=self.out, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=_ignore_usr2)

    @property
    def pid(self) -> int:
        return self.p.pid

    def alive(self) -> bool:
        return self.p.poll() is None

    def wait_started(self, timeout: float) -> None:
        """Until `ray start` reports the runtime started (it then blocks)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log.read_text(errors="replace")
            if "Ray runtime started" in text:
                return
            if self.p.poll() is not None:
                raise RayStartFailed(f"`ray start` exited with {self.p.returncode}:\n" + _tail(text, 25))
            time.sleep(0.1)
        raise RayStartFailed(f"`ray start` did not finish within {timeout:.0f} s:\n" + _tail(self.log.read_text(errors='replace'), 25))

    def members(self) -> list[int]:
        return _session_members(self.p.pid)

    def ours(self) -> list[int]:
        """The session's processes and whatever else carries this node's mark (driver, watchdogs)."""
        return sorted(set(self.members()) | set(marked_processes(self.mark) if self.mark else ()))

    def cpu_seconds(self) -> dict[str, float]:
        """CPU seconds (user + system) used so far by the live processes of this session, by kind."""
        tck = os.sysconf("SC_CLK_TCK")
        out: dict[str, float] = {}
        for pid in self.members():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                cmd = Path(f"/proc/{pid}/cmdline").read_text().split("\0")
            except OSError:
                continue
            kind = _process_kind(cmd)
            out[kind] = round(out.get(kind, 0.0) + (int(fields[11]) + int(fields[12])) / tck, 2)
        return out

    def stop(self, grace_s: float = 1.5) -> float:
        """SIGTERM every process of the session, SIGKILL what is left after `grace_s`.

        The cluster is ephemeral, so nothing is drained (`ray start --block` alone would drain
        for 30 s, longer than Slurm's KillWait before it SIGKILLs the task and orphans Ray).
        """
        t0 = time.time()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            pids = self.ours()
            if self.p.poll() is None and self.p.pid not in pids:
                pids.append(self.p.pid)
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, sig)
            deadline = time.time() + (grace_s if sig == signal.SIGTERM else 5.0)
            while time.time() < deadline and self.ours():
                time.sleep(0.1)
        with contextlib.suppress(Exception):
            self.p.wait(timeout=1)
        self.out.close()
        return time.time() - t0

    def remove_temp(self, keep_logs_in: Path | None = None) -> None:
        """After stop(): delete the node's Ray temp folder (sockets, session logs, runtime envs).

        A failed job's Ray logs are evidence: they are copied to `keep_logs_in` (shared job
        folder) first. Nothing is removed while a process of the session is still alive.
        """
        if self.ours():
            return
        if keep_logs_in is not None:
            logs = self.temp / "session_latest" / "logs"
            with contextlib.suppress(OSError, shutil.Error):
                shutil.copytree(logs, keep_logs_in, dirs_exist_ok=True, ignore_dangling_symlinks=True)
        shutil.rmtree(self.temp, ignore_errors=True)


_KINDS = (("gcs_server", "gcs_server"), ("raylet", "raylet"), ("dashboard/agent.py", "dashboard_agent"),
          ("runtime_env/agent", "runtime_env_agent"), ("log_monitor", "log_monitor"),
          ("dashboard/dashboard.py", "dashboard"), ("autoscaler/_private/monitor.py", "autoscaler_monitor"),
          ("ray.util.client.server", "client_server"), ("default_worker", "python_worker"),
          ("bin/ray", "ray_start"))


def _process_kind(cmd: list[str]) -> str:
    line = " ".join(cmd)
    for needle, kind in _KINDS:
        if needle in line:
            return kind
    return Path(cmd[0]).name if cmd and cmd[0] else "other"


def temp_dir(job_id: str, rank: int) -> str:
    """Ray's --temp-dir of one node of a job: short (unix socket paths), and one per node.

    Several raylets of one session on one host (the test cluster) would otherwise pick
    their socket names (`sockets/raylet.N`) in the same folder, which races when they start
    at the same moment ("The current node timed out during startup").
    """
    return f"/tmp/rj{node_mark(job_id, rank)}"


TEMP_DIR_NAME = re.compile(r"rj(\d+)n(\d+)")


def sweep_stale_temp_dirs(root: Path = Path("/tmp")) -> list[str]:
    """Delete Ray temp folders of jobs Slurm no longer runs; returns what was deleted.

    A job killed at its time limit gets KillWait seconds (30 by default) between SIGTERM and
    SIGKILL, which is not always enough to stop Ray and delete the folder; the next Ray job
    on the node deletes it then. Folders of jobs still pending/running, of other users (no
    permission), or when Slurm cannot be asked, are left alone.
    """
    from glmsnake.launch.executors import unfinished_jobs

    found: dict[str, list[Path]] = {}
    for d in root.glob("rj*n*"):
        m = TEMP_DIR_NAME.fullmatch(d.name)
        if m and d.is_dir() and not d.is_symlink():
            found.setdefault(m[1], []).append(d)
    alive = unfinished_jobs(sorted(found)) if found else set()
    if alive is None:
        return []
    removed = []
    for job, dirs in found.items():
        if job in alive:
            continue
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)
            if not d.exists():
                removed.append(str(d))
    return sorted(removed)


def ray_logs_dir(job_dir: Path, node: str) -> Path:
    """Where a failed job keeps a node's Ray logs (its temp folder is removed either way)."""
    return Path(job_dir) / "ray-logs" / node


def _tail(text: str, n: int) -> str:
    return "\n".join(text.splitlines()[-n:])


@contextlib.contextmanager
def _start_slot(slots: int):
    """Host-local semaphore: at most `slots` concurrent `ray start --address` on this host."""
    d = Path("/tmp/glmsnake-ray-start")
    d.mkdir(exist_ok=True)
    with contextlib.suppress(PermissionError):
        d.chmod(0o1777)
    while True:
        for i in range(max(1, slots)):
            f = open(d / f"slot{i}.lock", "a+")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.close()
                continue
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
                f.close()
            return
        time.sleep(0.1)


# --------------------------------------------------------------------------- helpers


def _ray_env(address: str, token: str, extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in PROXY_VARS}
    no_proxy = ",".join(dict.fromkeys(["localhost", "127.0.0.1", address, *env.get("no_proxy", "").split(",")]))
    pp = [str(SITE_DIR)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env.update(
        no_proxy=no_proxy.strip(","),
        NO_PROXY=no_proxy.strip(","),
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=token,
        RAY_USAGE_STATS_ENABLED="0",
        GLMSNAKE_BIND_ADDR=address,
        # Ray's agents and workers rename themselves with setproctitle, which may overwrite the
        # environment block /proc/<pid>/environ shows, and with it JOB_MARK: keep it readable.
        SPT_NOENV="1",
        # The driver's output (with what actors print) goes to log files: no colour codes.
        RAY_COLOR_PREFIX="0",
        PYTHONPATH=os.pathsep.join(pp),
        **extra,
    )
    # Our own stale settings must not leak into Ray.
    for k in ("RAY_ADDRESS",):
        env.pop(k, None)
    return env


def _ports(count: int) -> list[int]:
    base = addresses.free_port_block(count)
    return list(range(base, base + count))


def _node_args(address: str, ports: list[int], spec: RaySpec) -> list[str]:
    """Per-node ports: node manager, object manager, agent ports, metrics, runtime env agent, workers."""
    cpus = spec.cpus_per_node or int(os.environ.get("SLURM_CPUS_ON_NODE", "0") or 0) or os.cpu_count() or 1
    args = [
        f"--node-ip-address={address}",
        f"--num-cpus={cpus}",
        f"--num-gpus={spec.gpus_per_node}",
        f"--node-manager-port={ports[0]}",
        f"--object-manager-port={ports[1]}",
        f"--dashboard-agent-listen-port={ports[2]}",
        f"--dashboard-agent-grpc-port={ports[3]}",
        f"--metrics-export-port={ports[4]}",
        f"--runtime-env-agent-port={ports[5]}",
        f"--min-worker-port={ports[10]}",
        f"--max-worker-port={ports[-1]}",
        "--disable-usage-stats",
        "--block",
    ]
    if spec.object_store_mb:
        args.append(f"--object-store-memory={spec.object_store_mb * 1024 * 1024}")
    return args


_GCS_CLIENTS: dict[str, Any] = {}


def _gcs_nodes(gcs_address: str) -> list[dict[str, Any]]:
    from ray._raylet import GcsClient  # the pinned Ray's GCS client: cheap, no driver

    client = _GCS_CLIENTS.get(gcs_address)
    if client is None:
        client = _GCS_CLIENTS[gcs_address] = GcsClient(address=gcs_address)
    try:
        # Short: a SIGTERM is handled only once this C++ call returns, and Slurm's KillWait (3 s
        # in the tests) must cover the whole teardown; a timed-out poll is simply retried.
        info = client.get_all_node_info(timeout=1)
    except Exception:
        _GCS_CLIENTS.pop(gcs_address, None)
        raise
    out = []
    for node_id, n in info.items():
        out.append({
            "node_id": node_id.hex() if hasattr(node_id, "hex") else str(node_id),
            "address": n.node_manager_address,
            "alive": n.state == STATE_ALIVE,
            "gpus": float(dict(n.resources_total).get("GPU", 0.0)),
        })
    return out


def _reachable(addr: str, port: int, timeout: float = 2.0) -> bool:
    with socket.socket() as s:
        s.settimeout(timeout)
        return s.connect_ex((addr, port)) == 0


def _write_json(path: Path, data: dict[str, Any], mode: int = 0o644) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


# --------------------------------------------------------------------------- the task


def ray_task(spec: RaySpec) -> dict[str, Any]:
    """Run in every task (one per node) of the allocation; rank 0 is the head."""
    rank = int(os.environ["RANK"])
    node = os.environ.get("GLMSNAKE_NODE", socket.gethostname())
    address = os.environ.get("GLMSNAKE_NODE_ADDR") or addresses.this_node_address(spec.interface)
    job_dir = Path(os.environ["GLMSNAKE_JOB_DIR"])
    job_id = os.environ.get("GLMSNAKE_JOB_ID", "0")
    # Our own clients (GCS, Jobs SDK over HTTP) talk to cluster addresses: never via a proxy.
    for k in PROXY_VARS:
        os.environ.pop(k, None)
    os.environ["no_proxy"] = os.environ["NO_PROXY"] = _ray_env(address, "", {})["no_proxy"]
    # Slurm cancels with SIGTERM (submitit would ignore it): it becomes teardown.
    with signals.raise_once():
        with contextlib.suppress(Exception):  # housekeeping: never a reason to fail the job
            sweep_stale_temp_dirs(Path(temp_dir(job_id, rank)).parent)
        if rank == 0:
            return _head(spec, node, address, job_dir, job_id)
        return _worker(spec, rank, node, address, job_dir, job_id)


def _head(spec: RaySpec, node: str, address: str, job_dir: Path, job_id: str) -> dict[str, Any]:
    from glmsnake.launch import jobs

    t: dict[str, float] = {"task_start": time.time()}
    token = secrets.token_hex(24)
    _write_json(job_dir / "ray.token.json", {"token": token}, mode=0o600)
    ports = _ports(16 + spec.worker_ports)
    gcs_port, dash_port, client_port, dash_metric, as_metric = ports[6], ports[7], ports[8], ports[9], ports[11]
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)  # for our own GCS/Jobs clients
    env = _ray_env(address, token, {**spec.extra_env, JOB_MARK: node_mark(job_id, 0),
                                     "DASHBOARD_METRIC_PORT": str(dash_metric),
                                     "AUTOSCALER_METRIC_PORT": str(as_metric)})
    ports = ports[:10] + ports[16:]  # keep 10.. as the worker range
    # No autoscaler monitor (a fixed allocation): one Python process less. (The Ray client
    # server cannot be left out: `ray start` insists on a port for it when it is installed.)
    argv = ["ray", "start", "--head", f"--port={gcs_port}", f"--dashboard-host={address}",
            f"--dashboard-port={dash_port}", "--include-dashboard=true", f"--ray-client-server-port={client_port}",
            "--no-monitor", f"--temp-dir={temp_dir(job_id, 0)}", *_node_args(address, ports, spec)]
    gcs = f"{address}:{gcs_port}"
    dashboard = f"http://{address}:{dash_port}"
    log = job_dir / f"ray-{node}.log"
    head_info = {"gcs": gcs, "dashboard": dashboard, "node": node, "address": address}
    if spec.early_join:
        # Workers start their `ray start --address` while the head comes up (it retries the
        # GCS), so the head's start and the joins overlap instead of adding up.
        _write_json(job_dir / "ray.head.json", head_info)
    proc = RayProcess(argv, env, log, temp_dir(job_id, 0))
    _ACTIVE_HEAD.update(proc=proc, job_dir=job_dir, nodes=spec.nodes)
    result: dict[str, Any] = {"role": "head", "node": node, "address": address, "gcs": gcs, "dashboard": dashboard}
    try:
        proc.wait_started(spec.ready_timeout_s)
        t["head_started"] = time.time()
        if not spec.early_join:
            _write_json(job_dir / "ray.head.json", head_info)
        # Wait for every node and GPU.
        want_gpus = spec.nodes * spec.gpus_per_node
        deadline = time.time() + spec.ready_timeout_s
        nodes: list[dict[str, Any]] = []
        while True:
            _check_worker_failures(job_dir, spec.nodes)
            if not proc.alive():
                raise RayStartFailed(f"the Ray head on {node} ({address}) exited:\n" + _tail(log.read_text(errors='replace'), 25))
            with contextlib.suppress(Exception):
                nodes = [n for n in _gcs_nodes(gcs) if n["alive"]]
            gpus = sum(n["gpus"] for n in nodes)
            if len(nodes) >= spec.nodes and gpus >= want_gpus:
                break
            if time.time() > deadline:
                raise RayStartFailed(
                    f"Ray cluster not ready after {spec.ready_timeout_s:.0f} s: {len(nodes)}/{spec.nodes} nodes, "
                    f"{gpus:.0f}/{want_gpus} GPUs registered; worker logs: {job_dir}/ray-*.log"
                )
            time.sleep(0.2)
        t["cluster_ready"] = time.time()
        addr_to_node = _addr_to_node(job_dir, spec.nodes, node, address)
        result["ray_nodes"] = [{**n, "slurm_node": addr_to_node.get(n["address"], "?")} for n in nodes]
        result["gpus"] = sum(n["gpus"] for n in nodes)
        driver = spec.driver_factory(address)

        def watch() -> str | None:
            """Called by the job runner every poll: a reason to stop the job, or None."""
            _check_worker_failures(job_dir, spec.nodes)
            try:
                cur = _gcs_nodes(gcs)
            except Exception:  # noqa: BLE001 - the GCS may be briefly busy
                return None
            for n in cur:
                if not n["alive"]:
                    where = addr_to_node.get(n["address"], "?")
                    raise RayNodeLost(
                        f"Ray node on Slurm node {where} ({n['address']}, node id {n['node_id'][:12]}) died during the job"
                    )
            return None

        jr = jobs.submit_and_wait(dashboard, driver, spec.log_path, env={"RAY_AUTH_TOKEN": token}, watch=watch,
                                  name=f"{spec.job_name}-{job_id}")
        t["driver_done"] = time.time()
        result.update(exit_code=jr.exit_code, ray_job_id=jr.job_id, status=jr.status, message=jr.message)
        return result
    finally:
        with signals.shielded():  # e.g. a worker's failure started it, and Slurm's SIGTERM follows
            ok = result.get("exit_code") == 0  # also False when this raised: the workers keep their logs too
            _write_json(job_dir / "ray.done.json", {"at": time.time(), "ok": ok})
            t["teardown_start"] = time.time()
            result["cpu"] = proc.cpu_seconds()
            proc.stop()
            proc.remove_temp(None if ok else ray_logs_dir(job_dir, node))
            t["teardown_end"] = time.time()
            result["timings"] = t
            _write_json(job_dir / "ray.head.timings.json", t)


def _addr_to_node(job_dir: Path, n: int, head_node: str, head_addr: str) -> dict[str, str]:
    m = {head_addr: head_node}
    for r in range(1, n):
        info = _read_json(job_dir / f"ray.worker{r}.json")
        if info:
            m[info["address"]] = info["node"]
    return m


def _check_worker_failures(job_dir: Path, n: int) -> None:
    for r in range(1, n):
        f = _read_json(job_dir / f"ray.worker{r}.failed.json")
        if f:
            raise RayNodeLost(f"Ray worker on Slurm node {f['node']} ({f['address']}) failed: {f['error']}")


def _worker(spec: RaySpec, rank: int, node: str, address: str, job_dir: Path, job_id: str) -> dict[str, Any]:
    t: dict[str, float] = {"task_start": time.time()}
    cpu: dict[str, float] = {}
    done_file = job_dir / "ray.done.json"
    head = None
    failed = False
    while head is None:
        head = _read_json(job_dir / "ray.head.json")
        if _read_json(done_file):
            return {"role": "worker", "node": node, "address": address, "joined": False, "timings": t}
        if head is None:
            time.sleep(0.1)
    token = json.loads((job_dir / "ray.token.json").read_text())["token"]
    t["head_seen"] = time.time()
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    env = _ray_env(address, token, {**spec.extra_env, JOB_MARK: node_mark(job_id, rank)})
    log = job_dir / f"ray-{node}.log"
    proc: RayProcess | None = None
    gcs_host, gcs_port = head["gcs"].rsplit(":", 1)
    # Before joining: the head maps Ray node addresses to Slurm node names with this.
    _write_json(job_dir / f"ray.worker{rank}.json", {"node": node, "address": address, "pid": None})
    try:
        last_err = ""
        for attempt in range(1, spec.join_attempts + 1):
            with _start_slot(spec.start_slots):
                t.setdefault("slot_acquired", time.time())
                ports = _ports(10 + spec.worker_ports)
                argv = ["ray", "start", f"--address={head['gcs']}", f"--temp-dir={temp_dir(job_id, rank)}",
                        *_node_args(address, ports, spec)]
                if not spec.worker_log_monitor:
                    argv.insert(-1, "--include-log-monitor=false")
                proc = RayProcess(argv, env, log, temp_dir(job_id, rank))
                try:
                    proc.wait_started(120)
                    break
                except RayStartFailed as e:
                    last_err = str(e)
                    print(f"[glmsnake] {node}: Ray join attempt {attempt} failed, retrying: {_tail(last_err, 1)}",
                          file=sys.stderr, flush=True)
                    proc.stop()
                    # Its Ray logs tell why (the job may still succeed: they are kept apart from ray-logs/).
                    proc.remove_temp(job_dir / "ray-join-failures" / f"{node}.attempt{attempt}")
                    proc = None
            time.sleep(1.0 * attempt)
        if proc is None:
            raise RayStartFailed(f"could not join the Ray head at {head['gcs']} after {spec.join_attempts} attempts: {last_err}")
        t["joined"] = time.time()
        _write_json(job_dir / f"ray.worker{rank}.json", {"node": node, "address": address, "pid": proc.pid})
        unreachable_since: float | None = None
        while not done_file.exists():
            if not proc.alive():
                raise RayNodeLost(f"the Ray processes on {node} ({address}) exited:\n"
                                  + _tail(log.read_text(errors="replace"), 15))
            if _reachable(gcs_host, int(gcs_port)):
                unreachable_since = None
            elif unreachable_since is None:
                unreachable_since = time.time()
            elif time.time() - unreachable_since > spec.head_lost_s:
                raise RayNodeLost(f"the Ray head at {head['gcs']} has been unreachable for {spec.head_lost_s:.0f} s")
            time.sleep(0.5)
        t["head_done_seen"] = time.time()
        return {"role": "worker", "node": node, "address": address, "joined": True, "timings": t, "cpu": cpu}
    except BaseException as e:
        failed = True
        if not done_file.exists():
            _write_json(job_dir / f"ray.worker{rank}.failed.json",
                        {"node": node, "address": address, "error": f"{type(e).__name__}: {str(e)[:2000]}"})
        raise
    finally:
        with signals.shielded():
            if proc is not None:
                cpu.update(proc.cpu_seconds())
                proc.stop()
                keep = failed or (_read_json(done_file) or {}).get("ok") is False
                proc.remove_temp(ray_logs_dir(job_dir, node) if keep else None)
            t["stopped"] = time.time()
            with contextlib.suppress(OSError):
                _write_json(job_dir / f"ray.worker{rank}.stopped.json", {"at": t["stopped"]})


# --------------------------------------------------------------------------- entry point


@dataclass
class JobResult:
    """What the train step records in its sentinel."""

    exit_code: int
    job_id: str  # Ray's submission id
    slurm_job_id: str
    nodes: list[str]
    gpus: float
    timings: dict[str, float]
    status: str = ""
    message: str = ""
    ray_nodes: list[dict[str, Any]] = field(default_factory=list)
    cpu: dict[str, dict[str, float]] = field(default_factory=dict)  # Slurm node -> CPU s by Ray process kind
    attempts: int = 1  # 1 + how often Slurm requeued the job (it resumed each time)


def run_ray_job(
    wf: Any,
    allocation: Any,
    driver_factory: Callable[[str], Any],
    name: str,
    log_dir: Path,
    log_path: Path | None = None,
    *,
    object_store_mb: int | None = None,
    cpus_per_node: int | None = None,
    ready_timeout_s: float = 300.0,
    max_requeues: int = 0,
    echo_to: BinaryIO | None = None,
) -> JobResult:
    """Allocate, start Ray on every node, run the driver, tear down; the driver's exit code comes back.

    `driver_factory(head_address)` returns an object with argv, cwd and env (glmsnake.recipe.Driver),
    e.g. `functools.partial(glmsnake.recipe.driver, wf, run_name, interface=...)`. It must be picklable.
    The driver's output is appended to `log_path` by the head; `echo_to` (the step's stdout, i.e.
    the rule's log) also gets it while the job runs.
    """
    from glmsnake.launch import executors

    log_dir = Path(log_dir).absolute()
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = Path(log_path).absolute() if log_path else log_dir / f"{name}.driver.log"
    spec = RaySpec(
        nodes=allocation.nodes,
        gpus_per_node=allocation.gpus_per_node,
        driver_factory=driver_factory,
        log_path=str(log_path),
        interface=wf.user.slurm.network_interface,
        cpus_per_node=cpus_per_node,
        object_store_mb=object_store_mb,
        ready_timeout_s=ready_timeout_s,
        job_name=name,
    )
    if wf.user.launcher != "slurm":
        raise GlmsnakeError(
            f"{name}: a Ray cluster across an allocation needs launcher=slurm (got {wf.user.launcher!r})",
            "run with `--profile profiles/slurm`, or use the local trainer backend on one machine",
        )
    t_submit = time.time()
    with FileFollower(log_path, echo_to) if echo_to is not None else contextlib.nullcontext():
        rec = executors.run_job(wf, allocation, 1, _RayTaskFn(spec), name, log_dir, max_requeues=max_requeues)
    released = executors.wait_released(rec.job_id)
    t_end = time.time()
    head = rec.results[0]
    ht = head["timings"]
    timings = {
        "submit_to_running_s": rec.timings.get("running", t_submit) - t_submit,
        "head_start_s": ht.get("head_started", 0) - ht["task_start"],
        "cluster_ready_s": ht.get("cluster_ready", 0) - ht["task_start"],
        "submit_to_cluster_ready_s": ht.get("cluster_ready", 0) - t_submit,
        # From Slurm starting the job (squeue saw it RUNNING, polled every 0.2 s) to ready.
        "running_to_cluster_ready_s": ht.get("cluster_ready", 0) - rec.timings.get("running", t_submit),
        "driver_s": ht.get("driver_done", 0) - ht.get("cluster_ready", 0),
        "head_teardown_s": ht["teardown_end"] - ht["teardown_start"],
        "driver_exit_to_released_s": (t_end - ht["driver_done"]) if "driver_done" in ht else float("nan"),
        "wait_released_s": released,
        "total_s": t_end - t_submit,
    }
    joins = [r["timings"].get("joined", 0) - ht["task_start"] for r in rec.results[1:] if r.get("joined")]
    if joins:
        timings["last_worker_joined_s"] = max(joins)
    return JobResult(
        exit_code=int(head.get("exit_code", 1) if head.get("exit_code") is not None else 1),
        job_id=str(head.get("ray_job_id", "")),
        slurm_job_id=rec.job_id,
        nodes=rec.nodes,
        gpus=float(head.get("gpus", 0)),
        timings=timings,
        status=str(head.get("status", "")),
        message=str(head.get("message", "")),
        ray_nodes=head.get("ray_nodes", []),
        cpu={r.get("node", f"rank{i}"): r.get("cpu", {}) for i, r in enumerate(rec.results)},
        attempts=rec.attempts,
    )


# The head of the Ray cluster this task runs (rank 0 only): what on_checkpoint stops.
_ACTIVE_HEAD: dict[str, Any] = {}


def stop_for_requeue(wait_s: float = 15.0) -> None:
    """Rank 0, before submitit requeues the job: end the driver and Ray on every node now.

    Tells the workers the head is done (they stop their raylets and exit), stops the head's
    Ray session and waits a little for the workers, so that nothing of this attempt is left
    when Slurm restarts the job. The driver resumes from its last checkpoint next time.
    """
    proc, job_dir, n = _ACTIVE_HEAD.get("proc"), _ACTIVE_HEAD.get("job_dir"), _ACTIVE_HEAD.get("nodes", 1)
    if job_dir is not None:
        _write_json(Path(job_dir) / "ray.done.json", {"at": time.time(), "why": "requeue"})
    if proc is not None:
        proc.stop()
        proc.remove_temp()
    if job_dir is not None:
        deadline = time.time() + wait_s
        while time.time() < deadline and not all(
            (Path(job_dir) / f"ray.worker{r}.stopped.json").exists() for r in range(1, n)
        ):
            time.sleep(0.2)


class _RayTaskFn:
    """Picklable zero-argument callable for executors.run_job."""

    def __init__(self, spec: RaySpec):
        self.spec = spec

    def __call__(self) -> dict[str, Any]:
        return ray_task(self.spec)

    def on_checkpoint(self) -> None:
        """Called by executors' checkpointable task on rank 0 before a requeue."""
        stop_for_requeue()


__all__ = ["JobResult", "RayNodeLost", "RaySpec", "RayStartFailed", "ray_task", "run_ray_job", "stop_for_requeue",
           "sweep_stale_temp_dirs", "temp_dir"]
