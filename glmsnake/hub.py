"""Weights and data: download from the hub, record local folders, generate the tiny default.

Every source ends in the same place: `<base>/<model>/` holding the files and
`glmsnake.manifest.json` (file list, sizes, sha256), written last. Downloads go
through huggingface_hub (revision pinned to a commit, allow patterns, per-file
resume) and every file is verified against the hub's own metadata: sha256 from
the LFS pointer, or the git blob id for small files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from glmsnake import atomic, disk, publish
from glmsnake.errors import GlmsnakeError

if TYPE_CHECKING:
    from glmsnake.recipe.args import ModelArgs

log = logging.getLogger("glmsnake.hub")


# --------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class HubSource:
    repo_id: str
    revision: str
    repo_type: str  # "model" | "dataset"

    @classmethod
    def parse(cls, source: str) -> "HubSource":
        """`hf://owner/name@rev` (a model) or `hf://datasets/owner/name@rev`."""
        rest = source.removeprefix("hf://")
        repo_type = "model"
        if rest.startswith("datasets/"):
            repo_type, rest = "dataset", rest.removeprefix("datasets/")
        repo_id, _, revision = rest.partition("@")
        if repo_id.count("/") != 1 or not all(repo_id.split("/")):
            raise GlmsnakeError(f"hub source {source!r} is not hf://owner/name@revision", "write e.g. hf://zai-org/GLM-4.7@main")
        return cls(repo_id, revision or "main", repo_type)


# --------------------------------------------------------------------------- verification


def git_blob_sha1(path: Path) -> str:
    """The git object id of a file: how the hub identifies files stored without LFS."""
    h = hashlib.sha1()
    h.update(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


# safetensors_io is imported inside the functions that need it: it imports torch, which
# `import glmsnake.hub` (the weights steps) does not need otherwise.


def check_safetensors(path: Path) -> None:
    """Reject a truncated or garbled safetensors file by its header, without reading the payload."""
    from glmsnake.convert.safetensors_io import check_complete

    check_complete(path)


def check_index(folder: Path, present: Iterable[str]) -> None:
    """Every shard the safetensors index names must be present."""
    from glmsnake.convert.safetensors_io import INDEX_NAME

    index = folder / INDEX_NAME
    if not index.is_file():
        return
    shards = set(json.loads(index.read_text())["weight_map"].values())
    missing = sorted(shards - set(present))
    if missing:
        raise GlmsnakeError(
            f"{folder} lacks {len(missing)} shard(s) named in {INDEX_NAME}: {', '.join(missing[:5])}"
            + (" ..." if len(missing) > 5 else ""),
            "copy the missing shards, or point the source at a complete checkpoint",
        )


def hash_files(folder: Path, names: list[str], workers: int = 4) -> dict[str, dict[str, Any]]:
    """sha256 and size of each file; hashing releases the GIL, so threads overlap reads."""

    def one(name: str) -> tuple[str, dict[str, Any]]:
        p = folder / name
        return name, {"size": p.stat().st_size, "sha256": atomic.sha256_file(p)}

    with ThreadPoolExecutor(max(1, workers)) as pool:
        return dict(sorted(pool.map(one, names)))


# --------------------------------------------------------------------------- hub


def hub_endpoint() -> str | None:
    """HF_ENDPOINT read at call time (huggingface_hub reads it once, at import)."""
    return os.environ.get("HF_ENDPOINT") or None


def _hub_errors():
    from huggingface_hub import errors

    return errors


def hub_files(src: HubSource, allow_patterns: list[str] | None) -> tuple[str, dict[str, dict[str, Any]]]:
    """Resolve the revision to a commit and list the files to fetch with their hub metadata."""
    from huggingface_hub import HfApi
    from huggingface_hub.utils import filter_repo_objects

    api = HfApi(endpoint=hub_endpoint())
    errors = _hub_errors()
    try:
        info = api.repo_info(src.repo_id, repo_type=src.repo_type, revision=src.revision)
        tree = [
            f
            for f in api.list_repo_tree(src.repo_id, repo_type=src.repo_type, revision=info.sha, recursive=True)
            if hasattr(f, "blob_id")
        ]
    except errors.RevisionNotFoundError:
        raise GlmsnakeError(
            f"revision {src.revision!r} does not exist in {src.repo_type} repo {src.repo_id}",
            "set the source's @revision to an existing branch, tag or commit",
        ) from None
    except errors.RepositoryNotFoundError:
        raise GlmsnakeError(
            f"{src.repo_type} repo {src.repo_id} not found (or not accessible with the current token)",
            "check the repo id, and run `hf auth login` for gated or private repos",
        ) from None
    wanted = set(filter_repo_objects([f.path for f in tree], allow_patterns=allow_patterns))
    files = {}
    for f in tree:
        if f.path in wanted:
            meta: dict[str, Any] = {"size": f.size, "git_sha1": f.blob_id}
            if f.lfs is not None:
                meta["sha256"] = f.lfs.sha256
                meta["size"] = f.lfs.size
            files[f.path] = meta
    if not files:
        raise GlmsnakeError(
            f"no file of {src.repo_id}@{src.revision} matches {allow_patterns}",
            "name an existing file in the dataset's `file:` (its path inside the repo)" if src.repo_type == "dataset"
            else "widen weights.allow_patterns"
        )
    return info.sha, dict(sorted(files.items()))


def verify_against_hub(folder: Path, files: dict[str, dict[str, Any]], workers: int = 4) -> dict[str, dict[str, Any]]:
    """Check every downloaded file against the hub's metadata; return the manifest entries."""

    def one(item: tuple[str, dict[str, Any]]) -> tuple[str, dict[str, Any], str | None]:
        name, meta = item
        path = folder / name
        if not path.is_file():
            return name, meta, "missing"
        size = path.stat().st_size
        if size != meta["size"]:
            return name, meta, f"size {size} != {meta['size']} from the hub"
        sha256 = atomic.sha256_file(path)
        if "sha256" in meta and sha256 != meta["sha256"]:
            return name, meta, f"sha256 {sha256[:12]}... != {meta['sha256'][:12]}... from the hub"
        if "sha256" not in meta and git_blob_sha1(path) != meta["git_sha1"]:
            return name, meta, "git blob id differs from the hub's"
        return name, {**meta, "sha256": sha256}, None

    with ThreadPoolExecutor(max(1, workers)) as pool:
        results = list(pool.map(one, files.items()))
    bad = [(name, why) for name, _, why in results if why]
    if bad:
        for name, _ in bad:  # the hub's per-file cache would otherwise keep the bad copy
            _forget_download(folder, name)
        raise GlmsnakeError(
            f"{len(bad)} file(s) in {folder} failed verification: "
            + "; ".join(f"{n}: {w}" for n, w in bad[:5]),
            "rerun the step: the failed files were removed and will be downloaded again",
        )
    return {name: meta for name, meta, _ in results}


