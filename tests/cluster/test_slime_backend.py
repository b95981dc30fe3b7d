"""The slime backend's contract, on the loopback Slurm cluster, with a stand-in train.py.

The 64xH100 preset's recipe (8 nodes x 8 GPUs, its argument groups) goes through the real
launcher (`run_ray_job`: submitit -> Ray across 8 Slurm nodes -> Jobs SDK) to
tests/cluster/slime_stub/train.py copied into a temporary slime_dir. Only the allocation's
CPUs are lowered to what the test nodes have. The preset's container (pyxis) is the test
stand-in (container_shims/pyxis): every task runs inside an emulated image that has Ray but
neither glmsnake nor submitit, from the task runtime the launcher ships.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
from pathlib import Path

import pytest

from glmsnake import config, recipe, resolve, retention
from glmsnake.recipe.command import wandb_run_id
from glmsnake.launch import Allocation, Cluster, ContainerSettings, JobSpec, SlurmSettings, run_ray_job
from tests.container_image import IMAGE

pytestmark = pytest.mark.slurm
STUB = Path(__file__).resolve().parent / "slime_stub" / "train.py"
DUMMY_KEY = "wandb-dummy-key-3f9a1c7e5b2d4a60"
PYXIS = Path(__file__).resolve().parent / "container_shims" / "pyxis"


def _wf(tmp_path: Path, **run_overrides) -> config.Workflow:
    slime, megatron = tmp_path / "slime", tmp_path / "Megatron-LM"
    slime.mkdir(exist_ok=True)
    megatron.mkdir(exist_ok=True)
    shutil.copy(STUB, slime / "train.py")
    run = {
        "train": {"slime_dir": str(slime), "megatron_dir": str(megatron), "save_interval": 2,
                  "allocation": {"cpus_per_task": 1, "exclusive": False, "time_min": 30, "min_time_min": 2}},
        "rollout": {"num_rollout": 6},
    }
    for k, v in run_overrides.items():
        run[k] = {**run.get(k, {}), **v}
    return resolve.load({"base_dir": str(tmp_path / "base"), "launcher": "slurm", "preset": "glm4.7-355b-64xh100",
                         "slurm": {"partition": "debug"}, "runs": {"default": run},
                         "overrides": {"container": {"runtime": "pyxis", "image": IMAGE}}})


def _launch(wf: config.Workflow, allocation: config.Allocation, name: str, log_dir: Path) -> tuple[Cluster, JobSpec]:
    """What the train step gives the launcher for this workflow: Slurm's debug partition, the image
    through pyxis with base_dir mounted, the task runtime under base_dir."""
    a = Allocation(nodes=allocation.nodes, gpus_per_node=allocation.gpus_per_node,
                   cpus_per_task=allocation.cpus_per_task, mem_gb=allocation.mem_gb, time_min=allocation.time_min,
                   exclusive=allocation.exclusive)
    cluster = Cluster(launcher="slurm", slurm=SlurmSettings(partition="debug"),
                      container=ContainerSettings(runtime="pyxis", image=IMAGE, mounts=(str(wf.base),),
                                                  task_runtime=str(wf.paths.task_runtime)))
    return cluster, JobSpec(name, a, log_dir)


def test_slime_driver_contract_on_8_nodes(slurm_cluster, container_images, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", f"{PYXIS}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("GLMSNAKE_SHIM_LOG", str(tmp_path / "shim.log"))
    # A proxy in the submitting environment must not reach the driver.
    for k in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(k, "http://127.0.0.1:9")
    # A W&B key in the submitting environment reaches slime on every node, and no file.
    monkeypatch.setenv("WANDB_API_KEY", DUMMY_KEY)
    # MTP training on (the script leaves it off): every argument group, MTP_ARGS included, reaches train.py.
    wf = _wf(tmp_path, tracking={"use_wandb": True, "wandb_project": "glm", "use_tensorboard": True},
             features={"mtp_training": True})
    run = wf.runs["default"]
    assert run.train.backend == "slime" and run.train.allocation.nodes == 8 and run.train.allocation.gpus_per_node == 8
    log = tmp_path / "train.log"
    factory = recipe.driver_factory(wf, "default", interface="lo")
    paths = wf.paths.run("default")
    # Checkpoint retention as the train step runs it around the job, from glmsnake's side: slime is unmodified.
    with retention.Pruner(paths.checkpoints, retention.Policy(last=2), paths.pruned, paths.disk_warning, 0.05):
        r = run_ray_job(*_launch(wf, run.train.allocation, "train_default", wf.base / "logs"), factory, log,
                        object_store_mb=128)
    text = log.read_text()
    assert r.exit_code == 0, text[-3000:]
    assert r.nodes == [f"node{k}" for k in range(1, 9)] and r.gpus == 64

    rec = json.loads((wf.paths.run("default").root / "slime_stub_record.json").read_text())
    head = rec["env"]["MASTER_ADDR"]
    want = recipe.driver(wf, "default", head, interface="lo")
    # The whole command line: what the Jobs SDK ran, and what train.py received.
    m = re.search(r"submitted to http://\S+: (.*)$", text, re.M)
    # The logged entrypoint, split as a shell splits it, is what train.py received.
    assert m and shlex.split(m.group(1)) == ["cd", str(run.train.slime_dir), "&&", "exec", "python3", "train.py",
                                             *rec["argv"]]
    assert rec["argv0"] == "train.py" and rec["argv"] == want.argv[2:]
    argv = rec["argv"]
    assert argv[:5] == ["--actor-num-nodes", "8", "--actor-num-gpus-per-node", "8", "--colocate"]
    # Every argument group, in the order of slime's script: each group's first flag, in turn.
    firsts = ["--disable-bias-linear", "--hf-checkpoint", "--prompt-data", "--eval-interval",
              "--tensor-model-parallel-size", "--advantage-estimator", "--optimizer", "--rollout-num-gpus-per-engine",
              "--enable-mtp-training", "--attention-dropout"]
    assert [argv.index(f) for f in firsts] == sorted(argv.index(f) for f in firsts)
    assert argv[5] == firsts[0] and argv[argv.index("--moe-enable-deepep") + 1] == "--use-wandb"
    # W&B and TensorBoard: one W&B run for every attempt, both writing into the run folder.
    run_id = wandb_run_id(wf, "default")
    for flag, value in [("--wandb-project", "glm"), ("--wandb-group", "default"), ("--wandb-run-id", run_id),
                        ("--wandb-dir", str(paths.wandb)), ("--tb-experiment-name", "default")]:
        assert argv[argv.index(flag) + 1] == value, flag
    assert "--disable-wandb-random-suffix" in argv and "--use-tensorboard" in argv
    assert rec["env"]["WANDB_RUN_ID"] == run_id and rec["env"]["WANDB_RESUME"] == "allow"
    assert rec["env"]["TENSORBOARD_DIR"] == str(paths.tensorboard)
    digest = hashlib.sha256(DUMMY_KEY.encode()).hexdigest()[:16]
    assert rec["wandb_key_digest"] == {"driver": digest, "nodes": [digest], "probed": 8}  # the driver and all 8 nodes
    leaks = [str(p) for root in (wf.base, tmp_path) for p in root.rglob("*")
             if p.is_file() and DUMMY_KEY.encode() in p.read_bytes()]
    assert not leaks and DUMMY_KEY not in recipe.render_text(wf, "default") and DUMMY_KEY not in " ".join(want.argv)
    for flag, value in [("--num-layers", "92"), ("--hidden-size", "5120"), ("--num-experts", "160"),
                        ("--tensor-model-parallel-size", "8"), ("--pipeline-model-parallel-size", "4"),
                        ("--expert-model-parallel-size", "16"), ("--rollout-batch-size", "128"),
                        ("--ref-load", str(wf.paths.torch_dist_dir)), ("--hf-checkpoint", str(wf.paths.hf_dir)),
                        ("--load", str(wf.paths.run("default").root / "checkpoints")),
                        ("--save", str(wf.paths.run("default").root / "checkpoints")), ("--save-interval", "2")]:
        assert argv[argv.index(flag) + 1] == value, flag
    # The driver's runtime env.
    env = rec["env"]
    assert head == "127.0.0.11" and rec["ray"]["node_ips"][0] == head
    assert {env[k] for k in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY")} == {None}
    assert set(env["no_proxy"].split(",")) >= {"localhost", "127.0.0.1", head}
    assert env["GLOO_SOCKET_IFNAME"] == env["TP_SOCKET_IFNAME"] == env["NCCL_SOCKET_IFNAME"] == "lo"
    assert env["CUDA_DEVICE_MAX_CONNECTIONS"] == "1" and env["NVSHMEM_DISABLE_NCCL"] == "1"
    assert env["NCCL_NVLS_ENABLE"] == "0"
    assert str(run.train.megatron_dir) in env["PYTHONPATH"].split(":")
    assert rec["cwd"] == str(run.train.slime_dir)
    # The Ray cluster it saw: all 8 nodes and 64 GPUs.
    assert rec["ray"]["nodes"] == 8 and rec["ray"]["gpus"] == 64
    assert rec["ray"]["node_ips"] == [f"127.0.0.{10 + k}" for k in range(1, 9)]
    # Megatron's checkpoint layout (iteration = rollout id; every save_interval and the last), the
    # oldest pruned: slime saved 1, 3 and 5, and retention keeps the last 2.
    ck = wf.paths.run("default").root / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == ["iter_0000003", "iter_0000005", "latest_checkpointed_iteration.txt"]
    assert [json.loads(line)["iteration"] for line in paths.pruned.read_text().splitlines()] == [1]
    assert (ck / "latest_checkpointed_iteration.txt").read_text() == "5"
    assert rec["start_rollout_id"] == 0
    # In the image: the driver ran its python3, and the batch script's one srun went through pyxis.
    image_dir = dict(e.split("=", 1) for e in container_images["GLMSNAKE_TEST_IMAGES"].split(","))[IMAGE]
    assert rec["python"].startswith(image_dir), rec["python"]
    calls = [c for c in (tmp_path / "shim.log").read_text().splitlines() if " srun " in c]
    assert len(calls) == 1 and f"--container-image={IMAGE}" in calls[0] and "container_boot.py" in calls[0], calls
