"""Follow a file another host appends to, copying its new bytes into one of our streams.

The driver of a multi-node job runs on the allocation's first node and its output is
appended to a log file in the (shared) job folder. The step that waits for the job runs
where Snakemake runs, with its stdout redirected to the rule's `log:`; following the
driver log there puts the driver's output into the rule's log as well, in order, without
two hosts writing one file.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path
from typing import BinaryIO

READ_BYTES = 1 << 20


class FileFollower:
    """`with FileFollower(path):` copies what is appended to `path` to `out` until the block ends.

    The file is reopened on every poll (on NFS, a fresh open sees other clients' appends),
    and read to its end once more on exit, so nothing written before the job ended is lost.
    """

    def __init__(self, path: Path, out: BinaryIO | None = None, interval_s: float = 0.5):
        self.path = Path(path)
        self.out = out if out is not None else sys.stdout.buffer
        self.interval_s = interval_s
        self.offset = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"follow-{self.path.name}", daemon=True)

    def __enter__(self) -> FileFollower:
        if self.path.exists():  # an earlier attempt's output is in the rule's log already
            self.offset = self.path.stat().st_size
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.drain()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.drain()

    def drain(self) -> int:
        """Copy what was appended since the last call; returns the bytes copied."""
        copied = 0
        try:
            with open(self.path, "rb") as f:
                if f.seek(0, 2) < self.offset:  # truncated or replaced: start over
                    self.offset = 0
                f.seek(self.offset)
                while chunk := f.read(READ_BYTES):
                    self.out.write(chunk)
                    copied += len(chunk)
                    self.offset += len(chunk)
        except FileNotFoundError:
            return 0
        if copied:
            self.out.flush()
        return copied
