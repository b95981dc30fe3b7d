"""The test session's own network namespace: loopback only (tests/netns.py, tests/conftest.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import netns
import pytest

TESTS = Path(__file__).resolve().parent
OPTED_OUT = bool(os.environ.get("GLMSNAKE_SLURM_REUSE")) or os.environ.get("GLMSNAKE_TEST_NETNS") == "0"
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="a network namespace needs root")


@needs_root
@pytest.mark.skipif(OPTED_OUT, reason="the session was asked to stay on the host network")
def test_the_session_has_only_loopback():
    """What the tests start (Ray's wildcard listeners included) is reachable on loopback only."""
    assert netns.interfaces() == ["lo"]


@pytest.mark.skipif(netns.host_namespace_fd is None, reason="the session did not leave the host network")
def test_entering_from_the_host_network():
    """From the namespace the session left, a process gets a fresh one with only `lo`, and it works."""
    fd = netns.host_namespace_fd
    child = f"""
import ctypes, json, os, socket, sys
sys.path.insert(0, {str(TESTS)!r})
import netns
assert ctypes.CDLL(None, use_errno=True).setns({fd}, netns.CLONE_NEWNET) == 0, os.strerror(ctypes.get_errno())
before = netns.interfaces()
assert netns.enter_loopback_only() is None
srv = socket.socket(); srv.bind(("0.0.0.0", 0)); srv.listen()  # a wildcard bind, as Ray's C++ servers do
socket.create_connection(("127.0.0.17", srv.getsockname()[1]), timeout=2).close()
print(json.dumps([before, netns.interfaces()]))
"""
    out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=60, check=False,
                         pass_fds=(fd,))
    assert out.returncode == 0, out.stderr
    before, after = json.loads(out.stdout)
    assert len(before) > 1, f"the host namespace should have more than `lo`: {before}"
    assert after == ["lo"]