def _forget_download(folder: Path, name: str) -> None:
    (folder / name).unlink(missing_ok=True)
    meta = folder / ".cache" / "huggingface" / "download" / f"{name}.metadata"
    meta.unlink(missing_ok=True)


def download_repo(src: HubSource, dest: Path, allow_patterns: list[str] | None, workers: int = 8) -> dict[str, Any]:
    """Download (resuming per file) and verify; returns the manifest."""
    from huggingface_hub import snapshot_download

    commit, files = hub_files(src, allow_patterns)
    have = {n: (dest / n).stat().st_size for n in files if (dest / n).is_file()}  # kept from an earlier try
    disk.require_room(dest, sum(m["size"] - have.get(n, 0) for n, m in files.items()),
                      f"downloading {src.repo_id}@{src.revision} ({len(files)} files)")
    dest.mkdir(parents=True, exist_ok=True)
    log.info("downloading %d files of %s@%s (commit %s) to %s", len(files), src.repo_id, src.revision, commit, dest)
    # Pinned to the commit we listed, so the files and their metadata agree.
    snapshot_download(
        src.repo_id,
        repo_type=src.repo_type,
        revision=commit,
        local_dir=dest,
        allow_patterns=list(files),
        max_workers=workers,
        endpoint=hub_endpoint(),
    )
    verified = verify_against_hub(dest, files)
    return {
        "source": f"hf://{'datasets/' if src.repo_type == 'dataset' else ''}{src.repo_id}@{src.revision}",
        "repo_id": src.repo_id,
        "repo_type": src.repo_type,
        "revision": src.revision,
        "commit": commit,
        "files": verified,
    }


# --------------------------------------------------------------------------- local


def record_local(path: Path, dest: Path) -> dict[str, Any]:
    """Verify a checkpoint already on shared storage and link it into `dest` (no copy)."""
    if not path.is_dir():
        raise GlmsnakeError(f"local weights {path} do not exist or are not a folder", "fix the `local:` path")
    names = sorted(p.name for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    check_index(path, names)
    shards = [n for n in names if n.endswith(".safetensors")]
    if not shards:
        raise GlmsnakeError(f"{path} holds no .safetensors files", "point `local:` at an HF checkpoint folder")
    if "config.json" not in names:
        raise GlmsnakeError(f"{path} has no config.json", "point `local:` at an HF checkpoint folder")
    for name in shards:
        check_safetensors(path / name)
    files = hash_files(path, names)
    dest.mkdir(parents=True, exist_ok=True)
    for name in names:
        link = dest / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(path.resolve() / name)
    return {"source": f"local:{path}", "path": str(path.resolve()), "files": files}


# --------------------------------------------------------------------------- tiny


def make_tiny_folder(model: "ModelArgs", seed: int, dest: Path) -> dict[str, Any]:
    """Generate the embedded tiny checkpoint into `dest` (staged, renamed when complete)."""
    from glmsnake.convert.tiny import make_tiny

    with publish.staged_dir(dest, keep_partial=False) as stage:
        names = make_tiny(stage, model, seed=seed)
    return {"source": "tiny", "seed": seed, "files": hash_files(dest, names)}


def check_writable(folder: Path) -> None:
    """Fail early, naming the folder, when it cannot be written (a real probe: root ignores mode bits)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".glmsnake-probe-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise GlmsnakeError(f"cannot write under {folder}: {e.strerror}", "set base_dir to a writable folder") from None
