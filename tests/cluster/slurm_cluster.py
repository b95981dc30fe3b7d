"""A real Slurm test cluster on loopback: one slurmctld, 8 `slurmd -N nodeK`, 8 fake GPUs each.

    python -m tests.cluster.slurm_cluster up   [--dir DIR] [--nodes 8]   # prints `export SLURM_CONF=...`
    python -m tests.cluster.slurm_cluster status [--dir DIR]
    python -m tests.cluster.slurm_cluster down [--dir DIR]

Debian's slurm-wlm 22.05 and munge (apt-get install slurm-wlm munge). Everything lives
under DIR (default /tmp/glmsnake-slurm): config, state, spool, logs, our own munged socket
and key, and the fake GPU device files (`mknod c 1 3`, i.e. /dev/null). Every daemon binds
to loopback only (`CommunicationParameters=NoInAddrAny`; slurmctld on 127.0.0.1, node K on
127.0.0.1{K}, which Ray keeps as given), and `down` stops only the processes `up` started
(their pids and sessions are recorded in DIR/pids.json). Clients need `SLURM_CONF=DIR/etc/slurm.conf`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from glmsnake.launch.ray_processes import marked_processes, session_members

DEFAULT_DIR = Path(os.environ.get("GLMSNAKE_SLURM_DIR", "/tmp/glmsnake-slurm"))
CTLD_PORT = int(os.environ.get("GLMSNAKE_SLURMCTLD_PORT", "7817"))
SLURMD_PORT0 = int(os.environ.get("GLMSNAKE_SLURMD_PORT0", "7001"))  # node K listens on SLURMD_PORT0 + K - 1
SRUN_PORTS = os.environ.get("GLMSNAKE_SRUN_PORTS", "7100-7999")
GPUS_PER_NODE = 8
CPUS_PER_NODE = 8  # more than the host has (config_overrides): lets two jobs share nodes
MEM_PER_NODE_MB = 16000
PARTITION = "debug"


def node_addr(k: int) -> str:
    return f"127.0.0.{10 + k}"



def first_job_id() -> int:
    """Job ids of each cluster start differ from the last one's (1000 a second), as on a real
    cluster, so nothing named after a job id (Ray's /tmp/rj<job>n<rank>) meets an earlier run's."""
    return 1_000_000 + int(time.time()) % 60_000 * 1000

class Cluster:
    def __init__(self, root: Path = DEFAULT_DIR, nodes: int = 8):
        self.root = Path(root).absolute()
        self.nodes = nodes
        self.etc = self.root / "etc"
        self.conf = self.etc / "slurm.conf"
        self.log = self.root / "log"
        self.pids_file = self.root / "pids.json"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self._procs: dict[str, subprocess.Popen] = {}  # the daemons this object started: waited for in down()

    # ---------------------------------------------------------------- config
    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def node_names(self) -> list[str]:
        return [f"node{k}" for k in range(1, self.nodes + 1)]

    def write_config(self) -> None:
        for d in ("etc", "state", "spool", "log", "run", "munge", "dev"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root / "munge", 0o711)
        for name in self.node_names():
            (self.root / "spool" / name).mkdir(parents=True, exist_ok=True)
        devs = []
        for g in range(GPUS_PER_NODE):
            dev = self.root / "dev" / f"fakegpu{g}"
            if not dev.exists():
                os.mknod(dev, 0o666 | 0o020000, os.makedev(1, 3))  # a character device (like /dev/null)
            devs.append(dev)
        n = self.nodes
        conf = f"""\
# glmsnake loopback test cluster (tests/cluster/slurm_cluster.py); written by `up`
ClusterName=glmsnake
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={CTLD_PORT}
FirstJobId={first_job_id()}
SlurmdPort={SLURMD_PORT0}
SrunPortRange={SRUN_PORTS}
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
SlurmdParameters=config_overrides
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket}
SlurmUser=root
SlurmdUser=root
StateSaveLocation={self.root}/state
SlurmdSpoolDir={self.root}/spool/%n
SlurmctldPidFile={self.root}/run/slurmctld.pid
SlurmdPidFile={self.root}/run/slurmd-%n.pid
SlurmctldLogFile={self.log}/slurmctld.log
SlurmdLogFile={self.log}/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
GresTypes=gpu
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
ReturnToService=2
MinJobAge=600
KillWait=3
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=60
MessageTimeout=20
UnkillableStepTimeout=30
NodeName=node[1-{n}] NodeHostname=node[1-{n}] NodeAddr=127.0.0.[11-{10 + n}] Port=[{SLURMD_PORT0}-{SLURMD_PORT0 + n - 1}] CPUs={CPUS_PER_NODE} RealMemory={MEM_PER_NODE_MB} Gres=gpu:{GPUS_PER_NODE} State=UNKNOWN
PartitionName={PARTITION} Nodes=node[1-{n}] Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
"""
        self.conf.write_text(conf)
        files = f"{self.root}/dev/fakegpu[0-{GPUS_PER_NODE - 1}]"
        (self.etc / "gres.conf").write_text(f"NodeName=node[1-{n}] Name=gpu File={files}\n")
        key = self.root / "munge" / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
            os.chmod(key, 0o400)

    # ---------------------------------------------------------------- processes
    def _pids(self) -> dict[str, int]:
        try:
            return json.loads(self.pids_file.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def _save_pids(self, pids: dict[str, int]) -> None:
        self.pids_file.write_text(json.dumps(pids, indent=1))

    def _spawn(self, name: str, argv: list[str], pids: dict[str, int]) -> None:
        out = open(self.log / f"{name}.out", "ab")
        p = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             env=self.env, start_new_session=True, cwd=self.root)
        out.close()
        pids[name] = p.pid
        self._procs[name] = p
        self._save_pids(pids)

    def running(self) -> bool:
        pids = self._pids()
        return bool(pids) and all(_alive(p) for p in pids.values())

    def up(self, timeout: float = 90.0) -> float:
        """Start munged, slurmctld and the slurmd nodes; wait until every node is idle."""
        t0 = time.time()
        if self.running():
            self.wait_idle(timeout)
            return time.time() - t0
        for tool in ("munged", "slurmctld", "slurmd", "sinfo", "unshare"):
            if not shutil.which(tool):
                raise RuntimeError(f"{tool} not found: apt-get install -y slurm-wlm munge")
        busy = [CTLD_PORT] if _listening("127.0.0.1", CTLD_PORT) else []
        busy += [SLURMD_PORT0 + k - 1 for k in range(1, self.nodes + 1)
                 if _listening("127.0.0.1", SLURMD_PORT0 + k - 1) or _listening(node_addr(k), SLURMD_PORT0 + k - 1)]
        if busy:
            raise RuntimeError(f"ports {busy} are in use: is another test cluster up? Stop it with "
                               f"`python -m tests.cluster.slurm_cluster down --dir DIR`, or reuse it "
                               f"(GLMSNAKE_SLURM_REUSE=DIR), or set GLMSNAKE_SLURMCTLD_PORT/GLMSNAKE_SLURMD_PORT0")
        self.write_config()
        pids: dict[str, int] = {}
        m = self.root / "munge"
        self._spawn("munged", ["munged", "-F", "--force", f"--socket={self.munge_socket}",
                               f"--key-file={m}/munge.key", f"--pid-file={m}/munged.pid",
                               f"--log-file={self.log}/munged.log", f"--seed-file={m}/munged.seed"], pids)
        _wait(lambda: self.munge_socket.exists(), 15, "munged socket")
        self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)], pids)
        _wait(lambda: self._sinfo_ok(), 30, "slurmctld answering")
        for name in self.node_names():
            self._write_hosts(name, bound=False)
            # Like a real node: slurm.conf where Slurm's clients look by default (the
            # executor plugin's job steps run srun with every SLURM_* variable removed).
            inner = (f"mount --bind {self.etc}/hosts-{name} /etc/hosts && mkdir -p /etc/slurm && "
                     f"mount --bind {self.etc} /etc/slurm && hostname {name} && "
                     f"exec slurmd -D -N {name} -f {self.conf}")
            self._spawn(f"slurmd-{name}", ["unshare", "--uts", "--mount", "--", "sh", "-c", inner], pids)
        for k, name in enumerate(self.node_names(), 1):
            _wait(lambda: _listening(node_addr(k), SLURMD_PORT0 + k - 1), 30, f"slurmd {name} listening")
            self._write_hosts(name, bound=True)
        self.wait_idle(timeout - (time.time() - t0))
        return time.time() - t0

    def _write_hosts(self, name: str, bound: bool) -> None:
        """/etc/hosts as node `name` sees it (bind-mounted into its mount namespace only).

        Each slurmd runs in its own UTS + mount namespace with hostname nodeK, and DIR/etc
        bind-mounted on /etc/slurm (so job steps find slurm.conf without SLURM_CONF). With
        CommunicationParameters=NoInAddrAny, slurmd binds to what its hostname resolves to:
        at start that is 127.0.0.1K (its NodeAddr, kept as given by Ray). srun, though, tells
        slurmstepd to call back on the source address of its request (always 127.0.0.1 on
        loopback) while listening on its hostname's address; so once slurmd has bound, the
        node's hostname is re-pointed to 127.0.0.1 for everything started later (job steps).
        The file is rewritten in place: a bind mount follows the inode.
        """
        k = int(name.removeprefix("node"))
        own = "127.0.0.1" if bound else node_addr(k)
        lines = ["127.0.0.1 localhost", f"127.0.0.1 {os.uname().nodename}", f"{own} {name}"]
        lines += [f"{node_addr(j)} node{j}" for j in range(1, self.nodes + 1) if j != k]
        path = self.etc / f"hosts-{name}"
        with open(path, "w") as f:  # same inode
            f.write("\n".join(lines) + "\n")

    def _sinfo_ok(self) -> bool:
        r = subprocess.run(["sinfo", "-h"], env=self.env, capture_output=True, text=True)
        return r.returncode == 0

    def node_states(self) -> dict[str, str]:
        r = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], env=self.env, capture_output=True, text=True)
        states = {}
        for line in r.stdout.splitlines():
            parts = line.split()
            if len(parts) == 2:
                states[parts[0]] = parts[1]
        return states

    def wait_idle(self, timeout: float = 60.0) -> None:
        def ok() -> bool:
            st = self.node_states()
            return len(st) == self.nodes and all(s in ("idle",) for s in st.values())

        try:
            _wait(ok, timeout, "all nodes idle")
        except TimeoutError:
            raise TimeoutError(f"nodes not idle after {timeout:.0f}s: {self.node_states()}; logs in {self.log}")

    def jobs(self) -> list[str]:
        r = subprocess.run(["squeue", "-h", "-o", "%i %T"], env=self.env, capture_output=True, text=True)
        return [ln for ln in r.stdout.splitlines() if ln.strip()]

    def down(self, timeout: float = 20.0) -> None:
        """Cancel every job, then stop exactly the processes `up` started (and their sessions)."""
        pids = self._pids()
        if not pids:
            return
        if pids.get("slurmctld") and _alive(pids["slurmctld"]):
            subprocess.run(["scancel", "--full", "-u", str(os.getuid())], env=self.env, capture_output=True, timeout=30)
        order = [k for k in pids if k.startswith("slurmd-")] + ["slurmctld", "munged"]
        for name in order:
            pid = pids.get(name)
            if pid and _alive(pid):
                _signal(pid, signal.SIGTERM)
                _wait(lambda: not _alive(pid), timeout, f"{name} to stop", raise_=False)
        # Anything still running in the sessions we created (slurmstepd, job tasks).
        sessions = set(pids.values())
        for _ in range(2):
            for pid in session_members(sessions):
                _signal(pid, signal.SIGKILL)
            time.sleep(0.2)
        for pid in pids.values():
            if _alive(pid):
                _signal(pid, signal.SIGKILL)
        # Reap the daemons we are the parent of (else munged/slurmctld stay as zombies).
        for p in self._procs.values():
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)
        self._procs.clear()
        self.pids_file.unlink(missing_ok=True)

    @contextlib.contextmanager
    def masked_on(self, name: str, path: Path, files: dict[str, str] | None = None):
        """`path` hidden on node `name` only (a tmpfs over it, in that slurmd's mount namespace, empty
        or holding `files`: {relative path: text}), as on a node that does not mount the shared
        filesystem, or whose kernel shows something else there."""
        pid = str(self._pids()[f"slurmd-{name}"])
        subprocess.run(["nsenter", "-t", pid, "-m", "mount", "-t", "tmpfs", "-o", "size=1m", "masked", str(path)],
                       check=True)
        for rel, text in (files or {}).items():
            target = Path(path) / rel
            subprocess.run(["nsenter", "-t", pid, "-m", "sh", "-c", 'mkdir -p "$1" && printf %s "$2" > "$3"', "sh",
                            str(target.parent), text, str(target)], check=True)
        try:
            yield
        finally:
            subprocess.run(["nsenter", "-t", pid, "-m", "umount", "-l", str(path)], check=False)

    def leftovers(self) -> list[int]:
        """Processes still alive in the sessions `up` created, other than the daemons themselves
        (and slurmstepd, which outlives a job briefly), and every process of any glmsnake Ray
        cluster (Ray runs them in sessions of their own; they carry the job's mark)."""
        pids = self._pids()
        out = []
        for p in session_members(set(pids.values())):
            if p in pids.values():
                continue
            try:
                if "slurm" in Path(f"/proc/{p}/cmdline").read_text():  # slurmstepd, slurmscriptd
                    continue
            except OSError:
                continue
            out.append(p)
        return sorted(set(out) | set(marked_processes()))


def _listening(addr: str, port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((addr, port)) == 0


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _wait(pred, timeout: float, what: str, raise_: bool = True) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return True
        time.sleep(0.2)
    if raise_:
        raise TimeoutError(f"timed out waiting for {what}")
    return False


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.cluster.slurm_cluster", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=["up", "down", "status"])
    ap.add_argument("--dir", type=Path, default=DEFAULT_DIR)
    ap.add_argument("--nodes", type=int, default=8)
    a = ap.parse_args(argv)
    c = Cluster(a.dir, a.nodes)
    if a.action == "up":
        dt = c.up()
        print(f"# Slurm test cluster up in {dt:.1f}s: {c.nodes} nodes x {GPUS_PER_NODE} fake GPUs, "
              f"partition {PARTITION}; state in {c.root}", file=sys.stderr)
        print(f"export SLURM_CONF={c.conf}")
    elif a.action == "down":
        c.down()
        print(f"# Slurm test cluster in {c.root} stopped", file=sys.stderr)
    else:
        if not c.running():
            print("down")
            return 1
        print(json.dumps({"nodes": c.node_states(), "jobs": c.jobs(), "SLURM_CONF": str(c.conf)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
