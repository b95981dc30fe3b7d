"""Every training attempt's log is kept: `runs/<run>/logs/attempt-N.log`.

Snakemake deletes a rule's log before it runs the job again, so a killed or failed attempt's
log would be gone after the rerun. At the start of each attempt the rule's log file gets a
second name, a hard link `runs/<run>/logs/attempt-N.log`: the same file, written as it goes,
so nothing is lost even to a SIGKILL, and Snakemake's deletion only removes the rule's name for
it. Where a hard link cannot be made (another file system), the log is copied when the attempt
ends instead.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

_ATTEMPT = re.compile(r"^attempt-(\d+)\.log$")


def _next(folder: Path) -> Path:
    numbers = [int(m.group(1)) for p in folder.glob("attempt-*.log") if (m := _ATTEMPT.match(p.name))]
    return folder / f"attempt-{max(numbers, default=0) + 1}.log"


def _is_stdout(path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(sys.stdout.fileno()), os.stat(path))
    except (OSError, ValueError):
        return False


def begin(rule_log: Path, folder: Path) -> Path | None:
    """Give the rule's log (this process's stdout) its attempt name; returns the name to copy to at
    the end where no link could be made, else None."""
    if not _is_stdout(rule_log):
        return None  # not run by the rule (a test, a shell): nothing to keep
    folder.mkdir(parents=True, exist_ok=True)
    dest = _next(folder)
    earlier = sorted(folder.glob("attempt-*.log"), key=lambda p: int(_ATTEMPT.match(p.name).group(1)))
    try:
        os.link(rule_log, dest)
        copy_at_end = None
    except OSError:
        copy_at_end = dest
    print(f"[glmsnake] this log is also {dest}" + (f"; earlier attempts: {earlier[-1].parent}/" if earlier else ""),
          flush=True)
    return copy_at_end


def finish(rule_log: Path, copy_to: Path | None) -> None:
    if copy_to is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        shutil.copyfile(rule_log, copy_to)
