"""A test session in a network namespace of its own, whose only interface is loopback.

Everything the tests start binds to 127.0.0.0/8 by configuration, except Ray 2.60's C++
servers (GCS, raylet, the workers' gRPC servers): they listen on every address of the host
(`*:port`), whatever `--node-ip-address` says, and Ray has no setting for it. In a namespace
that has nothing but `lo`, every address is a loopback address, so those listeners are
reachable from this session's processes only. The namespace ends with its last process.

Needs root (the Slurm test cluster needs it anyway); elsewhere the session stays where it is.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import socket
import struct

CLONE_NEWNET = 0x40000000
SIOCGIFFLAGS, SIOCSIFFLAGS, SIOCSIFADDR, IFF_UP = 0x8913, 0x8914, 0x8916, 0x1
_IFREQ = "16sh22x"  # struct ifreq on Linux: name, then the flags of the union (40 bytes)
_IFREQ_ADDR = "16s16s8x"  # name, then a struct sockaddr_in
host_namespace_fd: int | None = None  # the namespace the session left (tests start processes there)


def interfaces() -> list[str]:
    """The interfaces of this process's network namespace (netlink: not /sys, which shows the mounter's)."""
    return [name for _, name in socket.if_nameindex()]


def _bring_up(name: str = "lo") -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        req = struct.pack(_IFREQ, name.encode(), 0)
        flags = struct.unpack(_IFREQ, fcntl.ioctl(s, SIOCGIFFLAGS, req))[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack(_IFREQ, name.encode(), flags | IFF_UP))


def _add_ipv4(label: str, addr: str) -> None:
    sockaddr = struct.pack("HH4s8x", socket.AF_INET, 0, socket.inet_aton(addr))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        fcntl.ioctl(s, SIOCSIFADDR, struct.pack(_IFREQ_ADDR, label.encode(), sockaddr))


def enter_loopback_only() -> str | None:
    """Move this process (and all it starts from now on) into a new loopback-only namespace.

    Call it before any thread or server starts. Returns None when done (or already in one),
    else why not, for the caller to report.
    """
    if interfaces() == ["lo"]:
        return None
    if os.geteuid() != 0:
        return "not root"
    global host_namespace_fd
    fd = os.open("/proc/self/ns/net", os.O_RDONLY)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET) != 0:
        why = os.strerror(ctypes.get_errno())
        os.close(fd)
        return f"unshare(CLONE_NEWNET): {why}"
    host_namespace_fd = fd
    _bring_up("lo")  # the kernel gives it 127.0.0.1/8 and ::1
    # glibc's getaddrinfo(AF_INET, AI_ADDRCONFIG), which Slurm resolves node addresses with,
    # finds no IPv4 "configured" when 127.0.0.1 is the only address: give lo a second one.
    _add_ipv4("lo:0", "127.0.0.2")
    return None
