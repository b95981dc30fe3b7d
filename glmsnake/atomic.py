"""Atomic outputs: write under a temporary name, rename when complete.

A failed step must never leave something that looks finished, so every file or
folder glmsnake produces goes through one of these helpers.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterator

SENTINEL_NAME = "glmsnake.done.json"
_HASH_CHUNK = 1 << 20


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write `data` to `path` atomically (temp file in the same folder, fsync, rename).

    `mode` holds from the temporary file's first byte (less the umask), so a secret is never readable.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode), "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_json(path: Path, obj: Any, mode: int = 0o644) -> None:
    write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode(), mode)


def read_json(path: Path) -> Any:
    with open(path) as f:
        return json.load(f)


def temp_dir_for(final: Path) -> Path:
    """The staging folder that `publish_dir` renames to `final` (stable, so reruns can resume)."""
    final = Path(final)
    return final.with_name(f".{final.name}.partial")


@contextlib.contextmanager
def staged_dir(final: Path, *, keep_partial: bool = True) -> Iterator[Path]:
    """Yield a staging folder; on success it replaces `final` in one rename.

    On failure the staging folder is kept (so a rerun can skip finished parts)
    unless keep_partial is False; `final` is never touched by a failure.
    """
    final = Path(final)
    stage = temp_dir_for(final)
    stage.mkdir(parents=True, exist_ok=True)
    try:
        yield stage
    except BaseException:
        if not keep_partial:
            shutil.rmtree(stage, ignore_errors=True)
        raise
    publish_dir(stage, final)


def publish_dir(stage: Path, final: Path) -> None:
    """Rename a complete staging folder to its final name, replacing an older one.

    An older folder is swapped out in one step (renameat2 RENAME_EXCHANGE), so `final` always
    holds a whole folder, the old or the new, even if the process dies in between; where the file
    system cannot exchange, the old folder is moved aside first and put back if the rename fails.
    """
    final = Path(final)
    if not final.exists():
        os.replace(stage, final)
    elif _exchange(stage, final):
        shutil.rmtree(stage, ignore_errors=True)  # now the old folder
    else:
        old = final.with_name(f".{final.name}.old{os.getpid()}")
        os.replace(final, old)
        try:
            os.replace(stage, final)
        except BaseException:
            os.replace(old, final)
            raise
        shutil.rmtree(old, ignore_errors=True)
    fsync_dir(final.parent)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2); False where the call or the file system lacks it."""
    import ctypes
    import errno

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def sha256_file(path: Path) -> str:
    """sha256 through one reused 1 MB buffer: memory stays flat however many threads hash at once."""
    h, buf = hashlib.sha256(), bytearray(_HASH_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def write_sentinel(path: Path, /, *, step: str, settings: dict[str, Any], **record: Any) -> dict:
    """Write a step's sentinel last, atomically: what was made, from what, how."""
    from glmsnake import __version__

    doc = {
        "step": step,
        "settings": settings,
        "glmsnake_version": __version__,
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "slurm_nodelist": os.environ.get("SLURM_JOB_NODELIST"),
        **record,
    }
    write_json(path, doc)
    return doc
