"""`snakemake --profile slurm ...` on the loopback Slurm cluster.

One base folder for the module: `torch_dist` first (download_hf through the slurm executor
plugin, the 2-node conversion through submitit), then `train` (the whole DAG, the 8-node
training job with the local backend), then a second run whose 2-node training job Slurm
signals (USR2, as before a time limit or at preemption): submitit requeues it, it comes
back by itself, resumes from its last checkpoint and finishes.

The profile is found by name, as the README says (`glmsnake` links the repo's profiles into
the user's Snakemake config folder; here a temporary XDG_CONFIG_HOME).
"""

from __future__ import annotations

import glob
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from glmsnake.profiles import install_profiles

pytestmark = pytest.mark.slurm
REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))
from conftest import snakemake  # noqa: E402

SHORT = "{default: {rollout: {num_rollout: 4}, train: {save_interval: 2}}}"
# A second run for the requeue test: 2 nodes, long enough to be signalled mid-run.
# The resume tests keep every checkpoint (keep_checkpoints: null, slime's own behaviour) so that
# "nothing deleted" is theirs to assert; retention has tests of its own (tests/test_retention.py).
WITH_RQ = ("{default: {rollout: {num_rollout: 4}, train: {save_interval: 2}}, "
           "rq: {rollout: {num_rollout: 160}, train: {save_interval: 8, keep_checkpoints: null, allocation: {nodes: 2}}}}")


def _scontrol(job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True).stdout
    return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)


def _plugin_jobs(output: str) -> dict[str, str]:
    """{rule: Slurm job id} of the jobs the executor plugin submitted."""
    return {m[1]: m[0] for m in re.findall(r"submitted with SLURM jobid (\d+) \(log: \S*/rule_(\w+)/", output)}


@pytest.fixture(scope="module")
def wf_env(slurm_cluster, tmp_path_factory):
    xdg = tmp_path_factory.mktemp("xdg")
    install_profiles(xdg / "snakemake")
    return {"XDG_CONFIG_HOME": str(xdg)}


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("wf")


def _args(base: Path, target: str, runs: str = SHORT) -> list[str]:
    return ["--profile", "slurm", target, "--slurm-init-seconds-before-status-checks", "1",
            "--config", "launcher=slurm", f"base_dir={base / 'base'}", "slurm={partition: debug}", f"runs={runs}"]


def _timed(base: Path, target: str, env: dict) -> tuple[str, float]:
    """`snakemake --profile slurm TARGET`: its output and seconds."""
    t0 = time.time()
    out = snakemake(base, *_args(base, target), env=env).stdout
    return out, time.time() - t0


@pytest.fixture(scope="module")
def torch_dist_run(wf_env, base):
    return _timed(base, "torch_dist", wf_env)


def test_profile_torch_dist_two_nodes(slurm_cluster, torch_dist_run, base):
    out, seconds = torch_dist_run
    print(f"snakemake --profile slurm torch_dist: {seconds:.1f} s")
    # Single-node rules went through the executor plugin, with the profile's resources.
    plugin = _plugin_jobs(out)
    assert set(plugin) == {"download_hf"}, out[-3000:]
    job = _scontrol(plugin["download_hf"])
    assert job["JobState"] == "COMPLETED" and job["Partition"] == "debug" and job["NumNodes"] == "1"
    assert job["TimeLimit"] == "01:00:00" and job["MinMemoryNode"] == "4000M" and job["CPUs/Task"] == "2"
    assert "localrule convert_torch_dist" in out
    # The conversion: one 2-node Slurm job, a writer rank on each node.
    s = json.loads((base / "base" / "tiny-glm4moe_torch_dist" / "glmsnake.done.json").read_text())
    jid, nodes = s["job"]["job_id"], s["job"]["nodes"]
    assert len(nodes) == 2 and len(set(nodes)) == 2
    job = _scontrol(jid)
    assert job["JobState"] == "COMPLETED" and job["NumNodes"] == "2" and job["NumTasks"] == "2"
    assert subprocess.run(["scontrol", "show", "hostnames", job["NodeList"]], capture_output=True,
                          text=True).stdout.split() == nodes
    folder = base / "base" / "logs" / "convert_torch_dist" / "submitit" / jid
    ranks = {}
    for r in range(2):
        status, res = pickle.loads((folder / f"{jid}_{r}_result.pkl").read_bytes())
        assert status == "success"
        ranks[res.info.rank] = res.info.node
    assert [ranks[0], ranks[1]] == nodes  # writer rank r ran on the job's r-th node
    assert s["writers"] == 2 and {"__0_0.distcp", "__1_0.distcp"} <= set(s["files"])
    release = base / "base" / "tiny-glm4moe_torch_dist" / "release"
    assert (release / "__0_0.distcp").stat().st_size > 0 and (release / "__1_0.distcp").stat().st_size > 0
    assert (base / "base" / "tiny-glm4moe_torch_dist" / "latest_checkpointed_iteration.txt").read_text() == "release"


