"""Node addresses and per-job ports for multi-node steps.

A node's address comes from a configured network interface (`slurm.network_interface`,
e.g. ib0) or else from Slurm's own record of the node (`scontrol show node` NodeAddr),
never from 127.0.0.1 or the hostname alone: Ray maps 127.0.0.1 to the machine's interface
address, and the loopback test cluster gives each node its own 127.0.0.1x address.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import os
import random
import socket
import struct
import subprocess
from pathlib import Path

from glmsnake import knobs
from glmsnake.errors import GlmsnakeError
from glmsnake.launch import slurm

# Ports we pick live above Ray's default worker port range (10002-19999) and below the
# kernel's ephemeral range (usually 32768-60999), so they cannot clash with either.
PORT_LOW = 20000


def ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def interface_address(interface: str) -> str:
    """IPv4 address of a network interface (SIOCGIFADDR), e.g. ib0 -> 10.1.2.3."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", interface[:15].encode()))  # SIOCGIFADDR
    except OSError as e:
        raise GlmsnakeError(
            f"network interface {interface!r} has no IPv4 address on {socket.gethostname()} ({e})",
            "set `slurm.network_interface` to an interface every node has (see `ip -4 addr`), or null",
        ) from None
    finally:
        s.close()
    return socket.inet_ntoa(packed[20:24])


SYS_NET = Path("/sys/class/net")
LINK_DOWN = {"down", "lowerlayerdown", "notpresent", "dormant"}  # operstate values where nothing gets through


def interface_problem(interface: str, sys_net: Path = SYS_NET) -> str | None:
    """What is wrong with a network interface on this node, read from the kernel's list (sysfs):
    missing (naming what the node has), or its link down. An address alone does not tell: an
    InfiniBand port whose link went down keeps its address, and NCCL and Ray then hang on it."""
    host = socket.gethostname()
    device = interface.split(":", 1)[0]  # an alias (eth0:1) lives on its device's link
    try:
        if not (sys_net / device).exists():
            have = sorted(p.name for p in sys_net.iterdir()) if sys_net.is_dir() else []
            return f"no network interface {interface!r} on {host} (it has: {', '.join(have) or 'none'})"
        state = (sys_net / device / "operstate").read_text().strip()
    except OSError:  # no sysfs to ask (a restricted container): the address check alone decides
        return None
    if state in LINK_DOWN:
        return f"network interface {interface!r} on {host} is {state} (its link carries nothing)"
    return None


def job_node_addresses() -> dict[str, str]:
    """{node: NodeAddr} of the job's nodes, as the batch script asked Slurm ({} outside such a job)."""
    return dict(kv.split("=", 1) for kv in knobs.NODE_ADDRS.raw().split(",") if "=" in kv)


def slurm_node_address(node: str) -> str:
    """The address Slurm records for a node (NodeAddr), resolved to an IP.

    The batch script asks Slurm once for every node of the job (`GLMSNAKE_NODE_ADDRS`, see
    executors.NODE_ADDRS_SETUP): a task in a container has no scontrol, and 64 tasks asking
    slurmctld at once is load it does not need. Outside a job, Slurm is asked.
    """
    known = job_node_addresses()
    if node in known:
        return _as_ip(known[node])
    try:
        fields = slurm.node_record(node)
    except (subprocess.SubprocessError, OSError) as e:
        raise GlmsnakeError(f"cannot ask Slurm for node {node!r}'s address: {e}") from None
    return _as_ip(fields.get("NodeAddr") or fields.get("NodeHostName") or node)


def _as_ip(addr: str) -> str:
    try:
        ipaddress.ip_address(addr)
        return addr
    except ValueError:
        return socket.gethostbyname(addr)


def this_node_address(interface: str | None) -> str:
    """Address of the node this task runs on (inside a Slurm job)."""
    if interface:
        return interface_address(interface)
    node = os.environ.get("SLURMD_NODENAME")
    if node:
        return slurm_node_address(node)
    return socket.gethostbyname(socket.gethostname())


def free_port(address: str, rng: random.Random | None = None, avoid: set[int] | None = None) -> int:
    """A port that is free on `address` now, in [PORT_LOW, ephemeral range)."""
    rng = rng or random.Random()
    high = ephemeral_low() - 1
    for _ in range(200):
        port = rng.randrange(PORT_LOW, high)
        if avoid and port in avoid:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((address, port))
            except OSError:
                continue
        return port
    raise GlmsnakeError(f"no free port in {PORT_LOW}-{high} on {address}")


# Ray's C++ servers (GCS, raylet, workers' gRPC) listen on every address of the host whatever
# --node-ip-address says, so a port is one host-wide resource: two Ray nodes on one host (two
# jobs sharing a node, or the loopback test cluster) must never pick overlapping blocks. Blocks
# are reserved here under a lock, one per process, and count while that process lives.
PORT_RESERVATIONS = "/tmp/glmsnake-ports"


def _process_start(pid: int) -> str | None:
    """The kernel's start time of `pid` (with the pid, a process identity that survives pid reuse)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _live_reservations(folder: str) -> list[tuple[int, int]]:
    """(first port, count) of the blocks reserved by processes that still run; the lock is held,
    so those of ended processes are deleted."""
    out = []
    for name in os.listdir(folder):
        if not name.isdigit():
            continue
        try:
            with open(os.path.join(folder, name)) as f:
                base, count, started = f.read().split()
        except (OSError, ValueError):
            continue
        if _process_start(int(name)) == started:
            out.append((int(base), int(count)))
        else:
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(folder, name))
    return out


def free_port_block(count: int, rng: random.Random | None = None, folder: str = PORT_RESERVATIONS) -> int:
    """First port of `count` consecutive ports, free on every address of this host and reserved
    for this process (replacing its earlier reservation) until it exits; below the ephemeral range."""
    rng = rng or random.Random()
    high = ephemeral_low() - count - 1
    os.makedirs(folder, exist_ok=True)
    with contextlib.suppress(PermissionError):
        os.chmod(folder, 0o1777)
    with open(os.path.join(folder, "lock"), "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        me = os.path.join(folder, str(os.getpid()))
        with contextlib.suppress(FileNotFoundError):
            os.remove(me)  # this process's earlier block (a retried join) is given up
        taken = _live_reservations(folder)
        for _ in range(200):
            base = rng.randrange(PORT_LOW, high)
            if any(base < b + n and b < base + count for b, n in taken):
                continue
            if all(_bindable_everywhere(p) for p in range(base, base + count)):
                tmp = f"{me}.tmp"
                with open(tmp, "w") as f:
                    f.write(f"{base} {count} {_process_start(os.getpid())}\n")
                os.replace(tmp, me)
                return base
    raise GlmsnakeError(f"no block of {count} free ports in {PORT_LOW}-{high} on this host")


def _bindable_everywhere(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("", port))  # fails if any address of the host has the port bound
        except OSError:
            return False
    return True
