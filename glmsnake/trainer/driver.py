"""The local backend's Ray job entry point: `python -m glmsnake.trainer.driver --settings FILE`.

Submitted through Ray's Jobs SDK by the launcher (RAY_ADDRESS is set: it joins that
cluster), or run directly, when it starts a private single-node Ray on a loopback
address (tests, benchmark). Exit code 0 only when the checkpoint of the last rollout
(iteration num_rollout - 1) exists; the
summary is printed as the last line, prefixed `GLMSNAKE_SUMMARY `.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from glmsnake import knobs

SUMMARY_PREFIX = "GLMSNAKE_SUMMARY "


def init_ray(address: str | None, num_cpus: int | None = None) -> None:
    import ray

    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    # A private cluster on this machine: its node address is a loopback one that Ray keeps as
    # given (127.0.0.1 would be mapped to the interface address), one per process so that two
    # runs trained at once never share a GCS address; no dashboard. Ray 2.60's C++ servers (GCS,
    # raylet, workers) still listen on every address of the host; token auth guards them (README).
    ray.init(num_cpus=num_cpus or max(2, os.cpu_count() or 2), include_dashboard=False,
             _node_ip_address=knobs.LOCAL_RAY_IP.raw() or local_ray_ip(os.getpid()),
             _temp_dir=local_ray_tmp())


def local_ray_ip(pid: int) -> str:
    return f"127.77.{(pid >> 8) & 255}.{(pid & 255) or 1}"


def local_ray_tmp() -> str:
    # Short: Ray's unix socket paths must stay under 107 bytes.
    return knobs.LOCAL_RAY_TMP.raw() or f"/tmp/gsray{os.getpid()}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="glmsnake.trainer.driver")
    p.add_argument("--settings", required=True, help="trainer_settings.json written by the train step")
    p.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS, else a private local Ray)")
    p.add_argument("--num-cpus", type=int, default=None)
    args = p.parse_args(argv)
    from glmsnake.trainer.loop import Loop
    from glmsnake.trainer.settings import TrainerSettings

    settings = TrainerSettings.from_json(Path(args.settings).read_text())
    private = not (args.address or os.environ.get("RAY_ADDRESS"))
    init_ray(args.address, args.num_cpus)
    import ray

    ok = False
    try:
        summary = Loop(settings, log=lambda m: print(m, flush=True)).run()
        ok = summary.get("final_iteration") == settings.rollout.num_rollout - 1
    finally:
        ray.shutdown()
        if private:
            remove_private_ray(None if ok else settings.paths.attempt_logs / f"ray-{os.getpid()}")
    print(SUMMARY_PREFIX + json.dumps(summary, sort_keys=True), flush=True)
    return 0 if ok else 1


def remove_private_ray(keep_logs_in: Path | None) -> None:
    """The private Ray's temp folder goes; after a failure its logs are kept in the run's log folder first."""
    import shutil

    tmp = Path(local_ray_tmp())
    logs = tmp / "session_latest" / "logs"
    if keep_logs_in is not None and logs.is_dir():
        shutil.copytree(logs, keep_logs_in, dirs_exist_ok=True, ignore_dangling_symlinks=True)
        print(f"[trainer] Ray's logs of this attempt: {keep_logs_in}", flush=True)
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
