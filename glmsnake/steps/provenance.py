"""`provenance`: one HTML page of where every output came from, for `snakemake --report`.

Read from the sentinels each step wrote last: when, how long, on which Slurm job and nodes, with
which settings (their hash) and package versions. Nothing is recomputed and no payload is read.
"""

from __future__ import annotations

import hashlib
import html
import json
from pathlib import Path
from typing import Any

from glmsnake import atomic
from glmsnake.config import Workflow


def sentinels(wf: Workflow) -> list[tuple[str, Path]]:
    p = wf.paths
    out = [("download_hf", p.hf_manifest), ("convert_torch_dist", p.torch_dist_sentinel), ("convert_fp8", p.fp8_sentinel)]
    for run in wf.runs:
        out += [(f"train_run [{run}]", p.run(run).sentinel), (f"export_hf [{run}]", p.run(run).hf_sentinel)]
    return out


def row(step: str, record: dict[str, Any]) -> dict[str, str]:
    job = record.get("job") or {}
    slurm = record.get("slurm_job_id") or job.get("slurm_job_id")
    nodes = job.get("nodes") or record.get("slurm_nodelist") or []
    settings = json.dumps(record.get("settings", {}), sort_keys=True).encode()
    versions = record.get("versions") or {"glmsnake": record.get("glmsnake_version", "")}
    return {
        "step": step,
        "written": record.get("written_at", ""),
        "seconds": f"{record['seconds']:.1f}" if isinstance(record.get("seconds"), (int, float)) else "",
        "Slurm job": str(slurm or "local"),
        "nodes": ", ".join(nodes) if isinstance(nodes, list) else str(nodes),
        "settings hash": record.get("config_hash") or hashlib.sha256(settings).hexdigest()[:16],
        "versions": ", ".join(f"{k} {v}" for k, v in sorted(versions.items())),
    }


def page(rows: list[dict[str, str]], title: str) -> str:
    head = "".join(f"<th>{html.escape(k)}</th>" for k in rows[0]) if rows else ""
    body = "".join("<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in r.values()) + "</tr>" for r in rows)
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            "<style>body{font-family:sans-serif;font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px;"
            "text-align:left}table{border-collapse:collapse}</style></head>"
            f"<body><h3>{html.escape(title)}</h3><table><tr>{head}</tr>{body}</table></body></html>")


def provenance(wf: Workflow, output: Path) -> None:
    rows = [row(step, json.loads(path.read_text())) for step, path in sentinels(wf) if path.is_file()]
    atomic.write_bytes(Path(output), page(rows, f"provenance of {wf.base} (preset {wf.user.preset})").encode())
    print(f"[glmsnake] provenance of {len(rows)} step(s) written to {output}", flush=True)
