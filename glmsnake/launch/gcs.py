"""Asking the Ray head's GCS which nodes it has, and whether it can be reached at all.

The head polls the GCS until every node and GPU has registered, then while the driver runs
(a dead node ends the job); workers only check that the GCS port still answers, so they stop
soon after the head is gone. Each poll is short: a SIGTERM is handled only between polls.
"""

from __future__ import annotations

import socket
from typing import Any

STATE_ALIVE = 0  # Ray's GcsNodeInfo.state of a live node

_GCS_CLIENTS: dict[str, Any] = {}


def gcs_nodes(gcs_address: str) -> list[dict[str, Any]]:
    """Every node the GCS knows: node_id, address, alive, gpus. Raises if the GCS does not answer."""
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


def reachable(addr: str, port: int, timeout: float = 2.0) -> bool:
    """Whether a TCP connection to addr:port succeeds within `timeout`."""
    with socket.socket() as s:
        s.settimeout(timeout)
        return s.connect_ex((addr, port)) == 0


__all__ = ["STATE_ALIVE", "gcs_nodes", "reachable"]
