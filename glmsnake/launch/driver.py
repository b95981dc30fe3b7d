"""What `ray job submit` runs on the head node, as plain data that crosses into the container.

The command is rendered where the configuration lives (the submitting side); what only the
allocation knows is filled in on the head: its address (`HEAD_ADDRESS`) and whether every node
has NVLink (`NVLS`, from preflight: NCCL_NVLS_ENABLE as slime's run scripts decide it).
"""

from __future__ import annotations

from dataclasses import dataclass

from glmsnake import knobs

HEAD_ADDRESS = "{glmsnake-head-address}"
NVLS = "{glmsnake-nvls}"


@dataclass(frozen=True)
class Driver:
    """The driver's command line, working folder and environment."""

    argv: list[str]
    cwd: str
    env: dict[str, str]


def at_head(template: Driver, head_address: str) -> Driver:
    """`template` with the head's address and NVLS filled in (a `driver_factory` for run_ray_job)."""
    nvls = knobs.NVLS_ENABLE.raw() or "0"
    fill = lambda s: s.replace(HEAD_ADDRESS, head_address).replace(NVLS, nvls)  # noqa: E731
    return Driver(argv=[fill(a) for a in template.argv], cwd=fill(template.cwd),
                  env={k: fill(v) for k, v in template.env.items()})


__all__ = ["Driver", "HEAD_ADDRESS", "NVLS", "at_head"]
