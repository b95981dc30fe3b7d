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
from glmsnake.convert.arch import check_hf_config
from glmsnake.disk import existing_ancestor
from glmsnake.errors import GlmsnakeError


def input_problems(wf: Workflow) -> list[tuple[str, str]]:
    """(problem, fix) for every input that cannot work, all at once."""
    out = []
    weights = wf.preset.weights.source
    if weights.startswith("local:"):
        out += _local_weights(wf.local_path(weights)) or _local_config(wf, wf.local_path(weights))
    for name, ds in wf.preset.datasets.items():
        if ds.source.startswith("local:"):
            out += [(f"datasets.{name}: {p}", f) for p, f in _local_dataset(wf.local_path(ds.source))]
    out += _base_dir(wf.base)
    return out


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
    return []
