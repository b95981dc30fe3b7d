"""The task runtime: what a task inside slime's container imports beyond the image.

The container is emulated (tests/container_image.py): the image's own python3 with Ray,
torch and pydantic but neither submitit nor glmsnake, in a mount namespace where the host
venv and this repository are hidden. Tasks start there through submitit, as on the cluster.
"""

from __future__ import annotations

import functools
import json
import shlex
import subprocess
import sys
from pathlib import Path

import cloudpickle
import pytest
import submitit

from container_image import ENTER, IMAGE, IMAGE_WITHOUT_RAY
from glmsnake import REPO_ROOT, recipe, resolve
from glmsnake.convert import torch_dist as td
from glmsnake.launch import task_runtime
from glmsnake.launch.ray_cluster import RayTaskFn
from glmsnake.launch.ray_spec import RaySpec
from glmsnake.launch.task import Task
from glmsnake.convert.megatron_names import LAYOUTS
from glmsnake.steps.convert import slime_converter
from glmsnake.steps.export import SlimeExporter
from glmsnake.trainer import process

import task_probe


HOST_ONLY = {"pydantic", "pydantic_core", "yaml", "snakemake", "rich", "huggingface_hub", "matplotlib",
             "jsonschema", "wandb", "tensorboard"}


def _in_image(image: str, runtime: Path, folder: Path) -> submitit.LocalExecutor:
    """submitit's executor whose tasks start in the emulated `image` from `runtime`, as on the cluster."""
    python = f"{shlex.quote(str(ENTER))} {shlex.quote(image)} '' -- {task_runtime.boot_command(runtime, image)}"
    ex = submitit.LocalExecutor(folder=folder, python=python)
    ex.update_parameters(timeout_min=5)
    return ex


def test_the_runtime_is_pure_python_versioned_and_written_once(tmp_path):
    rt = task_runtime.ensure(tmp_path / "rt")
    assert sorted(p.name for p in rt.iterdir()) == [".complete", "cloudpickle", "fallback", "glmsnake", "submitit"]
    assert (rt / "fallback" / "typing_extensions.py").is_file()  # last on sys.path: the image's own wins
    assert (rt / task_runtime.BOOT).is_file() and (rt / "glmsnake" / "launch" / "_ray_site").is_dir()
    assert not [p for p in rt.rglob("*") if p.suffix in (".so", ".pyc") or p.name == "__pycache__"]
    stamp = (rt / ".complete").stat().st_mtime_ns
    assert task_runtime.ensure(tmp_path / "rt") == rt  # reused, not rewritten
    assert (rt / ".complete").stat().st_mtime_ns == stamp
    assert [p.name for p in (tmp_path / "rt").iterdir()] == [rt.name]  # no temporary left
    # The name follows the content: a changed file is a new runtime.
    files = task_runtime._files()
    changed = tmp_path / "changed.py"
    changed.write_bytes(files[0][0].read_bytes() + b"\n# changed\n")
    assert task_runtime.version([(changed, files[0][1]), *files[1:]]) != rt.name == task_runtime.version(files)


