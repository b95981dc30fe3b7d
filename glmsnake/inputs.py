"""The workflow's inputs on disk, checked when the config is loaded: `local:` sources and base_dir.

Cheap reads only (a dry run writes nothing and a 700 GB folder is not read): what exists, of
what kind, and a local checkpoint's config.json against the MODEL args. The steps check the
rest of the content (shard headers, JSON rows) when they use it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from glmsnake.config import Workflow
from glmsnake.architectures import check_hf_config
from glmsnake.disk import existing_ancestor
from glmsnake.errors import GlmsnakeError
from glmsnake.paths import Paths


def input_problems(wf: Workflow) -> list[tuple[str, str]]:
    """(problem, fix) for every input that cannot work, all at once."""
    out = []
    weights = wf.preset.weights.source
    if weights.startswith("local:"):
        path = wf.local_path(weights)
        out += _checked(path, lambda: _local_weights(path) or _local_config(wf, path))
    for name, ds in wf.preset.datasets.items():
        if ds.source.startswith("local:"):
            path = wf.local_path(ds.source)
            out += [(f"datasets.{name}: {p}", f) for p, f in _checked(path, lambda: _local_dataset(path))]
    out += _checked(wf.base, lambda: _base_dir(wf.base) or _moved_base(wf))
    return out


def _checked(path: Path, check) -> list[tuple[str, str]]:
    try:
        return check()
    except OSError as e:  # a folder on the way this user may not enter
        return [(f"cannot look at {path}: {e.strerror} ({e.filename})", "fix the path, or its permissions")]


def _local_weights(path: Path) -> list[tuple[str, str]]:
    fix = "point weights.source `local:` at an HF checkpoint folder (config.json and *.safetensors)"
    if not path.exists():
        return [(f"weights: local {path} does not exist", fix)]
    if not path.is_dir():
        return [(f"weights: local {path} is a file, not a checkpoint folder", fix)]
    missing = [what for what, ok in (("config.json", (path / "config.json").is_file()),
                                     ("*.safetensors", any(path.glob("*.safetensors")))) if not ok]
    return [(f"weights: local {path} holds no {' and no '.join(missing)}", fix)] if missing else []


def _local_config(wf: Workflow, path: Path) -> list[tuple[str, str]]:
    """Weights of another model fail the conversion; said now, before the first step."""
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        return [(f"weights: {path}/config.json cannot be read as JSON ({e})", "point `local:` at an HF checkpoint folder")]
    try:
        check_hf_config(config, wf.preset.model, str(path))
    except GlmsnakeError as e:
        return [(f"weights: {e.problem}", e.fix or "")]
    return []


def _local_dataset(path: Path) -> list[tuple[str, str]]:
    fix = "point the dataset's `local:` at a .jsonl file (one JSON object per line)"
    if not path.exists():
        return [(f"local {path} does not exist", fix)]
    if path.is_dir():
        return [(f"local {path} is a folder, not a .jsonl file", fix)]
    if path.stat().st_size == 0:
        return [(f"local {path} is empty", "write at least one JSON object per line into it")]
    return []


def _base_dir(base: Path) -> list[tuple[str, str]]:
    fix = "set base_dir to a folder on a writable file system that every node mounts"
    at = existing_ancestor(base)
    if not at.is_dir():
        return [(f"base_dir {base}: {at} is a file, not a folder", fix)]
    if os.statvfs(at).f_flag & os.ST_RDONLY:
        return [(f"base_dir {base} is on a read-only file system ({at})", fix)]
    if not os.access(at, os.W_OK | os.X_OK):
        return [(f"base_dir {base}: this user may not write in {at}", fix)]
    return []


def _moved_base(wf: Workflow) -> list[tuple[str, str]]:
    """A relative base_dir that meant the cwd before it meant the project folder: outputs left there
    would be made again from scratch in the new place; say so instead."""
    relative = Path(wf.user.base_dir).expanduser()
    if relative.is_absolute() or wf.project_dir is None:
        return []
    old = Path(os.path.normpath(Path.cwd() / relative))
    if old == wf.base or not _has_outputs(wf, old) or _has_outputs(wf, wf.base):
        return []
    return [(f"base_dir {wf.user.base_dir!r} is {wf.base} (a relative base_dir starts at the config's project "
             f"folder), but the outputs are in {old}", f"set base_dir: {old} (or move that folder to {wf.base})")]


def _has_outputs(wf: Workflow, base: Path) -> bool:
    paths = Paths(base, wf.preset.model_name)
    return paths.hf_manifest.is_file() or (base / "runs").is_dir()
