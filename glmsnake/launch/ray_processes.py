"""The Ray processes of one node: starting `ray start --block`, finding all of them, stopping them.

Teardown must stop exactly what this node started, nothing else, and all of it: `ray start`
runs in a session of its own, and what Ray moves to other sessions (workers, the driver and
its watchdog) is found by the node's mark (`knobs.RAY_JOB`, see ray_temp.node_mark) in its environment,
which survives Ray renaming its processes. Both are found by scanning /proc.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

from glmsnake import knobs
from glmsnake.errors import GlmsnakeError
from glmsnake.launch import addresses, ray_temp

if TYPE_CHECKING:
    from glmsnake.launch.ray_spec import RaySpec


class RayNodeLost(GlmsnakeError):
    """A Ray node of the allocation died while the job ran."""


class RayStartFailed(GlmsnakeError):
    """`ray start` exited, or did not report the runtime started in time."""


def tail(text: str, n: int) -> str:
    return "\n".join(text.splitlines()[-n:])


# --------------------------------------------------------------------------- /proc scans


def _stat_fields(pid_dir: Path) -> list[str]:
    """/proc/<pid>/stat after the command name: [0] state, [3] session id, [11] utime, [12] stime."""
    return (pid_dir / "stat").read_text().rsplit(")", 1)[1].split()


def session_members(sessions: set[int]) -> list[int]:
    """Live (non-zombie) processes whose session id is one of `sessions`: what we started, nothing else."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = _stat_fields(d)
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[3]) in sessions:  # stat field 6: session id
            out.append(int(d.name))
    return out


def marked_processes(mark: str | None = None) -> list[int]:
    """Live processes whose environment has the node mark `mark` (any glmsnake Ray job if None)."""
    want = f"{knobs.RAY_JOB.name}={mark}".encode() if mark else f"{knobs.RAY_JOB.name}=".encode()
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            env = (d / "environ").read_bytes().split(b"\0")
            zombie = _stat_fields(d)[0] == "Z"
        except OSError:
            continue
        if not zombie and any(e == want if mark else e.startswith(want) for e in env):
            out.append(int(d.name))
    return out


KINDS = (("gcs_server", "gcs_server"), ("raylet", "raylet"), ("dashboard/agent.py", "dashboard_agent"),
         ("runtime_env/agent", "runtime_env_agent"), ("log_monitor", "log_monitor"),
         ("dashboard/dashboard.py", "dashboard"), ("autoscaler/_private/monitor.py", "autoscaler_monitor"),
         ("ray.util.client.server", "client_server"), ("default_worker", "python_worker"),
         ("bin/ray", "ray_start"))


def process_kind(cmd: list[str]) -> str:
    """Which of Ray's processes a command line is (for the CPU report)."""
    line = " ".join(cmd)
    for needle, kind in KINDS:
        if needle in line:
            return kind
    return Path(cmd[0]).name if cmd and cmd[0] else "other"


# --------------------------------------------------------------------------- `ray start`


def reserve_ports(count: int) -> list[int]:
    """`count` consecutive ports, reserved on this host for this process (see addresses.free_port_block)."""
    base = addresses.free_port_block(count)
    return list(range(base, base + count))


def node_args(address: str, ports: list[int], spec: RaySpec) -> list[str]:
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


def _ignore_usr2() -> None:
    """In the forked child before exec: Ray's processes (and the driver) ignore SIGUSR2.

    Slurm sends `--signal=USR2@T` (submitit's warning before the time limit) to every process
    of the job step, and USR2's default action kills; an ignored disposition survives exec.
    Rank 0's submitit handler decides what happens (requeue, or nothing), then stops Ray itself.
    """
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


class RayProcess:
    """One `ray start --block` we started, in its own session; stops exactly what it started
    (that session, and what Ray moved to sessions of its own: they carry the node's mark)."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path, temp: str):
        self.log = log
        self.temp = Path(temp)  # its --temp-dir: ours alone (ray_temp.temp_dir()), removed after it stops
        self.mark = env.get(knobs.RAY_JOB.name)
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
                raise RayStartFailed(f"`ray start` exited with {self.p.returncode}:\n" + tail(text, 25))
            time.sleep(0.1)
        raise RayStartFailed(f"`ray start` did not finish within {timeout:.0f} s:\n" + tail(self.log.read_text(errors='replace'), 25))

    def members(self) -> list[int]:
        return session_members({self.p.pid})

    def ours(self) -> list[int]:
        """The session's processes and whatever else carries this node's mark (driver, watchdogs)."""
        return sorted(set(self.members()) | set(marked_processes(self.mark) if self.mark else ()))

    def cpu_seconds(self) -> dict[str, float]:
        """CPU seconds (user + system) used so far by the live processes of this session, by kind."""
        tck = os.sysconf("SC_CLK_TCK")
        out: dict[str, float] = {}
        for pid in self.members():
            try:
                fields = _stat_fields(Path(f"/proc/{pid}"))
                cmd = Path(f"/proc/{pid}/cmdline").read_text().split("\0")
            except OSError:
                continue
            kind = process_kind(cmd)
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
        ray_temp.remove_temp(self.temp, keep_logs_in)


__all__ = ["KINDS", "RayNodeLost", "RayProcess", "RayStartFailed", "marked_processes", "node_args",
           "process_kind", "reserve_ports", "session_members", "tail"]
