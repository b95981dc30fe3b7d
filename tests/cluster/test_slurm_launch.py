"""Multi-node launch against the real loopback Slurm. Run alone: pytest -m slurm."""

from __future__ import annotations

import dataclasses
import functools
import glob
import json
import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest

from glmsnake.errors import GlmsnakeError
from glmsnake.launch import Cluster, JobSpec, SlurmRejected, SlurmSettings, TaskFailed, run_job, run_ray_job, run_tasks
from glmsnake.launch import slurm
from glmsnake.launch.ray_processes import marked_processes, session_members
from glmsnake.launch.ray_temp import sweep_stale_temp_dirs, temp_dir
from tests.cluster.helpers import CONVERT_ALLOCATION, TRAIN_ALLOCATION
from tests.cluster.helpers import fail_on_rank_1 as _fail_on_rank_1
from tests.cluster.helpers import task_env as _env
from tests.cluster.helpers import test_driver as _test_driver

pytestmark = pytest.mark.slurm
REPO = Path(__file__).resolve().parents[2]


def _report(log: Path) -> dict:
    m = re.search(r"GLMSNAKE_TEST_DRIVER (\{.*\})", log.read_text())
    assert m, log.read_text()[-3000:]
    return json.loads(m.group(1))


def _no_ray_left(slurm_cluster, *job_ids: str) -> None:
    """No process of ours in the cluster's sessions, no Ray temp folder of these jobs, Slurm holds nothing."""
    assert job_ids and all(job_ids), job_ids
    assert slurm_cluster.jobs() == [] or all("COMPLETED" in j or "CANCELLED" in j or "FAILED" in j
                                              for j in slurm_cluster.jobs())
    left = slurm_cluster.leftovers()
    assert left == [], f"processes left in the cluster's sessions: {left}"
    temp = sorted(d for j in job_ids for d in glob.glob(temp_dir(j, 0).removesuffix("0") + "*"))
    assert temp == [], f"Ray temp folders left behind: {temp}"


def _kept_ray_logs(log_dir: Path, job_id: str) -> list[str]:
    """Nodes whose Ray logs the job kept (a failed job keeps them; a good one keeps none)."""
    kept = log_dir / "submitit" / job_id / "ray-logs"
    return sorted(d.name for d in kept.iterdir() if (d / "raylet.out").is_file()) if kept.is_dir() else []


def _describe(pid: int) -> str:
    """A process as the leftover checks see it: state, command, how much environment /proc shows."""
    d = Path(f"/proc/{pid}")
    try:
        state = (d / "stat").read_text().rsplit(")", 1)[1].split()[0]
        cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ")[:160].decode(errors="replace")
        env = (d / "environ").read_bytes()
    except OSError as e:
        return f"{pid}: gone ({e})"
    return f"{pid} [{state}] {cmd!r}, environ {len(env)} bytes: {env[:120]!r}"


def _alloc(nodes: int, gpus: int = 8, **kw):
    return dataclasses.replace(TRAIN_ALLOCATION, nodes=nodes, gpus_per_node=gpus, **kw)


# --------------------------------------------------------------------------- submitit layer


def test_run_tasks_two_nodes_rank_layout(slurm_debug, tmp_path):
    rec = run_job(slurm_debug, JobSpec("layout", CONVERT_ALLOCATION, tmp_path / "logs", tasks_per_node=2), _env)
    envs = rec.results
    assert [int(e["RANK"]) for e in envs] == [0, 1, 2, 3]
    assert {e["WORLD_SIZE"] for e in envs} == {"4"}
    assert [e["NODE_RANK"] for e in envs] == ["0", "0", "1", "1"]
    assert [e["LOCAL_RANK"] for e in envs] == ["0", "1", "0", "1"]
    assert len(rec.nodes) == 2 and len({e["GLMSNAKE_NODE"] for e in envs}) == 2
    # MASTER_ADDR is rank 0's node address as Slurm records it (NodeAddr), the same everywhere.
    assert {e["MASTER_ADDR"] for e in envs} == {envs[0]["GLMSNAKE_NODE_ADDR"]}
    assert envs[0]["MASTER_ADDR"] != envs[2]["GLMSNAKE_NODE_ADDR"]
    assert re.fullmatch(r"127\.0\.0\.1\d", envs[0]["MASTER_ADDR"])
    assert 20000 <= int(envs[0]["MASTER_PORT"]) < 32768


