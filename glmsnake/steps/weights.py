"""Rules download_hf and download_dataset: the HF weights and the prompt sets under base_dir."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from glmsnake import architectures, atomic, hub, staleness
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
        manifest = hub.record_local(wf.local_path(source), dest)
    else:
        manifest = hub.download_repo(hub.HubSource.parse(source), dest, wf.preset.weights.allow_patterns)
        hub.check_index(dest, manifest["files"])
        for name in manifest["files"]:
            if name.endswith(".safetensors"):
                hub.check_safetensors(dest / name)
        # Weights of another model than the preset's stop here, naming each field (the files stay).
        architectures.check_hf_config(json.loads((dest / "config.json").read_text()), wf.preset.model, str(dest))
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
    keys = dataset_keys(wf)
    if ds.source.startswith("local:"):
        path = wf.local_path(ds.source)
        if path.is_dir():
            raise GlmsnakeError(f"dataset {name}: {path} is a folder, not a .jsonl file",
                                "point the dataset's `local:` at the .jsonl file itself")
        if not path.is_file():
            raise GlmsnakeError(f"dataset {name}: {path} does not exist", "fix the dataset's `local:` path")
        data = path.read_bytes()
        check_jsonl(data, path, keys, name)
        atomic.write_bytes(output, data)
        return
    src = hub.HubSource.parse(ds.source)
    cache = output.parent / ".hub" / name
    manifest = hub.download_repo(src, cache, [ds.file])
    check_jsonl((cache / ds.file).read_bytes(), cache / ds.file, keys, name)
    tmp = output.with_name(f".{output.name}.tmp")
    shutil.copyfile(cache / ds.file, tmp)
    os.replace(tmp, output)
    atomic.write_json(output.with_suffix(".manifest.json"), manifest)


def dataset_keys(wf: Workflow) -> set[str]:
    """The row keys training reads: every run's rollout.input_key and label_key."""
    return {k for r in wf.runs.values() for k in (r.rollout.input_key, r.rollout.label_key)}


def check_jsonl(data: bytes, path: Path, keys: set[str], name: str, most: int = 10) -> None:
    """A prompt set training can read: JSON objects, one a line, each with `keys`, at least one.
    Checked before the dataset is published, so nothing downstream runs on a broken one."""
    problems, rows = [], 0
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise GlmsnakeError(f"dataset {name}: {path} is not UTF-8 text (byte {e.start})",
                            "save the file as UTF-8 JSON lines") from None
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(f"{path}:{i}: not JSON ({e.msg}, column {e.colno})")
        else:
            if not isinstance(row, dict):
                problems.append(f"{path}:{i}: a JSON {type(row).__name__}, not an object")
            elif missing := sorted(keys - row.keys()):
                problems.append(f"{path}:{i}: no {', '.join(repr(k) for k in missing)} (it has {sorted(row)[:6]})")
            else:
                rows += 1
        if len(problems) >= most:
            problems.append("... (the first problems only)")
            break
    if not problems and rows == 0:
        problems.append(f"{path}: no rows")
    if problems:
        raise GlmsnakeError(
            f"dataset {name} cannot be used for training:\n    " + "\n    ".join(problems),
            f"make each line a JSON object with {sorted(keys)} (the runs' rollout.input_key and label_key), "
            "or set those keys to the file's own",
        )
