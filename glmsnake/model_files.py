"""A preset's `model:`: inline MODEL args, the name of a shared model file, or `from_hf`.

Shared model files live in `config/models/<name>.yaml`, one per architecture and size, as
slime keeps `scripts/models/*.sh`; presets name them (`model: glm4.7-30b-a3b`). With
`model: from_hf` the MODEL args come from the weights' own config.json, through the
architecture's mapping: a `local:` folder is read where it is; `hf://` weights are read from
the downloaded folder, or, before the download, config.json alone is fetched from the hub
(pinned to the source's revision) and kept under base_dir.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from glmsnake import REPO_ROOT
from glmsnake.errors import GlmsnakeError

MODEL_DIR = REPO_ROOT / "config" / "models"
FROM_HF = "from_hf"


def model_names() -> list[str]:
    return sorted(p.stem for p in MODEL_DIR.glob("*.yaml"))


def read_model_file(name: str) -> dict[str, Any]:
    import yaml

    path = MODEL_DIR / f"{name}.yaml"
    if not path.is_file():
        raise GlmsnakeError(
            f"model: {name!r} names no model file",
            f"use one of {model_names() + [FROM_HF]} (files in {MODEL_DIR}), or write the MODEL args inline",
        )
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        raise GlmsnakeError(f"{path} does not hold a mapping of MODEL args", "write one `flag_name: value` per line")
    return data


def resolve_model(model: Any, weights_source: str | None, config_json: Callable[[], Path | None]) -> Any:
    """The MODEL args mapping a preset's `model:` stands for (a mapping is returned as it is).
    `config_json` finds the weights' config.json; it is called only for `from_hf`."""
    if not isinstance(model, str):
        return model
    if model != FROM_HF:
        return read_model_file(model)
    path = config_json()
    if path is None:
        raise GlmsnakeError(
            f"model: from_hf with weights {weights_source!r}: there is no config.json to read",
            "from_hf needs `local:` or `hf://` weights; the embedded tiny weights are made from a model file (model: tiny-glm4moe)",
        )
    if not path.is_file():
        raise GlmsnakeError(f"model: from_hf: {path} does not exist", "point weights.source at an HF checkpoint folder")
    return model_args_from_config(path)


def model_args_from_config(path: Path) -> dict[str, Any]:
    from glmsnake import architectures

    try:
        cfg = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise GlmsnakeError(f"model: from_hf cannot read {path} ({e})", "point the weights at an HF checkpoint folder") from None
    try:
        return architectures.of_hf_config(cfg, str(path)).model_args(cfg)
    except (KeyError, TypeError, ValueError) as e:
        raise GlmsnakeError(f"model: from_hf: {path} lacks a field its architecture needs ({e})",
                            "check that config.json is a complete HF config") from None


def hub_config(source: str, cache_dir: Path) -> Path:
    """config.json of an `hf://` model at its revision, fetched once into `cache_dir`."""
    from glmsnake import atomic, hub

    src = hub.HubSource.parse(source)
    cached = Path(cache_dir) / f"{src.repo_id.replace('/', '--')}@{src.revision}.config.json"
    if cached.is_file():
        return cached
    from huggingface_hub import hf_hub_download

    try:
        commit, _ = hub.hub_files(src, ["config.json"])  # names a missing repo or revision plainly
        got = hf_hub_download(src.repo_id, "config.json", revision=commit, endpoint=hub.hub_endpoint(),
                              cache_dir=str(Path(cache_dir) / ".hub"))
    except GlmsnakeError as e:
        raise GlmsnakeError(f"model: from_hf could not fetch config.json of {source}: {e.problem}", e.fix) from None
    except Exception as e:  # network and hub errors: the message says what happened
        raise GlmsnakeError(f"model: from_hf could not fetch config.json of {source}: {e}",
                            "check the network and HF_ENDPOINT, or point weights at a `local:` folder") from None
    cached.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_bytes(cached, Path(got).read_bytes())
    return cached
