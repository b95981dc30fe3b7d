"""signals.raise_once: the first SIGTERM unwinds, a second one cannot cut the cleanup short."""

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
