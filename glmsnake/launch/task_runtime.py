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
import os
import shlex
import shutil
from pathlib import Path

# What the task imports beyond the image: glmsnake's launcher and submitit with its own
# pure-Python dependencies. Ray, torch and friends come from the image.
PACKAGES = ("glmsnake", "submitit", "cloudpickle", "typing_extensions")
BOOT = Path("glmsnake") / "launch" / "container_boot.py"
COMPLETE = ".complete"
COMPILED = (".so", ".pyd", ".dylib")


class NotPurePython(RuntimeError):
    """A package meant for the task runtime holds compiled code, which would not match the image."""


def _source_files(name: str) -> list[tuple[Path, Path]]:
    """(source file, path inside the runtime) of one importable package or module."""
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(f"{name} is not importable here; the task runtime needs it")
    origin = Path(spec.origin)
    if not spec.submodule_search_locations:  # a single module, e.g. typing_extensions.py
        return [(origin, Path(origin.name))]
    root = origin.parent
    out = []
    for f in sorted(root.rglob("*")):
        if f.is_dir() or "__pycache__" in f.parts or f.suffix == ".pyc":
            continue
        if f.suffix in COMPILED or ".cpython-" in f.name:
            raise NotPurePython(f"{f} is compiled; the task runtime ships pure Python only")
        out.append((f, Path(name) / f.relative_to(root)))
    return out


def _files() -> list[tuple[Path, Path]]:
    return [pair for name in PACKAGES for pair in _source_files(name)]


def version(files: list[tuple[Path, Path]]) -> str:
    """The content hash that names a runtime: same files, same folder."""
    h = hashlib.sha256()
    for src, rel in files:
        h.update(str(rel).encode() + b"\0" + src.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def ensure(root: Path) -> Path:
    """The runtime folder under `root` for this checkout's code, written if missing; returns it."""
    files = _files()
    final = Path(root) / version(files)
    if (final / COMPLETE).exists():
        return final
    tmp = Path(root) / f".{final.name}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    for src, rel in files:
        dst = tmp / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)
    (tmp / COMPLETE).write_text(" ".join(PACKAGES) + "\n")
    try:
        tmp.rename(final)
    except OSError:  # another submission wrote the same content first (or a half one is in the way)
        if not (final / COMPLETE).exists():
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
    shutil.rmtree(tmp, ignore_errors=True)
    return final


def boot_command(runtime: Path, image: str, python: str = "python3") -> str:
    """The python command (submitit's `python`) that starts a task inside the image from `runtime`."""
    return f"{python} -u {shlex.quote(str(Path(runtime) / BOOT))} --image {shlex.quote(image)}"


__all__ = ["BOOT", "NotPurePython", "PACKAGES", "boot_command", "ensure", "version"]
