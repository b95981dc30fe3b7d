"""Rule train_run: the run's allocation, Ray across it, then slime or the local trainer.

- backend `local`: the driver is `python -m glmsnake.trainer.driver --settings <run>/trainer_settings.json`;
  backend `slime`: slime's train.py (glmsnake.recipe.driver).
- launcher `slurm`: glmsnake.launch.run_ray_job allocates the nodes, starts Ray across them and
  submits the driver through the Jobs SDK. launcher `local` (one machine): the local backend's
  driver runs as a child process with a private Ray on a loopback address.
- Every attempt resumes from the run's latest complete checkpoint (the driver does it).
  The sentinel is written only when the checkpoint of the last rollout exists.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from glmsnake import atomic, contents, disk, knobs, model_size, recipe, retention, staleness
from glmsnake.config import Workflow
from glmsnake.errors import GlmsnakeError
from glmsnake.launch import JobSpec, run_ray_job
from glmsnake.convert.torch_dist import iter_dir_name
from glmsnake.paths import TRACKER
from glmsnake.steps import lineage
from glmsnake.steps.common import allocation, check_hf_unchanged, cluster
from glmsnake.trainer import checkpoints, metrics, process
from glmsnake.trainer.settings import TrainerSettings


def trainer_settings(wf: Workflow, run_name: str) -> TrainerSettings:
    """The local trainer's record of one run: its typed argument groups and its paths."""
    run, paths = wf.runs[run_name], wf.paths
    return TrainerSettings(
        run=run_name,
        run_dir=str(paths.run(run_name).root),
        hf_dir=str(paths.hf_dir),
        torch_dist_dir=str(paths.torch_dist_dir),
        prompt_data=str(paths.dataset(wf.preset.prompt_dataset)),
        eval_data={n: str(paths.dataset(n)) for n in wf.preset.eval_datasets},
        rollout=run.rollout, eval=run.eval, grpo=run.grpo, optimizer=run.optimizer, perf=run.perf,
        save_interval=run.train.save_interval,
        seed=run.train.seed,
        tracking=run.tracking, wandb_run_id=recipe.command.wandb_run_id(wf, run_name),
    )


def write_settings(wf: Workflow, run: str) -> tuple[TrainerSettings, Path]:
    settings = trainer_settings(wf, run)
    path = wf.paths.run(run).trainer_settings
    atomic.write_bytes(path, settings.to_json().encode())
    return settings, path


def versions(run_backend: str, slime_dir: str | None) -> dict[str, str]:
    out = {}
    for dist in ("torch", "transformers", "ray", "submitit", "glmsnake"):
        try:  # from the installed metadata: importing transformers alone takes seconds
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "missing"
    if run_backend == "slime" and slime_dir:
        try:
            out["slime_git"] = subprocess.run(["git", "-C", slime_dir, "rev-parse", "HEAD"], capture_output=True,
                                              text=True, timeout=10).stdout.strip() or "unknown"
        except (OSError, subprocess.TimeoutExpired):
            out["slime_git"] = "unknown"
    return out


def train_run(wf: Workflow, sentinel: Path, run: str) -> None:
    r = wf.runs[run]
    t0 = time.monotonic()
    check_inputs_unchanged(wf, run)
    checkpoint_size = check_room_for_checkpoints(wf, run)
    key = staleness.train(wf, run)
    decision = lineage.prepare(wf.paths.run(run), key, r.train.on_change)
    moved = f"; the earlier checkpoints moved to {decision.moved_to}" if decision.moved_to else ""
    print(f"[glmsnake] train {run}: {decision.why}{moved}", flush=True)
    settings, settings_path = write_settings(wf, run)
    ckroot = settings.checkpoint_root
    damaged = checkpoints.set_aside_damaged(ckroot)
    for iteration, problems, dest in damaged:
        print(f"[glmsnake] train {run}: checkpoint {iteration} is damaged, moved to {dest}; resuming from the one "
              "before:\n    " + "\n    ".join(problems), flush=True)
    before = checkpoints.iterations(ckroot)
    resumed_from = (before[-1] if before else None) if r.train.backend == "local" else tracker_iteration(ckroot)
    print(f"[glmsnake] train {run}: backend {r.train.backend}, launcher {wf.user.launcher}, "
          f"checkpoints before this attempt: {before}", flush=True)
    job: dict[str, Any] = {}
    run_paths = settings.paths
    keep = r.train.keep_checkpoints
    pruner = retention.Pruner(ckroot, keep and retention.Policy(keep.last, keep.every), run_paths.pruned,
                              run_paths.disk_warning, knobs.PRUNE_INTERVAL_S.as_float(), log=_say)
    with pruner:  # prunes while the job runs, both backends; warns when two checkpoints no longer fit
        job, rc = _run_driver(wf, run, settings_path, checkpoint_size)
    if rc != 0:
        size, free = retention.checkpoint_bytes(ckroot) or checkpoint_size, disk.free_bytes(ckroot)
        if free < size:  # the likeliest cause, and resuming would fail the same way
            raise GlmsnakeError(f"training driver of run {run} exited with {rc}; a checkpoint takes {disk.human(size)}, "
                                f"and the file system of {ckroot} has {disk.human(free)} free", disk.FIX)
        raise GlmsnakeError(f"training driver of run {run} exited with {rc}",
                            f"read the step log; rerunning resumes from the latest checkpoint in {ckroot}")
    final = checkpoints.latest(ckroot) if r.train.backend == "local" else tracker_iteration(ckroot)
    want = r.rollout.num_rollout - 1
    if final is None or final < want:
        raise GlmsnakeError(f"run {run}: training ended at checkpoint {final}, expected iteration {want}",
                            "rerun the step; it resumes from that checkpoint")
    final_folder = ckroot / iter_dir_name(final)
    records = metrics.read(run_paths.metrics)
    if records and _older(run_paths.plot, run_paths.metrics):  # the local trainer drew it at its end
        metrics.plot(records, run_paths.plot, run)
    atomic.write_sentinel(
        sentinel, step="train", settings=key,
        backend=r.train.backend, config_hash=wf.config_hash(run), final_iteration=final,
        checkpoints=checkpoints.iterations(ckroot) if r.train.backend == "local" else [final],
        checkpoint_dir=str(ckroot), metrics=str(run_paths.metrics), plot=str(run_paths.plot),
        final_checkpoint=str(final_folder), final_checkpoint_contents=contents.record(final_folder),
        metrics_summary=metrics.summary(records), versions=versions(r.train.backend, r.train.slime_dir),
        job=job, seconds=round(time.monotonic() - t0, 3), checkpoint_bytes=checkpoint_size,
        pruned=retention.read_records(run_paths.pruned),
        # Which checkpoints the result came from: resumed (from which), or started afresh.
        lineage={"settings_hash": lineage.settings_hash(key), "resumed_from": resumed_from,
                 "decision": decision.why, "set_aside": str(decision.moved_to) if decision.moved_to else None,
                 "damaged_set_aside": [str(dest) for _, _, dest in damaged]},
    )


