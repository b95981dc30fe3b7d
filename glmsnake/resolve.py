"""From a config file to a checked `Workflow`: find, read, merge presets and runs, validate, check.

`load(user_config)` merges preset <- top-level overrides <- per-run overrides and returns a
`Workflow` whose every field is typed; then the parallel-layout checks run. Every problem
comes back as a `GlmsnakeError` naming the key and the fix, never a pydantic or YAML trace.

Steps get their config from the environment: the Snakefile exports the user config (and the
files it came from) in GLMSNAKE_CONFIG, so a step resolves the same Workflow on any node (the
slurm executor re-parses the Snakefile there with the same config), and says which in its log.

A relative base_dir starts at the config file's project folder (`project_dir`): the folder
that holds `config/config.yaml`, or the folder of a config file kept anywhere else. So
`glmsnake status`, `plan` and `snakemake` agree on base_dir from whatever directory they run.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from glmsnake import REPO_ROOT, knobs, model_files
from glmsnake.config import RUN_KEYS, Preset, Run, UserConfig, Workflow
from glmsnake.errors import GlmsnakeError, refused_without_traceback
from glmsnake.inputs import input_problems
from glmsnake.parallel_layout import check_launcher, workflow_problems
from glmsnake.resources import planner

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


def project_dir(config_file: str | Path) -> Path:
    """Where a relative base_dir starts: the folder above `config/` for `<project>/config/x.yaml`
    (the Snakemake layout), else the config file's own folder."""
    folder = Path(config_file).expanduser().absolute().parent
    return folder.parent if folder.name == "config" else folder


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise GlmsnakeError(f"cannot read config file {path}: {e.strerror}",
                            "pass --configfile PATH to a readable config.yaml") from None
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


def read_preset(name: str, _seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """A preset file; one with `extends: other` is the other preset with its own keys merged on top."""
    path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        raise GlmsnakeError(
            f"unknown preset {name!r}" + (f" (extended by {_seen[-1]})" if _seen else ""),
            f"set `preset:` to one of {preset_names()} (files in {PRESET_DIR})",
        )
    data = read_yaml(path)
    base = data.pop("extends", None)
    if base is None:
        return data
    if base in _seen + (name,):
        raise GlmsnakeError(f"preset {name!r} extends {base!r}, which extends it back", "break the circle of `extends:`")
    parent = read_preset(str(base), _seen + (name,))
    if isinstance(data.get("model"), dict) and isinstance(parent.get("model"), str) and parent["model"] != model_files.FROM_HF:
        parent["model"] = model_files.read_model_file(parent["model"])  # so the child's keys merge onto the file's
    return deep_merge(parent, data)


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def with_model(preset_file: dict[str, Any], user: UserConfig, origin: Path | None) -> dict[str, Any]:
    """The preset merged with the user's overrides, its `model:` resolved to MODEL args: a model
    file's name is read before the overrides' own `model:` keys are merged onto it, `from_hf`
    reads the weights' config.json (see model_files)."""
    overrides = dict(user.overrides)
    over_model = overrides.pop("model", None)
    merged = deep_merge(preset_file, overrides)

    def resolve(model: Any) -> Any:
        return model_files.resolve_model(model, merged.get("weights", {}).get("source"), lambda: _weights_config(merged, user, origin))

    if over_model is not None and not isinstance(over_model, dict):
        model = resolve(over_model)  # a whole other model: the preset's own is never read
    else:
        model = resolve(preset_file.get("model"))
        if isinstance(over_model, dict) and isinstance(model, dict):
            model = deep_merge(model, over_model)
    merged["model"] = model
    return merged


def _weights_config(preset: dict[str, Any], user: UserConfig, origin: Path | None) -> Path | None:
    """The config.json `model: from_hf` reads: the `local:` folder's, the downloaded one's, or the hub's."""
    source = str(preset.get("weights", {}).get("source", ""))
    start = origin or Path.cwd()
    if source.startswith("local:"):
        return start / Path(source.removeprefix("local:")).expanduser() / "config.json"
    if not source.startswith("hf://"):
        return None
    base = Path(os.path.normpath(start / Path(user.base_dir).expanduser()))
    downloaded = base / str(preset.get("model_name", "")) / "config.json"
    return downloaded if downloaded.is_file() else model_files.hub_config(source, base / ".hub-configs")


def _pretty(err: ValidationError, where: str) -> GlmsnakeError:
    lines = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"{where}.{loc}: unknown key")
        elif isinstance(e.get("input"), dict):  # a whole section: too long to echo, and it may hold a secret
            lines.append(f"{where}.{loc}: {e['msg']}")
        else:
            lines.append(f"{where}.{loc}: {e['msg']} (got {e.get('input')!r})")
    return GlmsnakeError(
        "invalid configuration:\n  " + "\n  ".join(lines),
        "correct the keys named above in config/config.yaml (or the preset); "
        "`glmsnake render` shows the resolved recipe",
    )


