"""Which training checkpoints to keep, and pruning the rest while training runs.

A GLM-4.7 checkpoint with optimizer state is about 5 TB; slime and Megatron never delete one.
The rule (`plan`): keep the last `last` checkpoints and every iteration that ends an `every`
block (slime numbers a checkpoint by its rollout id, so with every=20 the milestones are
iterations 19, 39, ...). Never deleted, whatever the rule says: the checkpoint the tracker
names, anything newer than it (it may still be being written), and a run's only checkpoint.

`prune` renames a checkpoint to a hidden name before removing it, so a kill mid-way leaves at
`iter_XXXXXXX` the whole checkpoint or nothing; the hidden leftovers go on the next pass.
`Pruner` runs `prune` in a thread next to the training job, from glmsnake's side: the same for
the local trainer and for slime, which stays unmodified. Library code: no workflow config.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from glmsnake import disk
from glmsnake.atomic import fsync_dir

ITER = re.compile(r"^iter_(\d{7})$")
TRACKER = "latest_checkpointed_iteration.txt"
DELETING = ".deleting_"


@dataclass(frozen=True)
class Policy:
    last: int  # the newest checkpoints kept (>= 1)
    every: int = 0  # also keep iterations i with (i + 1) % every == 0; 0: no milestones


def plan(iterations: list[int], tracker: int | None, policy: Policy) -> tuple[list[int], list[int]]:
    """(keep, delete) for the checkpoints present, by the rule above."""
    its = sorted(iterations)
    if tracker is None or len(its) <= 1:
        return its, []
    settled = [i for i in its if i <= tracker]  # newer ones may still be being written
    keep = set(settled[-policy.last:]) | {tracker} | {i for i in its if i > tracker}
    if policy.every:
        keep |= {i for i in settled if (i + 1) % policy.every == 0}
    return sorted(keep), [i for i in settled if i not in keep]


def read_tracker(root: Path) -> int | None:
    try:
        return int((Path(root) / TRACKER).read_text().strip())
    except (OSError, ValueError):  # absent, or slime's "release"
        return None


def present(root: Path) -> list[int]:
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(int(m.group(1)) for p in root.iterdir() if (m := ITER.match(p.name)) and p.is_dir())


def prune(root: Path, policy: Policy, log: Callable[[str], None] = print,
          record: Callable[[dict], None] = lambda r: None) -> list[dict]:
    """Delete what the rule does not keep; one record (iteration, bytes freed, time) per deletion,
    handed to `record` as soon as that deletion is done."""
    root = Path(root)
    for leftover in root.glob(f"{DELETING}*") if root.is_dir() else []:
        shutil.rmtree(leftover, ignore_errors=True)  # a pass killed half-way: never a whole checkpoint
    _, delete = plan(present(root), read_tracker(root), policy)
    records = []
    for iteration in delete:
        folder = root / f"iter_{iteration:07d}"
        size = disk.bytes_under(folder)
        hidden = root / f"{DELETING}{folder.name}.{os.getpid()}.{time.time_ns()}"  # unique: a stuck leftover never blocks
        os.rename(folder, hidden)  # from here on, iter_XXXXXXX is gone as a whole
        fsync_dir(root)
        shutil.rmtree(hidden, ignore_errors=True)  # what stays (NFS's open files) goes on the next pass
        records.append({"iteration": iteration, "bytes": size, "time": round(time.time(), 3)})
        record(records[-1])
        log(f"[glmsnake] pruned checkpoint iter {iteration} ({disk.human(size)} freed; "
            f"keeping the last {policy.last}{f' and every {policy.every}th' if policy.every else ''})")
    return records


def read_records(path: Path) -> list[dict]:
    """The deletions recorded so far (a line cut short by a full disk is skipped)."""
    out = []
    for line in Path(path).read_text().splitlines() if Path(path).is_file() else []:
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def checkpoint_bytes(root: Path) -> int | None:
    """The size of a complete checkpoint: the one the tracker names (a newer folder may be half
    written), else None."""
    tracker = read_tracker(root)
    folder = Path(root) / f"iter_{tracker:07d}" if tracker is not None else None
    return disk.bytes_under(folder) if folder is not None and folder.is_dir() else None


class Pruner:
    """`with Pruner(root, policy, record_file, room_for=...)`: prunes every `interval` s while the
    block runs and once more at its end; records each deletion (one JSON line) and warns loudly
    when the file system has less room than `room_for(checkpoint bytes)` needs."""

    def __init__(self, root: Path, policy: Policy | None, record_file: Path, warning_file: Path,
                 interval: float = 30.0, log: Callable[[str], None] = print):
        self.root, self.policy, self.record_file, self.warning_file = Path(root), policy, Path(record_file), Path(warning_file)
        self.interval, self.log = interval, log
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="glmsnake-pruner", daemon=True)
        self._tracker = read_tracker(self.root)

    def __enter__(self) -> "Pruner":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._once_safely()  # the last save's turn; a failure here must not hide the job's own

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._once_safely()

    def _once_safely(self) -> None:
        try:
            self.once()
        except Exception as e:  # noqa: BLE001 - pruning must never take training down with it
            self.log(f"[glmsnake] WARNING: pruning checkpoints under {self.root} failed: {e!r}")

    def _record(self, record: dict) -> None:
        self.record_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.record_file, "a") as f:
            f.write(json.dumps(record) + "\n")

    def once(self) -> None:
        if self.policy is not None:
            prune(self.root, self.policy, self.log, self._record)
        tracker = read_tracker(self.root)
        if tracker != self._tracker:  # a save completed: is there room for the next one, and one more?
            self._tracker = tracker
            self.check_room()

    def check_room(self) -> None:
        size = checkpoint_bytes(self.root)
        if size is None:
            return
        free, needed = disk.free_bytes(self.root), 2 * size
        if free < needed:
            message = (f"only {disk.human(free)} free under {self.root}, less than two checkpoints "
                       f"({disk.human(needed)}): the next saves may fail")
            self.log(f"[glmsnake] WARNING: {message}; {disk.FIX}")
            self.warning_file.parent.mkdir(parents=True, exist_ok=True)
            self.warning_file.write_text(json.dumps({"time": round(time.time(), 3), "message": message}) + "\n")
        elif self.warning_file.exists():
            self.warning_file.unlink()
