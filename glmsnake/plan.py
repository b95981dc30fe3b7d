"""`glmsnake plan`: per step, its allocation, its output, and whether and why it will run.

Whether and why come from Snakemake's own dry run (its `reason:` lines), so the
plan can never disagree with what `snakemake` would do.
"""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from glmsnake import REPO_ROOT, config, resolve
from glmsnake.errors import GlmsnakeError
from glmsnake.resources.report import run_of


@dataclass
class PlannedJob:
    rule: str
    outputs: list[str] = field(default_factory=list)
    reason: str = ""
    wildcards: str = ""


def parse_dry_run(text: str) -> list[PlannedJob]:
    """The jobs of a `snakemake -n` listing, with their outputs and reasons."""
    jobs: list[PlannedJob] = []
    for line in text.splitlines():
        m = re.match(r"^(?:local)?rule (\w+):$", line.strip())
        if m:
            jobs.append(PlannedJob(m.group(1)))
            continue
        if not jobs:
            continue
        key, _, value = line.strip().partition(": ")
        if key == "output":
            jobs[-1].outputs = [v.strip() for v in value.split(",")]
        elif key == "reason":
            jobs[-1].reason = value
        elif key == "wildcards":
            jobs[-1].wildcards = value
    return jobs


def allocation_of(wf: config.Workflow, rule: str, wildcards: str) -> str:
    if rule == "convert_torch_dist":
        a = wf.preset.convert.torch_dist.allocation
        return f"{a.nodes} x {a.gpus_per_node} GPU (submitit)"
    if rule == "train_run":
        run = run_of(wildcards)
        a = wf.runs[run].train.allocation if run in wf.runs else wf.preset.train.allocation
        return f"{a.nodes} x {a.gpus_per_node} GPU (submitit + Ray)"
    if rule == "convert_fp8" and wf.preset.convert.fp8.device != "cpu":
        return "1 x 1 GPU"
    return "1 node, CPU"


def plan(targets: list[str], configfile: Path, snakemake_args: list[str]) -> tuple[config.Workflow, list[PlannedJob]]:
    wf = resolve.load_file(configfile, _config_overrides(snakemake_args))
    # The repository's Snakefile, from any directory, run in the config's project folder: where
    # `snakemake` itself runs, so the plan reads the same .snakemake metadata.
    cmd = [sys.executable, "-m", "snakemake", "-n", *targets, "--snakefile", str(REPO_ROOT / "Snakefile"),
           "--configfile", str(Path(configfile).absolute()), *snakemake_args]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=resolve.project_dir(configfile))
    if proc.returncode != 0:
        out = proc.stdout + proc.stderr
        if "glmsnake: error: " in out:  # the Snakefile refused the config: its problem and fix, as they are
            raise GlmsnakeError(out.split("glmsnake: error: ", 1)[1].strip())
        missing = re.search(r"No rule to produce (\S+)", out)
        if missing:
            raise GlmsnakeError(f"no step makes {missing.group(1)!r}",
                                "name a target rule (all, weights, torch_dist, fp8, train) or an output path under base_dir")
        raise GlmsnakeError(f"snakemake dry run failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}", "fix the error above")
    return wf, parse_dry_run(proc.stdout + proc.stderr)


def _config_overrides(snakemake_args: list[str]) -> dict:
    """`--config k=v ...` as Snakemake reads it (values parsed as YAML), so the plan shows the same config."""
    import yaml

    out, inside = {}, False
    for arg in snakemake_args:
        if arg == "--config":
            inside = True
        elif arg.startswith("-"):
            inside = False
        elif inside and "=" in arg:
            key, value = arg.split("=", 1)
            out[key] = yaml.safe_load(value)
    return out


def print_plan(result: tuple[config.Workflow, list[PlannedJob]]) -> None:
    from rich.console import Console
    from rich.table import Table

    from glmsnake.resources import planner
    from glmsnake.resources.report import step_needs

    wf, jobs = result
    resources = planner.plan_resources(wf)
    table = Table(title=f"glmsnake plan (preset {wf.user.preset}, base {wf.base})")
    for col in ("step", "runs on", "needs (estimate)", "output", "will run because"):
        table.add_column(col, overflow="fold")
    steps = [j for j in jobs if j.outputs]
    for j in steps:
        name = j.rule + (f" [{j.wildcards}]" if j.wildcards else "")
        table.add_row(name, allocation_of(wf, j.rule, j.wildcards), step_needs(wf, j.rule, j.wildcards, resources),
                      "\n".join(_short(o, wf.base) for o in j.outputs), j.reason)
    if not steps:
        table.add_row("(nothing)", "", "", "all outputs are present and up to date")
    console = Console(width=160)
    console.print(table)
    console.print("Steps not listed are up to date (or not needed for the targets). "
                  "`glmsnake plan --resources --explain` shows every estimate and its inputs.")
    for f in resources.findings:
        console.print(f"{f.level}: {f.text()}", highlight=False, soft_wrap=True)


def _short(path: str, base: Path) -> str:
    return path.replace(str(base), "<base>")