@pytest.fixture(scope="module")
def train_run(wf_env, base, torch_dist_run):
    return _timed(base, "train", wf_env)


def test_profile_train_whole_dag_8_nodes(slurm_cluster, train_run, base):
    out, seconds = train_run
    print(f"snakemake --profile slurm train (after torch_dist): {seconds:.1f} s")
    assert "localrule convert_torch_dist" not in out  # done before, not rerun
    assert set(_plugin_jobs(out)) == {"download_dataset"}
    assert "localrule train_run" in out
    s = json.loads((base / "base" / "runs" / "default" / "glmsnake.done.json").read_text())
    assert s["final_iteration"] == 3 and s["checkpoints"] == [1, 3] and s["backend"] == "local"
    job = s["job"]
    assert job["nodes"] == [f"node{k}" for k in range(1, 9)] and job["gpus"] == 64 and job["attempts"] == 1
    assert _scontrol(job["slurm_job_id"])["JobState"] == "COMPLETED"
    assert s["metrics_summary"]["rollouts"] == 4
    rows = [json.loads(x) for x in (base / "base" / "runs" / "default" / "metrics.jsonl").read_text().splitlines()]
    assert [r["rollout_id"] for r in rows if "rollout_id" in r and r.get("kind") != "eval"] == [0, 1, 2, 3]
    assert (base / "base" / "runs" / "default" / "train_curves.png").stat().st_size > 0
    # The driver ran on node1; its output is in the rule's own log, next to the step's lines.
    rule_log = (base / "base" / "logs" / "train.default.log").read_text()
    assert "[glmsnake] train default: backend local, launcher slurm" in rule_log
    assert [int(x) for x in re.findall(r"\[trainer\] rollout (\d+):", rule_log)] == [0, 1, 2, 3], rule_log[-3000:]
    assert "GLMSNAKE_SUMMARY " in rule_log
    print("train timings:", json.dumps(job["timings"]))
    assert slurm_cluster.leftovers() == []
    assert set(slurm_cluster.node_states().values()) == {"idle"}


def _rollout_ids(metrics: Path) -> list[int]:
    if not metrics.exists():
        return []
    rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
    return [r["rollout_id"] for r in rows if "rollout_id" in r and r.get("kind") != "eval"]


def _iters(ck: Path) -> list[int]:
    return sorted(int(p.name[5:]) for p in ck.glob("iter_*")) if ck.is_dir() else []