def test_run_tasks_failure_names_rank_and_node(slurm_debug, tmp_path):
    with pytest.raises(TaskFailed) as e:
        run_tasks(slurm_debug, JobSpec("fail", CONVERT_ALLOCATION, tmp_path / "logs"), _fail_on_rank_1)
    assert re.search(r"rank 1 on node node\d", str(e.value)) and "deliberate failure" in str(e.value)


def test_bad_partition_is_a_clear_error_before_allocation(slurm_cluster, tmp_path):
    cluster = Cluster(launcher="slurm", slurm=SlurmSettings(partition="nosuch"))
    before = slurm_cluster.jobs()
    with pytest.raises(GlmsnakeError, match="partition 'nosuch' does not exist"):
        run_tasks(cluster, JobSpec("x", CONVERT_ALLOCATION, tmp_path), _env)
    assert slurm_cluster.jobs() == before


def test_too_many_nodes_is_a_clear_error(slurm_debug, tmp_path):
    with pytest.raises(GlmsnakeError, match="asks for 9 nodes but partition 'debug' has only 8"):
        run_tasks(slurm_debug, JobSpec("x", _alloc(9), tmp_path), _env)


def test_too_many_nodes_default_partition(slurm_cluster, tmp_path):
    cluster = Cluster(launcher="slurm")  # no partition: Slurm's default
    with pytest.raises(GlmsnakeError, match="asks for 9 nodes but partition 'debug' has only 8"):
        run_tasks(cluster, JobSpec("x", _alloc(9), tmp_path), _env)


def test_slurm_refusal_is_verbatim(slurm_cluster, tmp_path):
    """Something only Slurm knows is wrong (an unknown constraint): its own words come back."""
    cluster = Cluster(launcher="slurm", slurm=SlurmSettings(constraint="nosuchfeature"))
    with pytest.raises(SlurmRejected, match="sbatch: error: .*(constraint|feature|Invalid)"):
        run_tasks(cluster, JobSpec("x", CONVERT_ALLOCATION, tmp_path), _env)


# --------------------------------------------------------------------------- Ray across 8 nodes


# 8 nodes x 64 actors costs ~3 minutes on 2 cores; the non-zero exit code is checked on 2 nodes.
@pytest.mark.parametrize("nodes,code", [(8, 0), (2, 3)])
def test_ray_8_nodes_64_gpus_exit_code(slurm_cluster, slurm_debug, tmp_path, nodes, code):
    log = tmp_path / "train.log"
    r = run_ray_job(slurm_debug, JobSpec("train", _alloc(nodes), tmp_path / "logs"),
                    functools.partial(_test_driver, nodes=nodes, gpus=8 * nodes, code=code, sleep=3),
                    log, object_store_mb=128)
    print(json.dumps(r.timings, indent=1))
    assert r.exit_code == code, log.read_text()[-3000:]
    assert r.gpus == 8 * nodes and len(r.ray_nodes) == nodes and r.nodes == [f"node{k}" for k in range(1, nodes + 1)]
    rep = _report(log)
    assert rep["nodes"] == nodes and rep["gpus"] == 8 * nodes and rep["actors"] == 8 * nodes
    assert rep["actor_node_ids"] == rep["node_ids"] and len(rep["node_ids"]) == nodes
    assert rep["node_ips"] == [f"127.0.0.{10 + k}" for k in range(1, nodes + 1)]
    # What actors print reaches the driver's log from every node, as Ray users expect (log monitors).
    assert sorted(set(re.findall(r"GLMSNAKE_PROBE ip=(127\.[0-9.]+[0-9])", log.read_text()))) == rep["node_ips"]
    assert rep["http_proxy"] is None
    assert {n["slurm_node"] for n in r.ray_nodes} == set(r.nodes)
    _no_ray_left(slurm_cluster, r.slurm_job_id)
    # A failed driver's Ray logs are kept, from every node; a good run's are not.
    assert _kept_ray_logs(tmp_path / "logs", r.slurm_job_id) == ([] if code == 0 else r.nodes)
    assert slurm_cluster.node_states() and set(slurm_cluster.node_states().values()) == {"idle"}


