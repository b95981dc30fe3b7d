"""The task runtime: the pure-Python code a task in the cluster's container imports.

A container task runs the image's `python3`, which has Ray and torch but neither submitit
nor glmsnake, and cannot use our virtual environment (it is not mounted, and its compiled
packages are built for the host's Python). So the submitting side copies what the task
imports beyond the image, pure Python only, into a versioned folder on shared storage
(`<base>/task-runtime/<content hash>/`), which the container sees because base_dir is mounted.
The task starts through `container_boot.py` in that folder, which puts the folder first on
`sys.path`. Everything compiled (Ray, torch, pydantic_core) comes from the image.

The folder is written once per content (a temporary name, renamed when complete), so
concurrent submissions and reruns share it, and a changed checkout gets a new one.
"""

from __future__ import annotations

import hashlib
import importlib.util
import shlex
import shutil
import tempfile
from pathlib import Path

# What the task imports beyond the image: glmsnake's launcher and submitit with its own
# pure-Python dependencies, first on sys.path (cloudpickle: the one that pickled the tasks). Ray,
# torch and friends come from the image. FALLBACK goes last on sys.path: the image's own copy,
# which its compiled packages were built against, wins where it has one.
PACKAGES = ("glmsnake", "submitit", "cloudpickle")
FALLBACK = ("typing_extensions",)
FALLBACK_DIR = "fallback"
BOOT = Path("glmsnake") / "launch" / "container_boot.py"
COMPLETE = ".complete"
COMPILED = (".so", ".pyd", ".dylib")


class NotPurePython(RuntimeError):
    """A package meant for the task runtime holds compiled code, which would not match the image."""


def _source_files(name: str, under: Path = Path()) -> list[tuple[Path, Path]]:
    """(source file, path inside the runtime) of one importable package or module."""
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(f"{name} is not importable here; the task runtime needs it")
    origin = Path(spec.origin)
    if not spec.submodule_search_locations:  # a single module, e.g. typing_extensions.py
        return [(origin, under / origin.name)]
    root = origin.parent
    out = []
    for f in sorted(root.rglob("*")):
        if f.is_dir() or "__pycache__" in f.parts or f.suffix == ".pyc":
            continue
        if f.suffix in COMPILED or ".cpython-" in f.name:
            raise NotPurePython(f"{f} is compiled; the task runtime ships pure Python only")
        out.append((f, under / name / f.relative_to(root)))
    return out


def _files() -> list[tuple[Path, Path]]:
    return ([pair for name in PACKAGES for pair in _source_files(name)]
            + [pair for name in FALLBACK for pair in _source_files(name, Path(FALLBACK_DIR))])


def version(files: list[tuple[Path, Path]]) -> str:
    """The content hash that names a runtime: same files, same folder."""
    h = hashlib.sha256()
    for src, rel in files:
        h.update(str(rel).encode() + b"\0" + src.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def ensure(root: Path) -> Path:
    """The runtime folder under `root` for this checkout's code, written if missing or damaged; returns it.

    Written under a unique temporary name and renamed when complete; `.complete` lists every file,
    and a folder whose files are not all there (a scratch purge) is written again, never deleted
    while complete (jobs may be reading it): the damaged one is renamed aside.
    """
    files = _files()
    final = Path(root) / version(files)
    listing = "\n".join(str(rel) for _src, rel in files) + "\n"
    if _intact(final, listing):
        return final
    Path(root).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{final.name}."))
    try:
        for src, rel in files:
            dst = tmp / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)  # fresh times: a scratch purge sees a new file
        (tmp / COMPLETE).write_text(listing)
        tmp.chmod(0o755)
        if final.exists():
            if _intact(final, listing):  # another submission wrote it meanwhile
                return final
            final.rename(Path(tempfile.mkdtemp(dir=root, prefix=f".{final.name}.damaged.")) / "old")
        tmp.rename(final)
    except OSError:
        if not _intact(final, listing):
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _intact(folder: Path, listing: str) -> bool:
    """Complete, and every file it lists still there."""
    try:
        if (folder / COMPLETE).read_text() != listing:
            return False
    except OSError:
        return False
    return all((folder / rel).is_file() for rel in listing.split())


def boot_command(runtime: Path, image: str, python: str = "python3") -> str:
    """The python command (submitit's `python`) that starts a task inside the image from `runtime`."""
    return f"{python} -u {shlex.quote(str(Path(runtime) / BOOT))} --image {shlex.quote(image)}"


__all__ = ["BOOT", "FALLBACK", "FALLBACK_DIR", "NotPurePython", "PACKAGES", "boot_command", "ensure", "version"]
