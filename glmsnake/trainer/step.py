"""The `train` step: the run's allocation, Ray across it, then slime or the local trainer."""

from __future__ import annotations

from pathlib import Path

from glmsnake.config import Workflow
from glmsnake.errors import StepNotImplemented


def step(wf: Workflow, sentinel: Path, run: str) -> None:
    raise StepNotImplemented("train", "issue 6: training on the cluster and the local trainer")
