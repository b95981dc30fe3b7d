"""Container options and `slurm.network_interface` on the real loopback Slurm.

The test nodes have neither pyxis (a SPANK plugin) nor Apptainer, so test-only shims in
container_shims/ stand in at the seam, the PATH the batch script sees: each records its
call, refuses what the real tool would refuse here (an unknown option, a missing mount
source), and runs the task on the node. Allocation, ranks and results stay real; what is
proven is the contract: the image and mounts reach srun / `apptainer exec` on every node.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from glmsnake.launch import Cluster, ContainerSettings, JobRecord, JobSpec, SlurmSettings, TaskFailed, run_job
from tests.cluster.helpers import CONVERT_ALLOCATION, task_env

pytestmark = pytest.mark.slurm
SHIMS = Path(__file__).resolve().parent / "container_shims"
IMAGE = "registry.example/slime:v1"


def _base(tmp_path: Path) -> Path:
    """The shared base folder: mounted into the container after the configured mounts."""
    return (tmp_path / "base").absolute()


def _cluster(tmp_path: Path, runtime: str = "none", mounts: tuple[str, ...] = (), **slurm) -> Cluster:
    _base(tmp_path).mkdir(exist_ok=True)  # mounted into the container: it must exist
    return Cluster(launcher="slurm", slurm=SlurmSettings(partition="debug", **slurm),
                   container=ContainerSettings(runtime=runtime, image=IMAGE, mounts=(*mounts, str(_base(tmp_path)))))


def _shim(tmp_path: Path, monkeypatch, runtime: str) -> Path:
    """Put one runtime's shim first on PATH (sbatch exports it to the job); returns its call log."""
    log = tmp_path / "shim.log"
    monkeypatch.setenv("PATH", f"{SHIMS / runtime}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("GLMSNAKE_SHIM_LOG", str(log))
    return log


def _run(cluster: Cluster, tmp_path: Path, name: str) -> JobRecord:
    return run_job(cluster, JobSpec(name, CONVERT_ALLOCATION, tmp_path / "logs", tasks_per_node=2), task_env)


def _run_in_container(tmp_path: Path, monkeypatch, runtime: str):
    """A 2-node x 2-task job with `runtime`, an image and one mount; (base folder, job, mount, shim calls)."""
    shim_log = _shim(tmp_path, monkeypatch, runtime)
    data = tmp_path / "data"
    data.mkdir()
    cluster = _cluster(tmp_path, runtime, (str(data),))
    rec = _run(cluster, tmp_path, runtime)
    assert [int(e["RANK"]) for e in rec.results] == [0, 1, 2, 3] and len(rec.nodes) == 2
    calls = [line for line in shim_log.read_text().splitlines() if f" {SHIM_COMMAND[runtime]} " in line]
    return _base(tmp_path), rec, data, calls


SHIM_COMMAND = {"pyxis": "srun", "apptainer": "apptainer"}


def test_pyxis_image_and_mounts_reach_srun(slurm_cluster, tmp_path, monkeypatch):
    base, _rec, data, calls = _run_in_container(tmp_path, monkeypatch, "pyxis")
    assert len(calls) == 1, calls  # the batch script's one srun launches all 4 tasks
    want = f"--container-image={IMAGE} --container-mount-home --container-mounts={data},{base}"
    assert want in calls[0], calls[0]


def test_pyxis_refusal_reaches_the_user(slurm_cluster, tmp_path, monkeypatch):
    _shim(tmp_path, monkeypatch, "pyxis")
    cluster = _cluster(tmp_path, "pyxis", (str(tmp_path / "missing"),))
    with pytest.raises(TaskFailed) as e:
        _run(cluster, tmp_path, "pyxis_bad")
    assert f"mount source {tmp_path / 'missing'} does not exist" in str(e.value)


def test_apptainer_wraps_every_task(slurm_cluster, tmp_path, monkeypatch):
    base, rec, data, calls = _run_in_container(tmp_path, monkeypatch, "apptainer")
    assert len(calls) == 4, calls  # one per task, on the task's own node
    assert sorted({c.split()[0] for c in calls}) == sorted(rec.nodes)
    for c in calls:
        assert re.search(rf"apptainer exec --nv --bind {data},{base} {re.escape(IMAGE)} python3 -u -m submitit", c), c


def test_network_interface_gives_the_task_addresses(slurm_cluster, tmp_path):
    """With an interface set, ranks use its address instead of Slurm's NodeAddr (127.0.0.1x here)."""
    rec = _run(_cluster(tmp_path, network_interface="lo"), tmp_path, "iface")
    assert {e["GLMSNAKE_NODE_ADDR"] for e in rec.results} == {"127.0.0.1"}
    assert {e["MASTER_ADDR"] for e in rec.results} == {"127.0.0.1"}
    default = _run(_cluster(tmp_path), tmp_path, "noiface")  # the default: each node's own NodeAddr
    assert all(re.fullmatch(r"127\.0\.0\.1\d", e["GLMSNAKE_NODE_ADDR"]) for e in default.results)


def test_missing_network_interface_is_named_with_the_node(slurm_cluster, tmp_path):
    with pytest.raises(TaskFailed) as e:
        _run(_cluster(tmp_path, network_interface="nosuch0"), tmp_path, "badiface")
    msg = str(e.value)
    assert re.search(r"network interface 'nosuch0' has no IPv4 address on node\d", msg), msg[:3000]
    assert "set `slurm.network_interface` to an interface every node has" in msg
