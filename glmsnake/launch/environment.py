"""The environment of the Ray processes we start, and of our own clients of them.

Everything talks to cluster addresses, so nothing goes through a proxy (a proxy set in the
submitting shell would reach the driver otherwise). Ray's Python servers get `_ray_site` on
their PYTHONPATH (binds to the wildcard address go to the node's address instead), token auth,
and the node's mark (`knobs.RAY_JOB`) by which teardown finds every one of them.
"""

from __future__ import annotations

import os
from pathlib import Path

from glmsnake import knobs

PROXY_VARS = ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY")
SITE_DIR = Path(__file__).resolve().parent / "_ray_site"


def no_proxy_for(address: str, env: dict[str, str]) -> str:
    """`no_proxy` with loopback and `address` first, then what `env` already had."""
    hosts = dict.fromkeys(["localhost", "127.0.0.1", address, *env.get("no_proxy", "").split(",")])
    return ",".join(hosts).strip(",")


def bypass_proxies(address: str) -> None:
    """In this process: our own clients (GCS, Jobs SDK over HTTP) talk to cluster addresses directly."""
    for k in PROXY_VARS:
        os.environ.pop(k, None)
    os.environ["no_proxy"] = os.environ["NO_PROXY"] = no_proxy_for(address, dict(os.environ))


def ray_env(address: str, auth: dict[str, str], extra: dict[str, str]) -> dict[str, str]:
    """The environment of one `ray start` on the node at `address` (its processes inherit it).

    `auth`: RAY_AUTH_MODE/RAY_AUTH_TOKEN where the node's Ray has token auth (ray_version.auth_env).
    """
    env = {k: v for k, v in os.environ.items() if k not in PROXY_VARS and not k.startswith("RAY_AUTH_")}
    no_proxy = no_proxy_for(address, env)
    pp = [str(SITE_DIR)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env.update({
        "no_proxy": no_proxy,
        "NO_PROXY": no_proxy,
        **auth,
        "RAY_USAGE_STATS_ENABLED": "0",
        knobs.BIND_ADDR.name: address,
        # Ray's agents and workers rename themselves with setproctitle, which may overwrite the
        # environment block /proc/<pid>/environ shows, and with it the node's mark: keep it readable.
        "SPT_NOENV": "1",
        # The driver's output (with what actors print) goes to log files: no colour codes.
        "RAY_COLOR_PREFIX": "0",
        "PYTHONPATH": os.pathsep.join(pp),
        **extra,
    })
    # Our own stale settings must not leak into Ray.
    for k in ("RAY_ADDRESS",):
        env.pop(k, None)
    return env


__all__ = ["PROXY_VARS", "SITE_DIR", "bypass_proxies", "no_proxy_for", "ray_env"]
