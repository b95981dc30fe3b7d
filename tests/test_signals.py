"""signals.raise_once: the first SIGTERM unwinds, a second one cannot cut the cleanup short;
nor can the first, in a cleanup that an error started (signals.shielded)."""

from __future__ import annotations

import ast
import subprocess
import sys

CHILD = """
import os, signal, time
from glmsnake.launch.signals import Terminated, raise_once
steps = []
try:
    with raise_once():
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
            steps.append("not interrupted")
        finally:
            os.kill(os.getpid(), signal.SIGINT)  # a burst: the next signal arrives during cleanup
            time.sleep(0.2)
            steps.append("cleanup finished")
except Terminated as e:
    steps.append(f"raised {e}")
steps.append(signal.getsignal(signal.SIGTERM) == signal.SIG_DFL)
print(steps)
"""


def test_second_signal_during_cleanup_is_noted_not_raised():
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert ast.literal_eval(out.stdout.strip()) == ["cleanup finished", "raised SIGTERM", True]
    assert "SIGINT during cleanup after SIGTERM: finishing the cleanup first" in out.stderr


SHIELDED = """
import os, signal, time
from glmsnake.launch.signals import raise_once, shielded
steps = []
try:
    with raise_once():
        try:
            raise RuntimeError("worker lost")  # e.g. a worker task ended by Slurm's SIGTERM first
        finally:
            with shielded():
                os.kill(os.getpid(), signal.SIGTERM)  # then the head's own SIGTERM, mid-teardown
                time.sleep(0.2)
                steps.append("cleanup finished")
except BaseException as e:
    steps.append(f"raised {type(e).__name__}: {e}")
print(steps)
"""


def test_signal_during_a_cleanup_an_error_started_is_noted_not_raised():
    out = subprocess.run([sys.executable, "-c", SHIELDED], capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    assert ast.literal_eval(out.stdout.strip()) == ["cleanup finished", "raised RuntimeError: worker lost"]
    assert "SIGTERM during cleanup: finishing the cleanup first" in out.stderr
