"""`glmsnake verify [target]`: re-hash every output against what its sentinel recorded.

Each finished output's sentinel lists its files with sizes and sha256 (glmsnake.contents); this
reads them all again and names every file that is missing or differs, with the rule that makes
it again. Exit code 1 when anything differs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from glmsnake import atomic, contents
from glmsnake.config import Workflow
from glmsnake.errors import GlmsnakeError

TARGETS = ("weights", "torch_dist", "fp8", "train", "export")


@dataclass(frozen=True)
class Output:
    target: str
    rule: str
    sentinel: Path
    field: str  # where the sentinel records the contents
    folder_field: str | None = None  # the folder, when the sentinel names it (a run's final checkpoint)
    folder: Path | None = None


def outputs(wf: Workflow) -> list[Output]:
    p = wf.paths
    out = [
        Output("weights", "download_hf", p.hf_manifest, "files", folder=p.hf_dir),
        Output("torch_dist", "convert_torch_dist", p.torch_dist_sentinel, "contents", folder=p.torch_dist_dir),
        Output("fp8", "convert_fp8", p.fp8_sentinel, "contents", folder=p.fp8_dir),
    ]
    for run in wf.runs:
        r = p.run(run)
        out.append(Output("train", "train_run", r.sentinel, "final_checkpoint_contents", "final_checkpoint"))
        out.append(Output("export", "export_hf", r.hf_sentinel, "contents", folder=r.hf))
    return out


def verify(wf: Workflow, target: str | None = None) -> int:
    if target is not None and target not in TARGETS:
        raise GlmsnakeError(f"no target {target!r}", f"choose one of {list(TARGETS)}, or none for all")
    bad = 0
    for o in outputs(wf):
        if target and o.target != target:
            continue
        if not o.sentinel.is_file():
            print(f"{o.target:10s} not made yet ({o.sentinel})")
            continue
        record = atomic.read_json(o.sentinel)
        recorded = record.get(o.field)
        folder = Path(record[o.folder_field]) if o.folder_field else o.folder
        if recorded is None:
            print(f"{o.target:10s} {folder}: its sentinel records no contents (made by an older glmsnake)")
            continue
        problems = contents.differences(folder, recorded, full=True)
        if problems:
            bad += 1
            print(f"{o.target:10s} {folder}: {len(problems)} of {len(recorded)} files differ from when it was made")
            for line in problems:
                print(f"    {line}")
            print(f"    fix: snakemake --profile <profile> --forcerun {o.rule} all  (regenerates it and what uses it)")
        else:
            print(f"{o.target:10s} {folder}: {len(recorded)} files as made")
    return 1 if bad else 0
