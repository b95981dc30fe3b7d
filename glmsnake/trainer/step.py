"""The `train` step: the run's allocation, Ray across it, then slime or the local trainer.

- backend `local`: the driver is `python -m glmsnake.trainer.driver --settings <run>/trainer_settings.json`
  (this repository on PYTHONPATH); backend `slime`: slime's train.py (glmsnake.recipe.driver).
- launcher `slurm`: glmsnake.launch.ray_cluster.run_ray_job allocates the nodes, starts Ray
  across them and submits the driver through the Jobs SDK. launcher `local` (one machine):
  the local backend's driver runs as a child process with a private Ray on a loopback address.
- Every attempt resumes from the run's latest complete checkpoint (the driver does it).
  The sentinel is written only when the checkpoint of the last rollout exists.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from glmsnake.atomic import write_bytes, write_sentinel
from glmsnake.config import REPO_ROOT, Workflow
from glmsnake.errors import GlmsnakeError
from glmsnake.trainer import checkpoints, metrics
from glmsnake.trainer.settings import SETTINGS_NAME, TrainerSettings, from_workflow

PROXY_VARS = ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY")


@dataclass(frozen=True)
class LocalDriver:
    """The local backend's Ray job: argv, cwd, env (the shape of glmsnake.recipe.Driver)."""

    argv: list[str]
    cwd: str
    env: dict[str, str]


def local_driver(settings_path: str, head_address: str | None = None) -> LocalDriver:
    env = {"PYTHONPATH": str(REPO_ROOT), "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    if head_address:
        env["no_proxy"] = env["NO_PROXY"] = f"localhost,127.0.0.1,{head_address}"
    return LocalDriver(argv=[sys.executable, "-m", "glmsnake.trainer.driver", "--settings", settings_path],
                       cwd=str(REPO_ROOT), env=env)


def write_settings(wf: Workflow, run: str) -> tuple[TrainerSettings, Path]:
    settings = from_workflow(wf, run)
    path = wf.run_dir(run) / SETTINGS_NAME
    write_bytes(path, settings.to_json().encode())
    return settings, path


def run_local_driver(driver: LocalDriver, log=sys.stdout) -> int:
    """The driver as a child of this step (its own session, so an interrupt stops all of it)."""
    env = {k: v for k, v in os.environ.items() if k not in PROXY_VARS and k != "RAY_ADDRESS"}
    env.update(driver.env)
    old = os.environ.get("PYTHONPATH")
    if old:
        env["PYTHONPATH"] = driver.env["PYTHONPATH"] + os.pathsep + old
    proc = subprocess.Popen(driver.argv, cwd=driver.cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        return proc.wait()
    except BaseException:
        import signal

        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        raise


def versions(run_backend: str, slime_dir: str | None) -> dict[str, str]:
    out = {}
    for mod in ("torch", "transformers", "ray", "submitit", "glmsnake"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - a missing package is recorded as such
            out[mod] = "missing"
    if run_backend == "slime" and slime_dir:
        try:
            out["slime_git"] = subprocess.run(["git", "-C", slime_dir, "rev-parse", "HEAD"], capture_output=True,
                                              text=True, timeout=10).stdout.strip() or "unknown"
        except (OSError, subprocess.TimeoutExpired):
            out["slime_git"] = "unknown"
    return out


def max_requeues() -> int:
    """How often a training job that reaches its time limit is requeued (GLMSNAKE_TRAIN_MAX_REQUEUES, 3)."""
    return int(os.environ.get("GLMSNAKE_TRAIN_MAX_REQUEUES", "3"))


def step(wf: Workflow, sentinel: Path, run: str) -> None:
    from glmsnake import recipe, staleness

    r = wf.runs[run]
    t0 = time.monotonic()
    settings, settings_path = write_settings(wf, run)
    ckroot = Path(settings.checkpoint_dir)
    before = checkpoints.iterations(ckroot)
    print(f"[glmsnake] train {run}: backend {r.train.backend}, launcher {wf.user.launcher}, "
          f"checkpoints before this attempt: {before}", flush=True)
    job: dict[str, Any] = {}
    if wf.user.launcher == "slurm":
        from glmsnake.launch.ray_cluster import run_ray_job

        if r.train.backend == "local":
            factory = functools.partial(local_driver, str(settings_path))
        else:
            factory = functools.partial(recipe.driver, wf, run, interface=wf.user.slurm.network_interface)
        # Checkpointable: Slurm's USR2 before the time limit, or a preemption, requeues the job
        # and the driver resumes from the latest checkpoint by itself (max_requeues bounds
        # the time-limit requeues).
        # The driver's output streams into this step's stdout, i.e. the rule's log.
        res = run_ray_job(wf, r.train.allocation, factory, f"train_{run}", wf.base / "logs" / f"train_{run}",
                          max_requeues=max_requeues(), echo_to=sys.stdout.buffer)
        job = {"slurm_job_id": res.slurm_job_id, "ray_job_id": res.job_id, "nodes": res.nodes,
               "gpus": res.gpus, "timings": res.timings, "status": res.status, "attempts": res.attempts}
        rc = res.exit_code
    else:
        if r.train.backend != "local":
            raise GlmsnakeError(f"run {run}: backend slime needs the GPU cluster (launcher: slurm)",
                                "use launcher: slurm, or train.backend: local on one machine")
        rc = run_local_driver(local_driver(str(settings_path)))
        job = {"nodes": [os.uname().nodename]}
    if rc != 0:
        raise GlmsnakeError(f"training driver of run {run} exited with {rc}",
                            f"read the step log; rerunning resumes from the latest checkpoint in {ckroot}")
    final = checkpoints.latest(ckroot) if r.train.backend == "local" else _tracker_iteration(ckroot)
    want = r.rollout.num_rollout - 1
    if final is None or final < want:
        raise GlmsnakeError(f"run {run}: training ended at checkpoint {final}, expected iteration {want}",
                            "rerun the step; it resumes from that checkpoint")
    records = metrics.read(settings.metrics_path)
    if records:
        metrics.plot(records, settings.plot_path, run)
    write_sentinel(
        sentinel, step="train", settings=staleness.train(wf, run),
        backend=r.train.backend, config_hash=wf.config_hash(run), final_iteration=final,
        checkpoints=checkpoints.iterations(ckroot) if r.train.backend == "local" else [final],
        checkpoint_dir=str(ckroot), metrics=str(settings.metrics_path), plot=str(settings.plot_path),
        metrics_summary=metrics.summary(records), versions=versions(r.train.backend, r.train.slime_dir),
        job=job, seconds=round(time.monotonic() - t0, 3),
    )


def _tracker_iteration(root: Path) -> int | None:
    from glmsnake.convert.torch_dist import TRACKER_NAME

    p = root / TRACKER_NAME
    if not p.is_file():
        return None
    text = p.read_text().strip()
    return int(text) if text.isdigit() else None
