"""SIGTERM/SIGINT as an exception, once: the cleanup it starts is not cut short by the next one.

Both sides of a multi-node step clean up on a signal: the submitting step cancels its Slurm
job (Ctrl-C, Snakemake's own interrupt), and each task stops the Ray processes it started
(Slurm's SIGTERM at cancel or time limit). Signals come in bursts (Slurm signals the step and
then the job; a terminal sends SIGINT to the whole group), and a second exception raised in
the middle of that cleanup would abandon it: Ray left running, the job never cancelled. So
only the first signal raises; later ones are only noted. A cleanup that starts for another
reason (an error: a worker task ended by Slurm's SIGTERM a moment before its head gets its
own) runs `shielded()`: a signal then is only noted. Slurm's SIGKILL after KillWait stays the
backstop.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any


class Terminated(BaseException):
    """A SIGTERM or SIGINT arrived; unwind through the cleanup (BaseException: not an error to handle)."""


_shields = 0  # > 0 while a shielded() cleanup runs (main thread: where signal handlers run)


@contextlib.contextmanager
def shielded() -> Iterator[None]:
    """A cleanup that must finish: inside, raise_once's signals are noted, never raised."""
    global _shields
    _shields += 1
    try:
        yield
    finally:
        _shields -= 1


@contextlib.contextmanager
def raise_once(sigs: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT)) -> Iterator[None]:
    """Inside the block (main thread only), the first of `sigs` raises Terminated; later ones are noted."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired: list[str] = []

    def handler(signum: int, _frame: Any) -> None:
        name = signal.Signals(signum).name
        if fired or _shields:
            after = f" after {fired[0]}" if fired else ""
            print(f"[glmsnake] {name} during cleanup{after}: finishing the cleanup first", file=sys.stderr, flush=True)
            fired.append(name)
            return
        fired.append(name)
        raise Terminated(name)

    old = {s: signal.getsignal(s) for s in sigs}
    for s in sigs:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