def load(user_config: dict[str, Any] | None, config_file: str | Path | None = None) -> Workflow:
    """Validate and resolve a user config (the dict Snakemake loaded from config/config.yaml).

    `config_file` is where it came from: a relative base_dir starts at its project_dir (else the cwd).
    """
    raw = dict(user_config or {})
    try:
        user = UserConfig.model_validate(raw)
    except ValidationError as e:
        raise _pretty(e, "config") from None
    origin = project_dir(config_file) if config_file is not None else None
    preset_raw = with_model(read_preset(user.preset), user, origin)
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
    wf = Workflow(user=user, preset=preset, runs=runs, project_dir=origin)
    problems = workflow_problems(wf) + [f"{p}\n    fix: {f}" for p, f in input_problems(wf)]
    if problems:
        raise GlmsnakeError("impossible configuration:\n  " + "\n  ".join(problems), "see each fix above")
    return wf


def load_file(path: str | Path, extra: dict[str, Any] | None = None) -> Workflow:
    return load(deep_merge(read_yaml(Path(path)), extra or {}), path)


def check_yaml_file(path: str | Path) -> None:
    """Before Snakemake reads a config file: its own YAML error names neither the file nor the line."""
    with refused_without_traceback():
        if Path(path).is_file():
            read_yaml(Path(path))


def for_snakefile(config: dict[str, Any], configfiles: list) -> Workflow:
    """The Snakefile's Workflow: every check that needs no GPU, then the config exported to its steps.

    Snakemake lists a `--configfile` before the Snakefile's own `configfile:`; the first names
    the project. A user mistake exits with its problem and fix, without a traceback.
    """
    files = [Path(f).absolute() for f in configfiles]
    with refused_without_traceback():
        wf = load(config, files[0] if files else None)
        check_launcher(wf)  # slime on the local launcher: refused before the first download
        # Once, in the main process: jobs (re-parsing the Snakefile on a node) run what it accepted.
        if not os.environ.get(knobs.CONFIG.name):
            refuse_over_budget(wf)
    export_to_env(config, files)
    return wf


def refuse_over_budget(wf: Workflow) -> None:
    """A run whose estimated GPU, rollout or host memory exceeds the hardware is refused with its fixes;
    above 90% is a warning. (Inspecting commands, `status`, `verify`, `plan --resources`, never refuse.)"""
    findings = planner.config_findings(wf)
    warn(f for f in findings if f.level == "warning")
    errors = [f.text() for f in findings if f.level == "error"]
    if errors:
        raise GlmsnakeError("impossible configuration:\n  " + "\n  ".join(errors), "see each fix above")


def warn(findings) -> None:
    for f in findings:
        print(f"glmsnake: warning: {f.text()}", file=sys.stderr, flush=True)


def check_base_dir_room(wf: Workflow, jobs) -> None:
    """Before a workflow runs `jobs` (Snakemake's, not in a dry run): room under base_dir for what they write."""
    running = {(job.rule.name, job.wildcards_dict.get("run")) for job in jobs}
    findings = planner.base_dir_findings(wf, running)
    warn(f for f in findings if f.level == "warning")
    errors = [f.text() for f in findings if f.level == "error"]
    if errors:
        raise GlmsnakeError("not enough disk for this workflow:\n  " + "\n  ".join(errors), "see each fix above")


def export_to_env(config: dict[str, Any], files: list) -> None:
    """The config the Snakefile's steps resolve, with the files it was read from (absolute)."""
    os.environ[knobs.CONFIG.name] = json.dumps({"files": [str(Path(f).absolute()) for f in files], "config": config})


def from_env() -> tuple[Workflow, str]:
    """The Workflow the Snakefile exported, and a line saying where its config came from."""
    raw = knobs.CONFIG.raw()
    if not raw:
        raise GlmsnakeError(
            f"`glmsnake step` found no config: {knobs.CONFIG.name} is not set (the Snakefile sets it)",
            "run steps through Snakemake, e.g. `snakemake --profile profiles/local train`",
        )
    doc = json.loads(raw)
    files = doc.get("files") or []
    wf = load(doc["config"], files[0] if files else None)
    files = ", ".join(files) or "(none)"
    return wf, f"[glmsnake] config: {files}; preset {wf.user.preset}, launcher {wf.user.launcher}, base_dir {wf.base}"


def user_config_schema() -> dict[str, Any]:
    """JSON schema of config/config.yaml, for Snakemake's validate()."""
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **UserConfig.model_json_schema()}