def test_requeue_comes_back_by_itself_and_resumes(slurm_cluster, wf_env, base, train_run):
    """USR2 (Slurm's warning before the time limit / at preemption) mid-run: submitit requeues the
    job, Slurm restarts it, the trainer resumes from its last checkpoint and Snakemake sees success."""
    run_dir = base / "base" / "runs" / "rq"
    ck, metrics = run_dir / "checkpoints", run_dir / "metrics.jsonl"
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(base),
           "--configfile", str(REPO / "config" / "config.yaml"), "--cores", "2", *_args(base, "train", WITH_RQ)]
    log = open(base / "rq.snakemake.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **wf_env})
    try:
        # Wait until the job trains and has saved at least one checkpoint, then signal it.
        deadline = time.time() + 240
        job_id = None
        while time.time() < deadline and proc.poll() is None:
            if job_id is None:
                q = subprocess.run(["squeue", "-h", "-n", "train_rq", "-o", "%i %T"], capture_output=True,
                                   text=True).stdout.split()
                job_id = q[0] if q and q[1] == "RUNNING" else None
            if job_id and _iters(ck) and len(_rollout_ids(metrics)) >= 12:
                break
            time.sleep(0.3)
        assert job_id and _iters(ck), (base / "rq.snakemake.log").read_text()[-3000:]
        before_iters, before_ids = _iters(ck), _rollout_ids(metrics)
        assert before_ids[-1] < 159, "the run finished before it could be signalled; make it longer"
        subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
        # Slurm holds a requeued job for 120 s (BeginTime); an operator releasing it now.
        deadline = time.time() + 120
        while time.time() < deadline:
            j = _scontrol(job_id)
            if j.get("Restarts") == "1" and j.get("JobState") == "PENDING":
                # Released once Slurm has finished the first attempt (nodes idle, its processes
                # gone), as after the 120 s hold: started sooner, the new attempt meets the old
                # one's late kill and completion on the same node, which no real requeue sees.
                slurm_cluster.wait_idle(timeout=60)
                gone = time.time() + 30
                while time.time() < gone and slurm_cluster.leftovers():
                    time.sleep(0.3)
                subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True)
                break
            time.sleep(0.3)
        else:
            pytest.fail(f"job {job_id} was not requeued: {_scontrol(job_id)}")
        rc = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=60)
        log.close()
    out = (base / "rq.snakemake.log").read_text()
    assert rc == 0, out[-4000:]
    j = _scontrol(job_id)
    assert j["Restarts"] == "1" and j["JobState"] == "COMPLETED"
    s = json.loads((run_dir / "glmsnake.done.json").read_text())
    assert s["final_iteration"] == 159 and s["job"]["attempts"] == 2 and s["job"]["slurm_job_id"] == job_id
    # Resumed, not restarted: a second driver start that loaded the latest checkpoint of attempt 1.
    driver_log = (base / "base" / "logs" / "train_rq" / "train_rq.driver.log").read_text()
    resumed = [int(x) for x in re.findall(r"resuming from iter (\d+)", driver_log)]
    assert len(resumed) == 1, driver_log[-3000:]
    # Both attempts' driver output reached the rule's log (the requeue happened inside one step).
    rule_log = (base / "base" / "logs" / "train.rq.log").read_text()
    assert [int(x) for x in re.findall(r"resuming from iter (\d+)", rule_log)] == resumed
    assert resumed[0] >= before_iters[-1]  # never older than what existed when signalled
    assert resumed[0] >= before_ids[-1] - 8  # lost at most one save interval
    # No checkpoint was deleted; metrics continue (each rollout once, in order).
    assert set(before_iters) <= set(_iters(ck))
    assert _rollout_ids(metrics) == list(range(160))
    assert slurm_cluster.leftovers() == []
    # The second attempt's Ray had a mark and temp folder of its own; both attempts' folders are gone.
    folder = base / "base" / "logs" / "train_rq" / "submitit" / job_id
    assert any(f"/tmp/rj{job_id}r1n0/" in p.read_text() for p in (folder / "attempt1").glob("ray-*.log"))
    assert glob.glob(f"/tmp/rj{job_id}n*") == [] and glob.glob(f"/tmp/rj{job_id}r*") == []


