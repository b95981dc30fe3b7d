"""What a folder holds, recorded in its producer's sentinel and checked again before use.

A sentinel's `contents` maps each file (relative path) to its size and, where cheap, its sha256:
files up to `HASH_UP_TO` (configs, indexes, checkpoint metadata) are always hashed; big payload
files are hashed only where the producer hashed them anyway (hub downloads, FP8 shards). A step
checks its inputs' names and sizes, and the hashes of small files, before it starts; `glmsnake
verify` re-hashes everything recorded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from glmsnake.atomic import sha256_file
from glmsnake.errors import GlmsnakeError
from glmsnake.paths import MANIFEST, SENTINEL

HASH_UP_TO = 64 << 20
# Not part of what a folder holds: glmsnake's records about it, the hub's download cache.
_NOT_CONTENT = {SENTINEL, MANIFEST, ".glmsnake.files", ".cache"}


def _is_content(rel: Path) -> bool:
    return not any(part in _NOT_CONTENT or ".tmp" in part or part.endswith(".partial") for part in rel.parts)


def record(folder: Path, names: list[str] | None = None, hashes: dict[str, str] | None = None) -> dict[str, Any]:
    """{name: {size, sha256?}} of `names` (default: every file below `folder`, records aside)."""
    folder = Path(folder)
    if names is None:
        names = sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                       if p.is_file() and _is_content(p.relative_to(folder)))
    out: dict[str, Any] = {}
    for name in names:
        size = (folder / name).stat().st_size
        entry: dict[str, Any] = {"size": size}
        if hashes and name in hashes:
            entry["sha256"] = hashes[name]
        elif size <= HASH_UP_TO:
            entry["sha256"] = sha256_file(folder / name)
        out[name] = entry
    return out


def differences(folder: Path, recorded: dict[str, Any], *, full: bool = False) -> list[str]:
    """Every recorded file that is missing or differs; `full` re-hashes big files too."""
    folder = Path(folder)
    problems = []
    for name, want in sorted(recorded.items()):
        path = folder / name
        if not path.is_file():
            problems.append(f"{path}: missing")
            continue
        size = path.stat().st_size
        if size != want["size"]:
            problems.append(f"{path}: {size} bytes, {want['size']} when it was made")
        elif "sha256" in want and (full or size <= HASH_UP_TO) and sha256_file(path) != want["sha256"]:
            problems.append(f"{path}: its sha256 differs from when it was made")
    return problems


def recorded_in(sentinel: Path, field: str) -> dict[str, Any] | None:
    """What a producer's sentinel recorded; None where there is no sentinel (a step run by hand)."""
    import json

    try:
        return json.loads(Path(sentinel).read_text()).get(field)
    except FileNotFoundError:
        return None


def require_unchanged(folder: Path, recorded: dict[str, Any] | None, what: str, rule: str) -> None:
    """Before a step reads `folder`: refuse a changed or damaged input, naming each file."""
    if recorded is None:
        return  # made before sentinels recorded contents
    problems = differences(folder, recorded)
    if problems:
        raise GlmsnakeError(
            f"{what} changed since it was made:\n    " + "\n    ".join(problems[:20])
            + (f"\n    ... {len(problems) - 20} more" if len(problems) > 20 else ""),
            f"regenerate it: snakemake --forcerun {rule} (with your profile and target); "
            "`glmsnake verify` checks every output",
        )
