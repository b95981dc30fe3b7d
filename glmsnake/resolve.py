"""From a config file to a checked `Workflow`: find, read, merge presets and runs, validate, check.

`load(user_config)` merges preset <- top-level overrides <- per-run overrides and returns a
`Workflow` whose every field is typed; then the parallel-layout checks run. Every problem
comes back as a `GlmsnakeError` naming the key and the fix, never a pydantic or YAML trace.

Steps get their config from the environment: the Snakefile exports the user config (and the
files it came from) in GLMSNAKE_CONFIG, so a step resolves the same Workflow on any node (the
slurm executor re-parses the Snakefile there with the same config), and says which in its log.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from glmsnake import REPO_ROOT, knobs
from glmsnake.config import RUN_KEYS, Preset, Run, UserConfig, Workflow
from glmsnake.errors import GlmsnakeError
from glmsnake.parallel_layout import check_workflow

PRESET_DIR = REPO_ROOT / "config" / "presets"
DEFAULT_CONFIG = REPO_ROOT / "config" / "config.yaml"


def find_config(path: str | Path | None) -> Path:
    """The config file a command uses: the one named, else ./config/config.yaml, else the repository's."""
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise GlmsnakeError(
                f"config file {p} does not exist (looked in {Path.cwd()})",
                f"pass --configfile PATH to a config.yaml, e.g. {DEFAULT_CONFIG}",
            )
        return p
    for candidate in (Path("config/config.yaml"), DEFAULT_CONFIG):
        if candidate.is_file():
            return candidate
    raise GlmsnakeError(
        f"no config/config.yaml here ({Path.cwd()}) nor in the repository ({DEFAULT_CONFIG})",
        "pass --configfile PATH, or run from a glmsnake checkout",
    )


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise GlmsnakeError(f"{where}: not valid YAML ({getattr(e, 'problem', None) or e})",
                            "fix the YAML syntax at that line") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise GlmsnakeError(f"{path} holds a {type(data).__name__}, not a mapping of keys",
                            "write the config as `key: value` lines")
    return data


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def read_preset(name: str) -> dict[str, Any]:
    path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        raise GlmsnakeError(
            f"unknown preset {name!r}",
            f"set `preset:` to one of {preset_names()} (files in {PRESET_DIR})",
        )
    return read_yaml(path)


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _pretty(err: ValidationError, where: str) -> GlmsnakeError:
    lines = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"{where}.{loc}: unknown key")
        else:
            lines.append(f"{where}.{loc}: {e['msg']} (got {e.get('input')!r})")
    return GlmsnakeError(
        "invalid configuration:\n  " + "\n  ".join(lines),
        "correct the keys named above in config/config.yaml (or the preset); "
        "`glmsnake render` shows the resolved recipe",
    )


def load(user_config: dict[str, Any] | None) -> Workflow:
    """Validate and resolve a user config (the dict Snakemake loaded from config/config.yaml)."""
    raw = dict(user_config or {})
    try:
        user = UserConfig.model_validate(raw)
    except ValidationError as e:
        raise _pretty(e, "config") from None
    preset_raw = deep_merge(read_preset(user.preset), user.overrides)
    try:
        preset = Preset.model_validate(preset_raw)
    except ValidationError as e:
        raise _pretty(e, f"preset[{user.preset}]+overrides") from None
    runs = {}
    for name, ov in user.runs.items():
        base = {k: preset_raw[k] for k in RUN_KEYS if k in preset_raw}
        try:
            runs[name] = Run.model_validate({"name": name, **deep_merge(base, ov)})
        except ValidationError as e:
            raise _pretty(e, f"runs.{name}") from None
    wf = Workflow(user=user, preset=preset, runs=runs)
    check_workflow(wf)
    return wf


def load_file(path: str | Path, extra: dict[str, Any] | None = None) -> Workflow:
    return load(deep_merge(read_yaml(Path(path)), extra or {}))


def export_to_env(config: dict[str, Any], files: list[str]) -> None:
    """Called by the Snakefile: the config its steps resolve, with the files it was read from."""
    os.environ[knobs.CONFIG.name] = json.dumps({"files": [str(f) for f in files], "config": config})


def from_env() -> tuple[Workflow, str]:
    """The Workflow the Snakefile exported, and a line saying where its config came from."""
    raw = knobs.CONFIG.raw()
    if not raw:
        raise GlmsnakeError(
            f"`glmsnake step` found no config: {knobs.CONFIG.name} is not set (the Snakefile sets it)",
            "run steps through Snakemake, e.g. `snakemake --profile profiles/local train`",
        )
    doc = json.loads(raw)
    wf = load(doc["config"])
    files = ", ".join(doc.get("files") or []) or "(none)"
    return wf, f"[glmsnake] config: {files}; preset {wf.user.preset}, launcher {wf.user.launcher}, base_dir {wf.base}"


def user_config_schema() -> dict[str, Any]:
    """JSON schema of config/config.yaml, for Snakemake's validate()."""
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **UserConfig.model_json_schema()}