def test_two_ray_jobs_at_once_do_not_collide(slurm_cluster, slurm_debug, tmp_path):
    """Two 2-node jobs with 4 GPUs per node on the same two nodes (ports are per job)."""
    results: dict[int, object] = {}

    def go(i: int) -> None:
        try:
            results[i] = run_ray_job(
                slurm_debug, JobSpec(f"pair{i}", _alloc(2, gpus=4), tmp_path / f"logs{i}"),
                functools.partial(_test_driver, nodes=2, gpus=8, code=10 + i),
                tmp_path / f"train{i}.log", object_store_mb=128)
        except BaseException as e:  # noqa: BLE001
            results[i] = e

    threads = [threading.Thread(target=go, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=400)
    for i in range(2):
        r = results[i]
        assert not isinstance(r, BaseException), r
        assert r.exit_code == 10 + i and r.gpus == 8
    assert results[0].nodes == results[1].nodes  # really on the same nodes
    _no_ray_left(slurm_cluster, results[0].slurm_job_id, results[1].slurm_job_id)


def test_failed_join_is_retried(slurm_cluster, slurm_debug, tmp_path, monkeypatch):
    """A worker's first `ray start --address` fails (test-only shim on PATH): it joins on the retry."""
    shims = tmp_path / "shim"
    shims.mkdir()
    monkeypatch.setenv("PATH", f"{REPO / 'tests/cluster/fault_shims'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("GLMSNAKE_SHIM_DIR", str(shims))
    log = tmp_path / "train.log"
    r = run_ray_job(slurm_debug, JobSpec("retry", _alloc(2), tmp_path / "logs"),
                    functools.partial(_test_driver, nodes=2, gpus=16), log, object_store_mb=128)
    assert r.exit_code == 0, log.read_text()[-3000:]
    assert sorted(p.name for p in shims.iterdir()) == ["join-failed.node2"]  # the head never joins
    assert _report(log)["nodes"] == 2 and r.gpus == 16
    job_dir = tmp_path / "logs" / "submitit" / r.slurm_job_id
    err = (job_dir / f"{r.slurm_job_id}_1_log.err").read_text()
    assert "node2: Ray join attempt 1 failed, retrying: ray shim: simulated join failure on node2" in err, err[-2000:]
    assert "attempt 2" not in err
    # The failed attempt's Ray logs are kept apart from ray-logs/ (which means a failed job).
    kept = job_dir / "ray-join-failures" / "node2.attempt1" / "raylet.err"
    assert kept.read_text() == "raylet: simulated failure on node2\n"
    assert not (job_dir / "ray-logs").exists()
    _no_ray_left(slurm_cluster, r.slurm_job_id)


def test_killed_worker_raylet_fails_fast_naming_the_node(slurm_cluster, slurm_debug, tmp_path):
    logs = tmp_path / "logs"
    box: dict[str, object] = {}

    def go() -> None:
        try:
            box["r"] = run_ray_job(slurm_debug, JobSpec("kill", _alloc(3), logs),
                                   functools.partial(_test_driver, nodes=3, gpus=24, sleep=300),
                                   tmp_path / "train.log", object_store_mb=128)
        except BaseException as e:  # noqa: BLE001
            box["e"] = e

    t = threading.Thread(target=go)
    t.start()
    # Wait for the driver to be running, then kill node 2's (rank 2) raylet.
    deadline = time.time() + 240
    info = None
    while time.time() < deadline:
        infos = list(logs.glob("submitit/*/ray.worker2.json"))
        if infos and json.loads(infos[0].read_text()).get("pid") and (tmp_path / "train.log").exists() and "sleeping" in (tmp_path / "train.log").read_text():
            info = json.loads(infos[0].read_text())
            break
        time.sleep(0.5)
    assert info, "driver never got going"
    raylets = [p for p in session_members({info["pid"]}) if Path(f"/proc/{p}/comm").read_text().strip() == "raylet"]
    assert raylets
    # Every process of the node's Ray session carries the job's mark: the leftover checks see them.
    # (A process that ends between the two scans is no counterexample: look twice.)
    unmarked = set(session_members({info["pid"]})) - set(marked_processes())
    unmarked &= set(session_members({info["pid"]})) - set(marked_processes())
    assert not unmarked, f"Ray processes without the job mark: {[_describe(p) for p in sorted(unmarked)]}"
    killed_at = time.time()
    os.kill(raylets[0], signal.SIGKILL)
    t.join(timeout=120)
    print(f"killed raylet -> error in {time.time() - killed_at:.1f} s")  # how fast: benchmarks/, not a test
    assert "e" in box, box
    assert info["node"] in str(box["e"]), str(box["e"])[:2000]
    job_id = str(getattr(box["e"], "job_id", "") or "")
    state, _ = slurm.squeue_state(job_id)
    assert state is None or state in slurm.TERMINAL
    _no_ray_left(slurm_cluster, job_id)
    assert info["node"] in _kept_ray_logs(logs, job_id)


def test_stale_ray_temp_folders_are_swept(slurm_cluster, tmp_path):
    """Folders named after jobs Slurm no longer runs go; a running job's and foreign ones stay."""
    import subprocess

    running = subprocess.run(["sbatch", "--parsable", "-p", "debug", "-o", "/dev/null", "--wrap", "sleep 120"],
                             capture_output=True, text=True, check=True).stdout.strip()
    try:
        assert slurm.unfinished_jobs([running, "99"]) == {running}
        assert slurm.unfinished_jobs(["99"]) == set()  # one unknown id: squeue fails, still an answer
        for name in (f"rj{running}n0", "rj99n0", "rj99n5", "rjabc", "keep"):
            (tmp_path / name / "session_latest" / "logs").mkdir(parents=True)
        removed = sweep_stale_temp_dirs(tmp_path)
        assert removed == [str(tmp_path / "rj99n0"), str(tmp_path / "rj99n5")]
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f"rj{running}n0", "rjabc", "keep"])
    finally:
        subprocess.run(["scancel", running], check=False)


