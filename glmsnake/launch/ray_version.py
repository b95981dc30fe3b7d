"""The Ray a task finds (the container image's, not ours): what the launcher can rely on.

slime's CUDA images install an unpinned `ray[default]`, so the version is whatever was newest
when the image was built (its ROCm images pin 2.47.1). The launcher (its `ray start` flags, the
GCS client, the Jobs SDK calls) is tested with our pinned Ray and with OLDEST, in an emulated
image that has it. Token authentication of the job's Ray cluster (RAY_AUTH_MODE=token) exists
from Ray 2.52 on, and older Rays ignore those variables without a word. So: a Ray older than
OLDEST is refused by name; OLDEST to 2.51 runs without token authentication, and says so.
"""

from __future__ import annotations

import importlib.metadata
import re
import sys

from glmsnake import knobs
from glmsnake.errors import GlmsnakeError

OLDEST = "2.47.1"  # the oldest Ray the launcher is tested with (.ci/setup fetches it for the tests)
TOKEN_AUTH = "2.52.0"


def parse(version: str) -> tuple[int, ...]:
    """'2.52.0rc1' -> (2, 52, 0): the leading number of each of the first three parts."""
    out = []
    for part in version.split(".")[:3]:
        m = re.match(r"\d+", part)
        out.append(int(m.group()) if m else 0)
    return tuple(out + [0] * (3 - len(out)))


def _image() -> str:
    return knobs.CONTAINER_IMAGE.raw() or f"this node's Python ({sys.executable})"


def token_auth_available(version: str | None = None) -> bool:
    """Whether this Ray authenticates its clients by token; refuses a Ray older than OLDEST."""
    if version is None:
        version = installed()
    v = parse(version)
    if v < parse(OLDEST):
        raise GlmsnakeError(
            f"{_image()} has Ray {version}; glmsnake's launcher needs Ray {OLDEST} or newer",
            "use an image with a newer Ray (slime's current images have 2.56 or newer)",
        )
    return v >= parse(TOKEN_AUTH)


def auth_env(token: str, version: str | None = None) -> dict[str, str]:
    """RAY_AUTH_MODE/RAY_AUTH_TOKEN where this Ray has token auth; {} (and one line saying so) otherwise."""
    if token_auth_available(version):
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    print(f"[glmsnake] {_image()} has Ray {version or installed()}, which has no token authentication "
          f"(Ray {TOKEN_AUTH} and newer): this job's Ray cluster accepts any client "
          "that reaches its ports", file=sys.stderr, flush=True)
    return {}


def installed() -> str:
    """The installed Ray's version, from its package metadata: importing Ray here would fix its auth
    settings (read at import) before the caller has set RAY_AUTH_MODE/RAY_AUTH_TOKEN."""
    try:
        return importlib.metadata.version("ray")
    except importlib.metadata.PackageNotFoundError:
        raise GlmsnakeError(f"{_image()} has no ray", "use an image with Ray (slime's own images have it)") from None


__all__ = ["OLDEST", "TOKEN_AUTH", "auth_env", "installed", "parse", "token_auth_available"]
