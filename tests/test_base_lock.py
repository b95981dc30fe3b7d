"""One workflow per base_dir: a second one is refused, naming the holder; a dead holder's lock is taken over."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from conftest import REPO, snakemake

HOLDER = (
    "import sys, time; from glmsnake import base_lock\n"
    "base_lock.acquire(sys.argv[1]); print('held', flush=True); time.sleep(120)\n"
)


def test_a_second_workflow_is_refused_and_a_dead_holders_lock_is_taken_over(tmp_path):
    base = tmp_path / "results"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(base)], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "held"
        # Another clone (another working folder), the same base_dir.
        other = tmp_path / "clone2"
        out = snakemake(other, "--profile", str(REPO / "profiles/local"), "weights", "--config", f"base_dir={base}",
                        check=False)
        assert out.returncode != 0
        assert f"{base} is in use by another glmsnake workflow (host {os.uname().nodename}, pid {holder.pid}," in out.stdout
        assert "give this workflow its own base_dir" in out.stdout
        assert sorted(p.name for p in base.iterdir()) == [".glmsnake.lock"]  # nothing else was written
        # A dry run takes no lock: reviewing a plan never waits for a running workflow.
        assert snakemake(other, "-n", "weights", "--config", f"base_dir={base}").returncode == 0
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # The holder died without cleaning up; its lock file is still there, and the next workflow runs.
    snakemake(other, "--profile", str(REPO / "profiles/local"), "weights", "--config", f"base_dir={base}")
    assert (base / "tiny-glm4moe/glmsnake.manifest.json").is_file()