def _older(path: Path, than: Path) -> bool:
    try:
        return path.stat().st_mtime_ns < than.stat().st_mtime_ns
    except FileNotFoundError:
        return True


def _say(line: str) -> None:
    print(line, flush=True)


def _run_driver(wf: Workflow, run: str, settings_path: Path, checkpoint_size: int = 0) -> tuple[dict[str, Any], int]:
    """The training driver on the run's allocation (Slurm + Ray) or as a child process: (job record, exit code).

    Every node's preflight checks room for one checkpoint where it sees base_dir."""
    r = wf.runs[run]
    if wf.user.launcher == "slurm":
        if r.train.backend == "local":
            factory = functools.partial(process.driver_command, str(settings_path))
        else:
            factory = recipe.driver_factory(wf, run, interface=wf.user.slurm.network_interface)
        name = f"train_{run}"
        spec = JobSpec(name=name, allocation=allocation(r.train.allocation), log_dir=wf.paths.job_logs(name),
                       room_bytes=checkpoint_size)
        # Checkpointable: Slurm's USR2 before the time limit, or a preemption, requeues the job
        # and the driver resumes from the latest checkpoint by itself (max_requeues bounds
        # the time-limit requeues). The driver's output streams into this step's stdout, i.e. the rule's log.
        res = run_ray_job(cluster(wf), spec, factory, max_requeues=r.train.max_requeues, echo_to=sys.stdout.buffer)
        job = {"slurm_job_id": res.slurm_job_id, "ray_job_id": res.job_id, "nodes": res.nodes,
               "preflight_s": res.preflight.get("wall_s"), "nccl_nvls_enable": res.preflight.get("nvls"),
               "excluded": res.excluded, "retried": res.retried,
               "gpus": res.gpus, "timings": res.timings, "status": res.status, "attempts": res.attempts}
        return job, res.exit_code
    if r.train.backend != "local":
        raise GlmsnakeError(f"run {run}: backend slime needs the GPU cluster (launcher: slurm)",
                            "use launcher: slurm, or train.backend: local on one machine")
    return {"nodes": [os.uname().nodename]}, process.run_child(process.driver_command(str(settings_path)))


def check_room_for_checkpoints(wf: Workflow, run: str) -> int:
    """Before anything is allocated: room under the run folder for the checkpoints still to come, as
    many as retention holds at once (`last` kept plus the one being written; at least two, at most
    the saves left; milestones not counted). Their size: the tracker's checkpoint there, else the
    model's parameters with optimizer state. A finished run (only its sentinel missing) needs none.
    Returns that size."""
    r = wf.runs[run]
    root = wf.paths.run(run).checkpoints
    size = retention.checkpoint_bytes(root) or model_size.checkpoint_bytes(wf.preset.model)
    done = retention.read_tracker(root)
    n, every = r.rollout.num_rollout, r.train.save_interval
    saves_left = sum(1 for i in range(0 if done is None else done + 1, n) if (i + 1) % every == 0 or i == n - 1)
    keep = r.train.keep_checkpoints
    held = len(retention.present(root))
    count = min(saves_left, max(2, (keep.last + 1 - held) if keep else 2))
    if count:
        disk.require_room(root, count * size, f"training run {run} ({count} checkpoints of {disk.human(size)} "
                                              "with optimizer state)")
    return size


def check_inputs_unchanged(wf: Workflow, run: str) -> None:
    """What training reads still is what its producers recorded, before anything is allocated."""
    check_hf_unchanged(wf)
    paths = wf.paths
    sentinels = [(paths.torch_dist_dir, paths.torch_dist_sentinel, "convert_torch_dist")]
    if wf.runs[run].serves_fp8:
        sentinels.append((paths.fp8_dir, paths.fp8_sentinel, "convert_fp8"))
    for folder, sentinel, rule in sentinels:
        contents.require_unchanged(folder, contents.recorded_in(sentinel, "contents"), f"{folder}", rule)


def tracker_iteration(root: Path) -> int | None:
    """The iteration Megatron's tracker file names (slime's checkpoints), None when absent."""
    p = root / TRACKER
    if not p.is_file():
        return None
    text = p.read_text().strip()
    return int(text) if text.isdigit() else None
