"""Publishing a folder: built under a temporary name, swapped in whole, the user's files kept.

A step builds its folder in `.<name>.partial` beside the final name (`temp_dir_for`), then
`publish_dir` puts it in place:
- an older folder is swapped out in one step (renameat2 RENAME_EXCHANGE), so the final name always
  holds a whole folder, the old or the new, even if the process dies in between; where the file
  system cannot exchange, the old folder is moved aside first and put back if the rename fails;
- glmsnake never deletes what it did not write: each published folder lists its own files
  (`.glmsnake.files`); anything else found in the folder being replaced (a model card, eval
  results) moves into the new one, and the step says so. A folder published before that list
  existed is moved aside whole (`<name>.replaced-<time>`) when it holds anything the new one lacks.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Iterator

from glmsnake.atomic import fsync_dir, read_json, write_json

FILES_NAME = ".glmsnake.files"


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


def publish_dir(stage: Path, final: Path) -> list[str]:
    """Put a complete staging folder at its final name; returns the user's files carried over."""
    final, stage = Path(final), Path(stage)
    write_json(stage / FILES_NAME, _files(stage))
    kept = _carry_over_user_files(final, stage) if final.is_dir() else []
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
    if kept:
        print(f"[glmsnake] {final}: kept {len(kept)} file(s) glmsnake did not write: {', '.join(kept[:10])}"
              + (" ..." if len(kept) > 10 else ""), file=sys.stderr, flush=True)
    return kept


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if (p.is_file() or p.is_symlink()) and p.name != FILES_NAME)


def _is_glmsnake_name(rel: str) -> bool:
    # Sentinels and records (glmsnake.*), hidden work files (.<name>.tmp..., .<shard>.ok.json).
    return any(part.startswith(("glmsnake.", ".")) for part in Path(rel).parts)


def _carry_over_user_files(final: Path, stage: Path) -> list[str]:
    """Move the files of `final` that glmsnake did not write into `stage`; the names moved."""
    listing = final / FILES_NAME
    present = [f for f in _files(final) if not _is_glmsnake_name(f)]
    if not listing.is_file():  # published before folders listed their files
        new = set(_files(stage))
        if any(f not in new for f in present):
            aside = final.with_name(f"{final.name}.replaced-{time.strftime('%Y%m%dT%H%M%S')}")
            os.replace(final, aside)  # the new folder then takes the free name
            print(f"[glmsnake] {final} held files the new one lacks (it predates glmsnake's file list): "
                  f"moved whole to {aside}", file=sys.stderr, flush=True)
        return []
    ours = set(read_json(listing))
    moved = []
    for rel in present:
        if rel in ours:
            continue
        dest = stage / rel
        if dest.exists() or dest.is_symlink():  # the user's file has the name of a new output
            dest = dest.with_name(dest.name + ".kept")
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(final / rel, dest)
        moved.append(str(dest.relative_to(stage)))
    return moved


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