def test_the_emulated_image_has_none_of_our_packages(container_images):
    """The emulation bites: without the runtime, the task's first import fails as on a real cluster."""
    r = subprocess.run([str(ENTER), IMAGE, "", "--", "python3", "-u", "-m", "submitit.core._submit", "/nowhere"],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "No module named 'submitit'" in r.stderr, r.stderr
    probe = ("import json, os, sys, importlib.util as u, ray, torch, pydantic; "
             f"print(json.dumps([[m for m in ('glmsnake', 'cloudpickle') if u.find_spec(m)], os.listdir({str(REPO_ROOT)!r}), sys.prefix]))")
    r = subprocess.run([str(ENTER), IMAGE, "", "--", "python3", "-c", probe], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    ours, repo_listing, prefix = json.loads(r.stdout)
    assert ours == [] and repo_listing == [] and prefix != sys.prefix  # the repository hidden, another Python


def test_tasks_as_the_steps_build_them_run_in_the_image(container_images, tiny_hf, tmp_path):
    """Every task object a step pickles loads in the image from the runtime, without pydantic,
    and the slime driver is plain data the head completes with its address."""
    wf = resolve.load({"base_dir": str(tmp_path / "base"), "launcher": "slurm", "preset": "glm4.7-355b-64xh100",
                       "overrides": {"container": {"runtime": "pyxis", "image": IMAGE}}})
    tiny = resolve.load({"base_dir": str(tmp_path / "tiny")})
    spec = RaySpec(nodes=8, gpus_per_node=8, driver_factory=recipe.driver_factory(wf, "default", "ib0"),
                   log_path=str(tmp_path / "driver.log"))
    blobs = {
        "ray_task": RayTaskFn(spec),
        "local_trainer_driver": RayTaskFn(RaySpec(nodes=1, gpus_per_node=0, log_path="x",
                                                  driver_factory=functools.partial(process.driver_command, "/s.json"))),
        "writer": td.WriterTask(td.plan_conversion(tiny_hf, tiny.preset.model, LAYOUTS["local"]), str(tmp_path / "o")),
        "slime_converter": slime_converter(wf, tmp_path / "stage"),
        "slime_exporter": SlimeExporter(iteration_dir="/c/iter_0000002", output_dir="/o", origin_hf_dir="/h",
                                        vocab_size=151552, slime_dir="/root/slime", megatron_dir="/root/Megatron-LM"),
    }
    blobs = {k: cloudpickle.dumps(v) for k, v in blobs.items()}
    rt = task_runtime.ensure(tmp_path / "task-runtime")
    cloudpickle.register_pickle_by_value(task_probe)
    try:
        job = _in_image(IMAGE, rt, tmp_path / "sub").submit(task_probe.unpickle_and_report, blobs, "10.1.2.3")
        out = job.result()
    finally:
        cloudpickle.unregister_pickle_by_value(task_probe)
    assert out["loaded"] == {"ray_task": "RayTaskFn", "local_trainer_driver": "RayTaskFn", "writer": "WriterTask",
                             "slime_converter": "SlimeConverter", "slime_exporter": "SlimeExporter"}
    assert out["pydantic_imported"] is False
    # Nothing that only our venv has: configuration, workflow and console packages stay on the host.
    assert not set(out["imported"]) & HOST_ONLY, sorted(set(out["imported"]) & HOST_ONLY)
    assert out["glmsnake_file"] == str(rt / "glmsnake" / "__init__.py")
    assert out["executable"].startswith(container_images["GLMSNAKE_TEST_IMAGES"].split(",")[0].split("=", 1)[1])
    assert out["image"] == IMAGE
    assert out["driver_master_addr"] == "10.1.2.3" and "10.1.2.3" in out["driver_no_proxy"].split(",")


def test_an_image_without_ray_is_named_before_anything_starts(container_images, tmp_path):
    rt = task_runtime.ensure(tmp_path / "task-runtime")
    spec = RaySpec(nodes=1, gpus_per_node=0, driver_factory=functools.partial(process.driver_command, "/s.json"), log_path="x")
    job = _in_image(IMAGE_WITHOUT_RAY, rt, tmp_path / "sub").submit(Task(RayTaskFn(spec), "local", 1, None))
    with pytest.raises(submitit.core.utils.FailedJobError) as e:
        job.result()
    assert f"{IMAGE_WITHOUT_RAY} (python3 {sys.version.split()[0]}) has no ray; this task needs it" in str(e.value)
    assert "use an image that has it" in str(e.value)
    assert not list((tmp_path / "sub").glob("ray*"))  # no Ray was started


def test_a_damaged_runtime_is_written_again_and_a_racing_one_reused(tmp_path):
    """A scratch purge took a file: the next submission writes the runtime again (the damaged folder
    is set aside, never deleted under running jobs); no temporary folder is left."""
    rt = task_runtime.ensure(tmp_path / "rt")
    (rt / "submitit" / "__init__.py").unlink()
    again = task_runtime.ensure(tmp_path / "rt")
    assert again == rt and (rt / "submitit" / "__init__.py").is_file()
    hidden = sorted(p.name for p in (tmp_path / "rt").iterdir() if p.name.startswith("."))
    assert len(hidden) == 1 and ".damaged." in hidden[0]  # the damaged copy, aside


def test_a_folder_outside_the_containers_mounts_is_refused(tmp_path):
    from glmsnake.errors import GlmsnakeError
    from glmsnake.launch.executors import require_mounted
    from glmsnake.launch.spec import ContainerSettings

    c = ContainerSettings(runtime="apptainer", image=IMAGE, mounts=(str(tmp_path / "base"), "/data:/mnt/data"))
    require_mounted(c, tmp_path / "base" / "logs" / "submitit", "the job folder")  # under a mount: fine
    for path in (tmp_path / "elsewhere", Path("/data/x")):  # not mounted; mounted at another place
        with pytest.raises(GlmsnakeError, match=r"(?s)is not inside the container .*fix: keep it under base_dir"):
            require_mounted(c, path, "the job folder")
    require_mounted(ContainerSettings(runtime="pyxis", image=IMAGE), Path.home() / "x", "the job folder")  # $HOME


def test_ray_versions_the_launcher_accepts():
    from glmsnake.errors import GlmsnakeError
    from glmsnake.launch.ray_version import OLDEST, parse, token_auth_available

    assert parse("2.52.0rc1") == (2, 52, 0) and parse("2.47.0rc2") < parse(OLDEST) and parse("3") == (3, 0, 0)
    assert token_auth_available("2.60.0") and token_auth_available("2.52.0")
    assert not token_auth_available("2.51.2") and not token_auth_available(OLDEST)
    with pytest.raises(GlmsnakeError, match=f"has Ray 2.46.0; glmsnake's launcher needs Ray {OLDEST} or newer"):
        token_auth_available("2.46.0")
