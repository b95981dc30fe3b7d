"""What decides whether each step is stale: the rules' `params:` and the sentinels' `settings`.

Snakemake reruns a job when its params change, so each function returns exactly
the settings that change the step's output, and nothing else: parallelism never
reaches torch_dist, save_interval never reaches train.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from glmsnake.config import Workflow


def weights(wf: Workflow) -> dict[str, Any]:
    w = wf.preset.weights
    key: dict[str, Any] = {"source": w.source, "allow_patterns": w.allow_patterns}
    if w.source == "tiny":
        key["architecture"] = wf.architecture()
    if w.source.startswith("local:"):
        key["identity"] = local_identity(wf.local_path(w.source))
    return key


def dataset(wf: Workflow, name: str) -> dict[str, Any]:
    ds = wf.preset.datasets[name]
    key = ds.model_dump(mode="json")
    if ds.source.startswith("local:"):
        key["identity"] = local_identity(wf.local_path(ds.source))
    return key


def local_identity(path: Path) -> dict[str, Any] | None:
    """Size and mtime of a local file, or of each file of a local folder: changed in place, they
    change the key, so what was made from them is made again. (Stat only: hashing 700 GB on every
    dry run is not an option; the step hashes what it records.) None when the path is missing,
    which the step reports."""
    try:
        files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
        return {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in files}
    except OSError:
        return None


def torch_dist(wf: Workflow) -> dict[str, Any]:
    # Writer count and allocation don't matter. Our writer's Transformer Engine key layout is
    # another checkpoint (named only when chosen, so existing keys stay as they were).
    cfg = wf.preset.convert.torch_dist
    key: dict[str, Any] = {"architecture": wf.architecture()}
    if cfg.backend == "glmsnake" and cfg.layout != "local":
        key["layout"] = cfg.layout
    return key


def fp8(wf: Workflow) -> dict[str, Any]:
    f = wf.preset.convert.fp8
    return {"strategy": f.strategy, "block_size": list(f.block_size)}


# Run settings that change how a run executes but not what it computes.
_RUN_EXECUTION_ONLY = {
    "train": {"save_interval", "max_requeues", "on_change", "keep_checkpoints", "allocation", "slime_dir", "megatron_dir"},
}


def train(wf: Workflow, run: str) -> dict[str, Any]:
    r = wf.runs[run].model_dump(mode="json")
    for section, keys in _RUN_EXECUTION_ONLY.items():
        for k in keys:
            r[section].pop(k, None)
    r.pop("name")
    r.pop("tracking")  # where metrics go (W&B, TensorBoard) changes no weight
    r["architecture"] = wf.architecture()
    if wf.runs[run].serves_fp8:
        r["fp8"] = fp8(wf)
    return r


def export_hf(wf: Workflow, run: str) -> dict[str, Any]:
    key: dict[str, Any] = {"architecture": wf.architecture()}
    if wf.preset.export.backend != "glmsnake":  # another writer of the same tensors (named only when chosen)
        key["backend"] = wf.preset.export.backend
    return key
