"""Teardown finds a node's Ray processes by the job mark in their environment, even after
Ray renames them (setproctitle may overwrite the environment block /proc shows)."""

from __future__ import annotations

import subprocess
import sys

from glmsnake import knobs
from glmsnake.launch.environment import ray_env
from glmsnake.launch.ray_processes import marked_processes

RENAME_AND_WAIT = (
    "import time, ray._raylet\n"
    "ray._raylet.setproctitle('ray::DashboardAgent' + ' ' * 400)\n"  # longer than argv: spills into environ
    "print('renamed', flush=True)\n"
    "time.sleep(60)\n"
)


def test_renamed_ray_process_keeps_its_job_mark():
    env = ray_env("127.0.0.1", {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "t"}, {knobs.RAY_JOB.name: "424242n3"})
    proc = subprocess.Popen([sys.executable, "-c", RENAME_AND_WAIT], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "renamed"
        title = open(f"/proc/{proc.pid}/cmdline", "rb").read()
        assert title.startswith(b"ray::DashboardAgent"), title[:80]
        assert proc.pid in marked_processes("424242n3")
        assert proc.pid in marked_processes()
        assert proc.pid not in marked_processes("424242n4")
    finally:
        proc.kill()
        proc.wait()
    # Reaped: no longer a live process of the job.
    assert proc.pid not in marked_processes("424242n3")
