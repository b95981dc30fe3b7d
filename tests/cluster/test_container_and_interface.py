"""Container options and `slurm.network_interface` on the real loopback Slurm.

The test nodes have neither pyxis (a SPANK plugin) nor Apptainer, so test-only shims in
container_shims/ stand in at the seam, the PATH the batch script sees: each records its
call, refuses what the real tool would refuse here (an unknown option, a missing mount
source), and runs the task on the node inside an emulated image (tests/container_image.py:
the image's python3, the host venv and this repository hidden). Allocation, ranks and
results stay real; what is proven is the contract (the image and mounts reach srun /
`apptainer exec` on every node) and that the task runs from what glmsnake ships.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import cloudpickle
import pytest

from glmsnake.launch import Cluster, ContainerSettings, JobRecord, JobSpec, SlurmSettings, TaskFailed, run_job
from tests.cluster import helpers
from tests.cluster.helpers import CONVERT_ALLOCATION, task_env
from tests.container_image import IMAGE

pytestmark = pytest.mark.slurm
SHIMS = Path(__file__).resolve().parent / "container_shims"


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
    return run_job(cluster, JobSpec(name, CONVERT_ALLOCATION, _base(tmp_path) / "logs", tasks_per_node=2), task_env)


def _run_in_container(tmp_path: Path, monkeypatch, runtime: str):
    """A 2-node x 2-task job with `runtime`, an image and one mount; (base folder, job, mount, shim calls)."""
    shim_log = _shim(tmp_path, monkeypatch, runtime)
    data = tmp_path / "data"
    data.mkdir()
    cluster = _cluster(tmp_path, runtime, (str(data),))
    cloudpickle.register_pickle_by_value(helpers)  # the repository is hidden in the image
    try:
        rec = run_job(cluster, JobSpec(runtime, CONVERT_ALLOCATION, _base(tmp_path) / "logs", tasks_per_node=2),
                      helpers.task_env_and_python)
    finally:
        cloudpickle.unregister_pickle_by_value(helpers)
    assert [int(e["RANK"]) for e in rec.results] == [0, 1, 2, 3] and len(rec.nodes) == 2
    # Every task ran the image's python3 and glmsnake from the shipped runtime, not this checkout.
    image_dir = dict(e.split("=", 1) for e in os.environ["GLMSNAKE_TEST_IMAGES"].split(","))[IMAGE]
    runtime_dir = next((_base(tmp_path) / "logs" / "submitit" / "task-runtime").iterdir())
    for e in rec.results:
        assert e["executable"].startswith(image_dir) and e["image"] == IMAGE, e
        assert e["glmsnake"] == str(runtime_dir / "glmsnake" / "__init__.py"), e
    calls = [line for line in shim_log.read_text().splitlines() if f" {SHIM_COMMAND[runtime]} " in line]
    return _base(tmp_path), rec, data, calls


SHIM_COMMAND = {"pyxis": "srun", "apptainer": "apptainer"}


def test_pyxis_image_and_mounts_reach_srun(slurm_cluster, container_images, tmp_path, monkeypatch):
    base, _rec, data, calls = _run_in_container(tmp_path, monkeypatch, "pyxis")
    assert len(calls) == 1, calls  # the batch script's one srun launches all 4 tasks
    want = f"--container-image={IMAGE} --container-mount-home --container-mounts={data},{base}"
    assert want in calls[0], calls[0]


def test_pyxis_refusal_reaches_the_user(slurm_cluster, container_images, tmp_path, monkeypatch):
    _shim(tmp_path, monkeypatch, "pyxis")
    cluster = _cluster(tmp_path, "pyxis", (str(tmp_path / "missing"),))
    with pytest.raises(TaskFailed) as e:
        _run(cluster, tmp_path, "pyxis_bad")
    assert f"mount source {tmp_path / 'missing'} does not exist" in str(e.value)


def test_apptainer_wraps_every_task(slurm_cluster, container_images, tmp_path, monkeypatch):
    base, rec, data, calls = _run_in_container(tmp_path, monkeypatch, "apptainer")
    assert len(calls) == 4, calls  # one per task, on the task's own node
    assert sorted({c.split()[0] for c in calls}) == sorted(rec.nodes)
    for c in calls:
        assert re.search(rf"apptainer exec --nv --bind {data},{base} {re.escape(IMAGE)} python3 -u "
                         rf"\S+/task-runtime/\w+/glmsnake/launch/container_boot.py --image {re.escape(IMAGE)} "
                         rf"-u -m submitit", c), c


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
    assert re.search(r"no network interface 'nosuch0' on node\d \(it has: [^)]*\blo\b", msg), msg[:3000]
    assert "set `slurm.network_interface` to an interface every node has" in msg


def test_slime_torch_dist_conversion_runs_in_apptainer_on_2_nodes(slurm_cluster, container_images, tiny_hf, tmp_path,
                                                                  monkeypatch):
    """The conversion step with slime's converter in the image: one torchrun per node (2 x 2 ranks), each
    inside `apptainer exec` of the emulated image, started from the task runtime under base_dir."""
    from glmsnake import resolve
    from glmsnake.errors import GlmsnakeError
    from glmsnake.steps import convert as convert_steps
    from tests.test_torch_dist import STAND_IN

    shim_log = _shim(tmp_path, monkeypatch, "apptainer")
    slime = tmp_path / "slime"
    (slime / "tools").mkdir(parents=True)
    (slime / "tools" / "convert_hf_to_torch_dist.py").write_text(STAND_IN.replace(
        "import json, os, sys", "import json, os, sys\nrecord_python = sys.executable"
    ).replace('"cwd": os.getcwd(),', '"cwd": os.getcwd(), "python": record_python,'))
    records = tmp_path / "records"
    records.mkdir()
    monkeypatch.setenv("GLMSNAKE_STANDIN_DIR", str(records))
    wf = resolve.load({"base_dir": str(tmp_path / "base"), "launcher": "slurm", "slurm": {"partition": "debug"},
                       "overrides": {"container": {"runtime": "apptainer", "image": IMAGE, "mounts": [str(tmp_path)]},
                                     "convert": {"torch_dist": {"backend": "slime", "writers_per_node": 2,
                                                                "allocation": {"nodes": 2, "cpus_per_task": 1}}},
                                     "train": {"slime_dir": str(slime), "megatron_dir": "/root/Megatron-LM"}}})
    shutil.copytree(tiny_hf, wf.paths.hf_dir)
    with pytest.raises(GlmsnakeError, match="latest_checkpointed_iteration.txt"):  # the stand-in converts nothing
        convert_steps.convert_torch_dist(wf, wf.paths.torch_dist_dir / "glmsnake.done.json")
    got = [json.loads(p.read_text()) for p in sorted(records.glob("rank*.json"))]
    assert sorted(int(r["env"]["RANK"]) for r in got) == [0, 1, 2, 3]
    assert sorted(r["env"]["GROUP_RANK"] for r in got) == ["0", "0", "1", "1"]  # torchrun's node rank
    image_dir = dict(e.split("=", 1) for e in os.environ["GLMSNAKE_TEST_IMAGES"].split(","))[IMAGE]
    assert all(r["python"].startswith(image_dir) and r["cwd"] == str(slime) for r in got), got
    calls = [c for c in shim_log.read_text().splitlines() if " apptainer " in c]
    assert len(calls) == 2 and all(str(wf.paths.task_runtime) in c for c in calls), calls  # one task per node
    assert sorted(c.split()[0] for c in calls) == ["node1", "node2"]


def test_the_oldest_supported_ray_runs_the_launcher(slurm_cluster, container_images, tmp_path, monkeypatch):
    """A Ray job in an image with the oldest Ray the launcher supports (slime's ROCm images pin it): the
    head comes up with the launcher's flags, its GCS client polls the nodes, the driver runs through the
    Jobs SDK; that Ray has no token authentication, and the log says so.

    One node: a Ray this old ignores `--temp-dir` on worker nodes (they use the head's folder name),
    which on a real cluster is another host's /tmp but here is the same host, where two raylets in one
    folder collide. The worker's join is the same `ray start` with `--address`."""
    import functools

    from conftest import skip_or_fail
    from glmsnake.launch import Allocation, run_ray_job
    from glmsnake.launch.driver import HEAD_ADDRESS, Driver, at_head
    from glmsnake.launch.ray_version import OLDEST
    from tests.container_image import IMAGE_OLDEST_RAY

    if IMAGE_OLDEST_RAY not in container_images["GLMSNAKE_TEST_IMAGES"]:
        skip_or_fail(f"no wheel of Ray {OLDEST} in .ci/cache (bash .ci/setup downloads it)")
    _shim(tmp_path, monkeypatch, "pyxis")
    _base(tmp_path).mkdir()
    cluster = Cluster(launcher="slurm", slurm=SlurmSettings(partition="debug"),
                      container=ContainerSettings(runtime="pyxis", image=IMAGE_OLDEST_RAY, mounts=(str(_base(tmp_path)),)))
    probe = ("import json, ray; ray.init(address='auto'); "
             "print('PROBE', json.dumps([ray.__version__, len([n for n in ray.nodes() if n['Alive']])]))")
    template = Driver(argv=["python3", "-c", probe], cwd=str(tmp_path),
                      env={"no_proxy": f"localhost,127.0.0.1,{HEAD_ADDRESS}"})
    log = tmp_path / "driver.log"
    job = JobSpec("oldest_ray", Allocation(nodes=1, gpus_per_node=8, cpus_per_task=1, time_min=20), _base(tmp_path) / "logs")
    r = run_ray_job(cluster, job, functools.partial(at_head, template), log, object_store_mb=128)
    text = log.read_text()
    assert r.exit_code == 0, text[-3000:]
    assert f'PROBE ["{OLDEST}", 1]' in text and r.gpus == 8, text[-3000:]
    errs = sorted((_base(tmp_path) / "logs" / "submitit").glob("*/*_log.err"))
    assert len(errs) == 1 and f"{IMAGE_OLDEST_RAY} has Ray {OLDEST}, which has no token authentication" in \
        errs[0].read_text()


def test_a_container_task_is_requeued_by_the_submitting_side(slurm_cluster, container_images, tmp_path, monkeypatch):
    """USR2 (time limit near, preemption) to a checkpointable job in the image, which has no
    scontrol: rank 0 leaves a request in the job folder, the waiting side requeues the job, and
    the second attempt's result comes back."""
    import subprocess
    import threading
    import time

    _shim(tmp_path, monkeypatch, "pyxis")
    cluster = _cluster(tmp_path, "pyxis")
    out: dict = {}
    cloudpickle.register_pickle_by_value(helpers)
    try:
        t = threading.Thread(target=lambda: out.update(rec=run_job(
            cluster, JobSpec("rq_box", CONVERT_ALLOCATION, _base(tmp_path) / "logs"), helpers.sleep_unless_requeued,
            max_requeues=1)), daemon=True)
        t.start()
        deadline, job_id = time.time() + 60, None
        while time.time() < deadline and not job_id:
            q = subprocess.run(["squeue", "-h", "-n", "rq_box", "-o", "%i %T"], capture_output=True, text=True).stdout.split()
            job_id = q[0] if q[1:2] == ["RUNNING"] and list((_base(tmp_path) / "logs" / "submitit").glob(
                "*/glmsnake.rendezvous.json")) else None
            time.sleep(0.3)
        assert job_id, "the job did not start"
        time.sleep(2)
        subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
        deadline = time.time() + 60
        while time.time() < deadline:
            info = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout
            if "Restarts=1" in info and "JobState=PENDING" in info:
                slurm_cluster.wait_idle(timeout=60)
                subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True)
                break
            time.sleep(0.3)
        else:
            pytest.fail(f"job {job_id} was not requeued: {info}")
        t.join(timeout=120)
    finally:
        cloudpickle.unregister_pickle_by_value(helpers)
    rec = out["rec"]
    assert rec.attempts == 2 and rec.results == [1, 1]
    folder = _base(tmp_path) / "logs" / "submitit" / job_id
    assert (folder / "glmsnake.requeue.0.json").is_file()
    assert "no scontrol here; asked the submitting side to requeue it" in (folder / f"{job_id}_0_log.err").read_text()