def test_time_limit_ends_training_and_the_rerun_resumes(slurm_cluster, wf_env, base, train_run):
    """A 1-minute Slurm time limit ends a (non-requeueing) training job mid-run; Snakemake reports
    the failure; the rerun resumes from the last checkpoint: iteration and metrics continue, no
    checkpoint is deleted, at most one save interval is lost."""
    run_dir = base / "base" / "runs" / "tl"
    ck, metrics = run_dir / "checkpoints", run_dir / "metrics.jsonl"
    alloc = "allocation: {nodes: 2, time_min: 1, min_time_min: 1}"
    # max_requeues 0: the time limit ends it, no requeue.
    long_run = f"{{default: {{rollout: {{num_rollout: 4}}, train: {{save_interval: 2}}}}, " \
               f"tl: {{rollout: {{num_rollout: 5000}}, train: {{save_interval: 8, max_requeues: 0, keep_checkpoints: null, {alloc}}}}}}}"
    env = wf_env
    t0 = time.time()
    first = snakemake(base, *_args(base, "train", long_run), env=env, check=False)
    print(f"time-limited attempt: {time.time() - t0:.1f} s")
    assert first.returncode != 0
    assert re.search(r"TIMEOUT|timed-out", first.stdout), first.stdout[-4000:]
    cut_job = [d.name for d in (base / "base" / "logs" / "train_tl" / "submitit").iterdir() if d.name.isdigit()]
    assert not (run_dir / "glmsnake.done.json").exists()
    cut_iters, cut_ids = _iters(ck), _rollout_ids(metrics)
    assert cut_iters and cut_ids and cut_ids[-1] < 4999, first.stdout[-3000:]
    assert slurm_cluster.leftovers() == []  # incl. Ray processes: a second SIGTERM must not cut teardown short
    # The rerun (a longer limit, and a run that ends 16 rollouts after the checkpoint).
    last = cut_iters[-1]
    total = last + 1 + 16
    rerun = f"{{default: {{rollout: {{num_rollout: 4}}, train: {{save_interval: 2}}}}, " \
            f"tl: {{rollout: {{num_rollout: {total}}}, train: {{save_interval: 8, max_requeues: 0, keep_checkpoints: null, " \
            f"allocation: {{nodes: 2}}}}}}}}"
    out = snakemake(base, *_args(base, "train", rerun), env=env).stdout
    assert "localrule train_run" in out
    s = json.loads((run_dir / "glmsnake.done.json").read_text())
    assert s["final_iteration"] == total - 1 and s["job"]["attempts"] == 1
    driver_log = (base / "base" / "logs" / "train_tl" / "train_tl.driver.log").read_text()
    assert [int(x) for x in re.findall(r"resuming from iter (\d+)", driver_log)] == [last]
    assert cut_ids[-1] - last <= 8  # lost at most one save interval
    assert set(cut_iters) <= set(_iters(ck))  # nothing deleted
    assert _rollout_ids(metrics) == list(range(total))  # metrics continue, each rollout once
    # SIGKILL after KillWait may beat the cut job's cleanup; the next job's sweep got its Ray folders.
    assert len(cut_job) == 1 and glob.glob(f"/tmp/rj{cut_job[0]}n*") == []


def test_ctrl_c_cancels_the_training_job(slurm_cluster, wf_env, base, train_run):
    """Ctrl-C in the terminal (SIGINT to Snakemake's whole process group) while the 2-node
    training job runs: the job is cancelled, Ray is gone from every node (processes and temp
    folders), no sentinel claims the run finished, and Snakemake exits non-zero."""
    run_dir = base / "base" / "runs" / "cc"
    runs = "{default: {rollout: {num_rollout: 4}, train: {save_interval: 2}}, " \
           "cc: {rollout: {num_rollout: 5000}, train: {save_interval: 8, allocation: {nodes: 2}}}}"
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(base),
           "--configfile", str(REPO / "config" / "config.yaml"), "--cores", "2", *_args(base, "train", runs)]
    out_path = base / "cc.snakemake.log"
    with open(out_path, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **wf_env},
                                start_new_session=True)  # its own process group, as in a terminal
    job_id = None
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None and len(_rollout_ids(run_dir / "metrics.jsonl")) < 3:
            time.sleep(0.3)
        q = subprocess.run(["squeue", "-h", "-n", "train_cc", "-o", "%i %T"], capture_output=True, text=True)
        assert q.stdout.split()[1:2] == ["RUNNING"], out_path.read_text()[-3000:]
        job_id = q.stdout.split()[0]
        os.killpg(proc.pid, signal.SIGINT)
        rc = proc.wait(timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    log = out_path.read_text()
    assert rc != 0, log[-3000:]
    assert f"interrupted, cancelling job {job_id}" in (base / "base" / "logs" / "train.cc.log").read_text()
    deadline = time.time() + 30
    while time.time() < deadline and _scontrol(job_id).get("JobState") not in ("CANCELLED", "COMPLETED", "FAILED"):
        time.sleep(0.3)
    assert _scontrol(job_id)["JobState"] == "CANCELLED"
    deadline = time.time() + 30  # slurmstepd finishes the kill (KillWait) on its own time
    while time.time() < deadline and (slurm_cluster.leftovers() or glob.glob(f"/tmp/rj{job_id}n*")):
        time.sleep(0.5)
    assert slurm_cluster.leftovers() == []
    assert glob.glob(f"/tmp/rj{job_id}n*") == []
    assert not (run_dir / "glmsnake.done.json").exists()
    assert set(slurm_cluster.node_states().values()) == {"idle"}
