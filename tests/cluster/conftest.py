"""The loopback Slurm test cluster as a session fixture (tests marked @pytest.mark.slurm).

Started once per session under a temporary folder and stopped at the end (only the
processes it started). Set GLMSNAKE_SLURM_REUSE=<dir> to use a cluster already brought up
with `python -m tests.cluster.slurm_cluster up --dir <dir>` (it is then left running).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import sys

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from conftest import skip_or_fail  # noqa: E402
from tests.cluster.slurm_cluster import Cluster  # noqa: E402


def _have_slurm() -> bool:
    return all(shutil.which(t) for t in ("slurmctld", "slurmd", "munged", "sbatch", "unshare")) and os.geteuid() == 0


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    if not _have_slurm():
        skip_or_fail("needs root and Debian's slurm-wlm + munge (apt-get install -y slurm-wlm munge)")
    reuse = os.environ.get("GLMSNAKE_SLURM_REUSE")
    root = Path(reuse) if reuse else Path(f"/tmp/gsl{os.getpid()}")  # short: unix socket paths
    c = Cluster(root)
    old = {k: os.environ.get(k) for k in ("SLURM_CONF", "PYTHONPATH")}
    try:
        c.up()
        os.environ["SLURM_CONF"] = str(c.conf)
        # Tasks run `python -m submitit...` on the "nodes": they must import this checkout.
        os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [old["PYTHONPATH"]])])
        yield c
    finally:
        if not reuse:
            c.down()
            shutil.rmtree(root, ignore_errors=True)
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def slurm_debug(slurm_cluster):
    """The launcher's view of the test cluster: Slurm, partition `debug`, no container."""
    from glmsnake.launch import Cluster as LaunchCluster
    from glmsnake.launch import SlurmSettings

    return LaunchCluster(launcher="slurm", slurm=SlurmSettings(partition="debug"))
