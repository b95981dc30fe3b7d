"""How the local trainer's driver is started: as a Ray job's command, or as a child process.

`driver_command` is what the launcher submits through Ray's Jobs SDK on a Slurm allocation;
`run_child` runs the same command on this machine (launcher `local`), where the driver starts
a private Ray of its own. The child gets its own session, so an interrupt stops all of it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from glmsnake.launch.driver import Driver
from glmsnake import REPO_ROOT

PROXY_VARS = ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY")


def driver_command(settings_path: str, head_address: str | None = None) -> Driver:
    """`python -m glmsnake.trainer.driver --settings FILE`, with this repository on PYTHONPATH."""
    env = {"PYTHONPATH": str(REPO_ROOT), "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    if head_address:
        env["no_proxy"] = env["NO_PROXY"] = f"localhost,127.0.0.1,{head_address}"
    return Driver(argv=[sys.executable, "-m", "glmsnake.trainer.driver", "--settings", settings_path],
                  cwd=str(REPO_ROOT), env=env)


def run_child(driver: Driver, log=sys.stdout) -> int:
    """Run the driver as a child of this process; its exit code comes back."""
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
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        raise
