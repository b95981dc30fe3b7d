"""Preflight on the loopback Slurm cluster: each node of an allocation checks itself first.

The test nodes have no GPUs, so a test-only nvidia-smi (gpu_shims/) answers per node from a
JSON file: one node can have another driver, a busy GPU, ECC errors, a missing GPU, or NVLink.
Allocation, ranks, the job folder and the resubmission are real. The NCCL all-reduce needs GPUs
torch can use: with the stand-in it is switched off (`preflight_nccl=False`), except where the
test is that torch cannot use what nvidia-smi lists.
"""

from __future__ import annotations

import functools
import json
import os
import re
from pathlib import Path

import pytest

from glmsnake.launch import Allocation, Cluster, JobSpec, SlurmSettings, TaskFailed, run_job, run_ray_job
from glmsnake.launch.driver import NVLS, Driver, at_head
from tests.cluster.helpers import task_env

pytestmark = pytest.mark.slurm
GPU_SHIMS = Path(__file__).resolve().parent / "gpu_shims"


def _gpus(tmp_path: Path, monkeypatch, config: dict) -> None:
    """The stand-in nvidia-smi first on PATH (sbatch exports it to the job), answering from `config`."""
    path = tmp_path / "gpus.json"
    path.write_text(json.dumps(config))
    monkeypatch.setenv("PATH", f"{GPU_SHIMS}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("GLMSNAKE_FAKE_GPUS", str(path))


def _job(tmp_path: Path, nodes: int, name: str) -> JobSpec:
    return JobSpec(name, Allocation(nodes=nodes, gpus_per_node=8, cpus_per_task=1, time_min=10), tmp_path / "logs")


def test_bad_nodes_are_named_with_the_check_and_the_fix(slurm_cluster, tmp_path, monkeypatch):
    """Another driver, a busy GPU, ECC errors, a lost GPU: each on its node, all in one message,
    before the job's work starts (the task function never ran)."""
    _gpus(tmp_path, monkeypatch, {"node2": {"driver": "535.104.05"}, "node3": {"busy": {"3": [4242]}},
                                  "node4": {"ecc": {"5": 2}}, "node5": {"gpus": 7}})
    cluster = Cluster(launcher="slurm", slurm=SlurmSettings(partition="debug", preflight_nccl=False))
    with pytest.raises(TaskFailed) as e:
        run_job(cluster, _job(tmp_path, 5, "bad_nodes"), task_env)
    msg = str(e.value)
    assert "preflight failed on node2, node3, node4, node5" in msg, msg[:3000]
    assert "GPU driver 535.104.05 on node2 differs from the other nodes' (550.54.15 on 4 node(s))" in msg
    assert "GPU 3 on node3 is busy with another process's compute (pid 4242)" in msg
    assert "GPU(s) 5 on node4 report uncorrected ECC errors" in msg
    assert "nvidia-smi on node5 sees 7 GPU(s), the step asked for 8" in msg
    assert "`slurm.exclude_bad_nodes: true` submits again without them" in msg
    verdict = json.loads(next((tmp_path / "logs" / "submitit").glob("*/preflight.json")).read_text())
    assert verdict["ok"] is False and verdict["bad_nodes"] == ["node2", "node3", "node4", "node5"]
    assert sorted(verdict["seconds"]) == [f"node{k}" for k in range(1, 6)]


def test_with_exclusion_the_job_runs_again_without_the_bad_node(slurm_cluster, tmp_path, monkeypatch):
    _gpus(tmp_path, monkeypatch, {"node2": {"driver": "535.104.05"}})
    cluster = Cluster(launcher="slurm", slurm=SlurmSettings(partition="debug", preflight_nccl=False, exclude_bad_nodes=True))
    rec = run_job(cluster, _job(tmp_path, 3, "exclude"), task_env)
    assert rec.excluded == ["node2"] and len(rec.retried) == 1 and rec.retried[0]["bad_nodes"] == ["node2"]
    assert "node2" not in rec.nodes and len(rec.nodes) == 3
    assert rec.preflight["ok"] is True and rec.preflight["wall_s"] < 30
    assert [int(r["RANK"]) for r in rec.results] == [0, 1, 2]


def test_retries_are_bounded(slurm_cluster, tmp_path, monkeypatch):
    """Every node has a busy GPU: one resubmission (preflight_retries: 1), then the error."""
    _gpus(tmp_path, monkeypatch, {"default": {"busy": {"0": [7]}}, "node1": {"busy": {}}})
    cluster = Cluster(launcher="slurm", slurm=SlurmSettings(partition="debug", preflight_nccl=False, exclude_bad_nodes=True,
                                                            preflight_retries=1))
    with pytest.raises(TaskFailed) as e:
        run_job(cluster, _job(tmp_path, 2, "bounded"), task_env)
    assert "GPU 0 on node" in str(e.value)
    assert len(list((tmp_path / "logs" / "submitit").glob("*/preflight.json"))) == 2  # two jobs, no third


def test_nvls_follows_the_nodes_topology(slurm_cluster, tmp_path, monkeypatch):
    """NCCL_NVLS_ENABLE in the driver's environment is 1 where every node shows NVLink (0 without
    NVLink: tests/test_preflight.py; without nvidia-smi: the slime contract on 8 nodes)."""
    _gpus(tmp_path, monkeypatch, {"default": {"nvlink": True}})
    cluster = Cluster(launcher="slurm", slurm=SlurmSettings(partition="debug", preflight_nccl=False))
    template = Driver(argv=["python3", "-c", "import os; print('NVLS=' + os.environ['NCCL_NVLS_ENABLE'])"],
                      cwd=str(tmp_path), env={"NCCL_NVLS_ENABLE": NVLS})
    log = tmp_path / "driver.log"
    r = run_ray_job(cluster, _job(tmp_path, 1, "nvls"), functools.partial(at_head, template), log, object_store_mb=128)
    assert r.exit_code == 0 and "NVLS=1" in log.read_text()
    assert r.preflight["nvls"] == 1


def test_glmsnake_preflight_checks_a_fresh_allocation(slurm_cluster, tmp_path, monkeypatch):
    """`glmsnake preflight --nodes N` before a long run: a line per node when all pass; the bad node,
    its check and the fix (exit 2, no traceback) when one does not."""
    import shutil
    import subprocess

    cfg = tmp_path / "config.yaml"
    cfg.write_text(f"base_dir: {tmp_path / 'base'}\nlauncher: slurm\nslurm: {{partition: debug, preflight_nccl: false}}\n")
    cmd = [shutil.which("glmsnake"), "preflight", "--configfile", str(cfg), "--nodes", "3"]
    _gpus(tmp_path, monkeypatch, {"default": {"nvlink": True}})
    ok = subprocess.run(cmd, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert "preflight: 3 node(s) x 8 GPU(s) passed" in ok.stdout and "NCCL_NVLS_ENABLE=1" in ok.stdout
    lines = [ln for ln in ok.stdout.splitlines() if ln.startswith("  node")]
    assert len(lines) == 3 and all("GPUs 8, driver 550.54.15, CUDA 12.4" in ln for ln in lines), ok.stdout
    assert all(re.search(r"all-reduce \d+\.\d\d s", ln) for ln in lines), ok.stdout  # gloo across the 3 nodes
    _gpus(tmp_path, monkeypatch, {"node2": {"driver": "535.104.05"}})
    bad = subprocess.run(cmd, capture_output=True, text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr[-3000:]
    assert "preflight failed on node2" in bad.stderr and "fix: " in bad.stderr


def test_a_node_that_does_not_see_the_shared_folder_is_named_and_left_out(slurm_cluster, tmp_path):
    """node2 does not mount the job folder's filesystem (an empty tmpfs over it in node2's mount
    namespace): its tasks cannot even start, and the error says which node and why; with
    exclusion, the job runs again without node2."""
    logs = tmp_path / "logs"
    logs.mkdir()
    with slurm_cluster.masked_on("node2", logs):
        cluster = Cluster(launcher="slurm", slurm=SlurmSettings(partition="debug"))
        with pytest.raises(TaskFailed) as e:
            run_job(cluster, _job(tmp_path, 3, "unseen"), task_env)
        msg = str(e.value)
        assert "rank 1 on node node2: no result and no log from node2: could not start on node2" in msg, msg[:2000]
        assert "it may not see the job folder" in msg
        assert "base_dir must be on storage every node mounts" in msg
        excluding = Cluster(launcher="slurm", slurm=SlurmSettings(partition="debug", exclude_bad_nodes=True))
        rec = run_job(excluding, _job(tmp_path, 3, "unseen_excluded"), task_env)
    assert rec.excluded == ["node2"] and "node2" not in rec.nodes and len(rec.results) == 3


def test_a_missing_network_interface_is_named_on_every_node(slurm_cluster, tmp_path):
    """`slurm.network_interface` that no node has: each node's preflight names it (the tasks use
    Slurm's addresses until then), and exclusion leaves no one out: the problem is the setting."""
    cluster = Cluster(launcher="slurm", slurm=SlurmSettings(partition="debug", network_interface="nosuch0",
                                                            exclude_bad_nodes=True))
    with pytest.raises(TaskFailed) as e:
        run_job(cluster, _job(tmp_path, 2, "no_iface"), task_env)
    msg = str(e.value)
    for node in ("node1", "node2"):
        assert f"network: no network interface 'nosuch0' on {node} (it has: " in msg, msg[:3000]
    assert "set `slurm.network_interface` to an interface every node has" in msg
    assert len(list((tmp_path / "logs" / "submitit").glob("*/preflight.json"))) == 1  # not submitted again


def test_an_interface_down_on_one_node_is_named_and_left_out(slurm_cluster, tmp_path):
    """The test nodes share one network namespace, so the kernel's list of node2's interfaces is
    what node2 sees of it: sysfs, which here shows `lo` with its link down (a tmpfs over
    /sys/class/net in node2's slurmd mount namespace), as an InfiniBand port that lost its link
    while keeping its address. node2 is named; with exclusion the job runs on the other nodes."""
    with slurm_cluster.masked_on("node2", Path("/sys/class/net"), files={"lo/operstate": "down\n"}):
        cluster = Cluster(launcher="slurm", slurm=SlurmSettings(partition="debug", network_interface="lo"))
        with pytest.raises(TaskFailed) as e:
            run_job(cluster, _job(tmp_path, 3, "link_down"), task_env)
        msg = str(e.value)
        assert "network: network interface 'lo' on node2 is down" in msg, msg[:3000]
        assert "preflight failed on node2:" in msg, msg[:3000]  # node2 alone
        excluding = Cluster(launcher="slurm", slurm=SlurmSettings(partition="debug", network_interface="lo",
                                                                  exclude_bad_nodes=True))
        rec = run_job(excluding, _job(tmp_path, 3, "link_down_excluded"), task_env)
    assert rec.excluded == ["node2"] and "node2" not in rec.nodes and len(rec.results) == 3


def test_gpus_that_nvidia_smi_lists_but_torch_cannot_use_are_named(slurm_cluster, tmp_path, monkeypatch):
    """With the NCCL all-reduce on (the default), each node's first task runs glmsnake's NCCL probe
    in a child process: here torch is the CPU build, as an image whose CUDA the node's driver
    cannot run, so every node is named with the fix, and nobody is left out (it is every node)."""
    _gpus(tmp_path, monkeypatch, {"default": {}})
    cluster = Cluster(launcher="slurm", slurm=SlurmSettings(partition="debug", exclude_bad_nodes=True))
    with pytest.raises(TaskFailed) as e:
        run_job(cluster, _job(tmp_path, 2, "no_cuda"), task_env)
    msg = str(e.value)
    for node in ("node1", "node2"):
        assert re.search(rf"gpus: torch \S+ \(CUDA None\) cannot use the GPUs.* on {node}, though nvidia-smi lists them", msg), msg[:3000]
    assert "align them, or leave the node out" in msg
    assert len(list((tmp_path / "logs" / "submitit").glob("*/preflight.json"))) == 1  # not submitted again


def test_a_node_whose_image_holds_other_packages_is_named_and_left_out(slurm_cluster, tmp_path, monkeypatch):
    """A folder on every task's PYTHONPATH is empty on node1 and node3 and, on node2 (a tmpfs in its
    slurmd mount namespace), holds one more package, as an image tag that moved between two pulls
    would: node2 is named with the package; with exclusion the job runs on the other nodes."""
    extra = tmp_path / "site"
    extra.mkdir()
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(extra), os.environ.get("PYTHONPATH")) if p))
    with slurm_cluster.masked_on("node2", extra, files={"flash_attn-2.6.3.dist-info/METADATA": "Name: flash_attn\nVersion: 2.6.3\n"}):
        cluster = Cluster(launcher="slurm", slurm=SlurmSettings(partition="debug"))
        with pytest.raises(TaskFailed) as e:
            run_job(cluster, _job(tmp_path, 3, "other_image"), task_env)
        assert "software: the packages on node2 differ from the other nodes': +flash-attn 2.6.3" in str(e.value), str(e.value)[:3000]
        excluding = Cluster(launcher="slurm", slurm=SlurmSettings(partition="debug", exclude_bad_nodes=True))
        rec = run_job(excluding, _job(tmp_path, 3, "other_image_excluded"), task_env)
    assert rec.excluded == ["node2"] and "node2" not in rec.nodes and len(rec.results) == 3
