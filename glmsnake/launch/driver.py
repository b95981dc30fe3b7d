"""What `ray job submit` runs on the head node, as plain data that crosses into the container.

The command is rendered where the configuration lives (the submitting side); only the head's
address is unknown until the head runs, so a template holds `HEAD_ADDRESS` in its place.
"""

from __future__ import annotations

from dataclasses import dataclass

HEAD_ADDRESS = "{glmsnake-head-address}"


@dataclass(frozen=True)
class Driver:
    """The driver's command line, working folder and environment."""

    argv: list[str]
    cwd: str
    env: dict[str, str]


def at_head(template: Driver, head_address: str) -> Driver:
    """`template` with the head's address filled in (a `driver_factory` for run_ray_job)."""
    fill = lambda s: s.replace(HEAD_ADDRESS, head_address)  # noqa: E731
    return Driver(argv=[fill(a) for a in template.argv], cwd=fill(template.cwd),
                  env={k: fill(v) for k, v in template.env.items()})


__all__ = ["Driver", "HEAD_ADDRESS", "at_head"]
