"""Rules download_hf and download_dataset: the HF weights and the prompt sets under base_dir."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from glmsnake import atomic, hub, staleness
from glmsnake.config import Workflow
from glmsnake.errors import GlmsnakeError


def download_hf(wf: Workflow, sentinel: Path) -> None:
    """Download, record (`local:`) or generate (`tiny`) the weights; the manifest is the sentinel."""
    source = wf.preset.weights.source
    dest = wf.paths.hf_dir
    hub.check_writable(wf.base)
    if source == "tiny":
        manifest = hub.make_tiny_folder(wf.preset.model, wf.preset.train.seed, dest)
    elif source.startswith("local:"):
        manifest = hub.record_local(Path(source.removeprefix("local:")).expanduser(), dest)
    else:
        manifest = hub.download_repo(hub.HubSource.parse(source), dest, wf.preset.weights.allow_patterns)
        hub.check_index(dest, manifest["files"])
        for name in manifest["files"]:
            if name.endswith(".safetensors"):
                hub.check_safetensors(dest / name)
    manifest["total_bytes"] = sum(f["size"] for f in manifest["files"].values())
    atomic.write_sentinel(sentinel, step="download_hf", settings=staleness.weights(wf), **manifest)


def download_dataset(wf: Workflow, output: Path, name: str) -> None:
    """Materialize one prompt set as `<base>/data/<name>.jsonl` (atomically); the file is the output."""
    output = Path(output)
    ds = wf.preset.datasets[name]
    hub.check_writable(output.parent)
    if ds.source == "tiny":
        from glmsnake.trainer.data import tiny_prompts

        seed = wf.preset.train.seed + (0 if name == wf.preset.prompt_dataset else 1)
        atomic.write_bytes(output, "".join(json.dumps(r) + "\n" for r in tiny_prompts(seed)).encode())
        return
    if ds.source.startswith("local:"):
        path = Path(ds.source.removeprefix("local:")).expanduser()
        if not path.is_file():
            raise GlmsnakeError(f"dataset {name}: {path} does not exist", "fix the dataset's `local:` path")
        atomic.write_bytes(output, path.read_bytes())
        return
    src = hub.HubSource.parse(ds.source)
    if not ds.file:
        raise GlmsnakeError(f"dataset {name} from the hub needs `file:`", "name the .jsonl file inside the repo")
    cache = output.parent / ".hub" / name
    manifest = hub.download_repo(src, cache, [ds.file])
    tmp = output.with_name(f".{output.name}.tmp")
    shutil.copyfile(cache / ds.file, tmp)
    os.replace(tmp, output)
    atomic.write_json(output.with_suffix(".manifest.json"), manifest)
