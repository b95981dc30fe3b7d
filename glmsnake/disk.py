"""Disk space: refuse a step that cannot fit before it writes, and name a full disk when one stops a step.

A full file system otherwise shows up as its consequences: an ENOSPC traceback deep in a
writer, an empty log, a job whose result never appeared. Every message here names the path,
the bytes needed and the bytes free, and a fix that is true for a full disk.
"""

from __future__ import annotations

import errno
import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

from glmsnake.errors import GlmsnakeError

FULL = (errno.ENOSPC, errno.EDQUOT)
FULL_TEXTS = ("No space left on device", "Disk quota exceeded")
FIX = "free space on that file system (or raise the quota), or set base_dir to one with room; then rerun"


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def existing_ancestor(path: Path) -> Path:
    """The path itself, or the nearest folder above it that exists (what a new folder would land on)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: Path) -> int:
    """Bytes this user may still write on the file system that holds `path` (or would hold it)."""
    st = os.statvfs(existing_ancestor(path))
    return st.f_bavail * st.f_frsize


def usage_line(path: Path) -> str:
    usage = shutil.disk_usage(existing_ancestor(path))
    return f"{human(free_bytes(path))} free of {human(usage.total)}"


def bytes_under(path: Path) -> int:
    """Bytes already written under a folder (e.g. a stage a resumed step keeps)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink()) if path.is_dir() else 0


def weight_bytes(hf_dir: Path) -> int:
    """Bytes of an HF folder's safetensors shards (through links: `local:` weights are linked)."""
    return sum(p.stat().st_size for p in Path(hf_dir).glob("*.safetensors"))


def require_room(path: Path, needed: int, what: str) -> None:
    """Refuse `what` before it writes when its file system has less than `needed` bytes free."""
    free = free_bytes(path)
    if needed > free:
        raise GlmsnakeError(
            f"{what} needs {human(needed)} under {path}, but its file system has {human(free)} free",
            FIX,
        )


def full_disk_note(path: Path) -> str:
    """A sentence for a failure report when the file system of `path` is (nearly) full, else ''."""
    try:
        free, total = free_bytes(path), shutil.disk_usage(existing_ancestor(path)).total
    except OSError:
        return ""
    if free < min(1 << 30, total // 50):
        return f"the file system of {path} is full: {usage_line(path)}"
    return ""


def report_if_full(path: Path) -> None:
    """For the Snakefile's onerror: a full disk also empties the logs that would have named it."""
    if note := full_disk_note(path):
        print(f"glmsnake: error: {note}\n  fix: {FIX}", file=sys.stderr, flush=True)


@contextmanager
def naming_a_full_disk(path: Path):
    """An ENOSPC/EDQUOT inside becomes a GlmsnakeError naming the file, the file system's free bytes and the fix."""
    try:
        yield
    except OSError as e:
        if e.errno not in FULL:
            raise
        where = Path(e.filename) if e.filename else Path(path)
        raise GlmsnakeError(f"no space left while writing {where} ({e.strerror}): {usage_line(where)}", FIX) from None