def test_status_names_the_running_training_jobs_slurm_state(slurm_cluster, tmp_path):
    """`glmsnake status` asks squeue about a run's newest training job (its submitit folder's id)."""
    import subprocess
    import sys

    cfg = tmp_path / "config.yaml"
    base = tmp_path / "base"
    cfg.write_text(f"base_dir: {base}\nlauncher: slurm\nslurm: {{partition: debug}}\n"
                   "runs: {default: {train: {backend: local}}}\n")
    running = subprocess.run(["sbatch", "--parsable", "-p", "debug", "-o", "/dev/null", "--wrap", "sleep 120"],
                             capture_output=True, text=True, check=True).stdout.strip()
    try:
        for job in ("7", running):  # an older job's folder, and the newest
            (base / "logs" / "train_default" / "submitit" / job).mkdir(parents=True)
        deadline = time.monotonic() + 60
        while slurm.squeue_state(running)[0] != "RUNNING" and time.monotonic() < deadline:
            time.sleep(0.5)
        out = subprocess.run([sys.executable, "-m", "glmsnake.cli", "status", "--configfile", str(cfg)],
                             capture_output=True, text=True, check=True).stdout
        row = next(line for line in out.splitlines() if line.startswith("│ default "))
        cells = [c.strip() for c in row.strip("│").split("│")]
        assert cells[3] == "0/32" and cells[6] == "none" and cells[8].startswith(f"{running} RUNNING on node"), row
    finally:
        subprocess.run(["scancel", running], check=False)
