"""How long `snakemake -n train` takes for the 64xH100 preset: all outputs present vs none.

With every output present, the HF folder and the torch_dist folder hold 700 GB of
sparse files; if a dry run read checkpoint payloads it would take minutes, so the
two timings staying close (goal: within 1.5x) shows it reads only sentinels.

    python benchmarks/dryrun.py [--repeat 3] [--gb 700]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PRESET = "glm4.7-355b-64xh100"


def sparse(path: Path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.truncate(size)


def populate(base: Path, total_gb: int) -> int:
    """Every output of the DAG, with checkpoint payloads as sparse files; returns apparent bytes."""
    sys.path.insert(0, str(REPO))
    from glmsnake import resolve

    wf = resolve.load({"preset": PRESET, "base_dir": str(base)})
    shards, total = 92, total_gb << 30
    per = total // (2 * shards)
    for i in range(shards):
        sparse(wf.paths.hf_dir / f"model-{i + 1:05d}-of-{shards:05d}.safetensors", per)
        sparse(wf.paths.torch_dist_dir / "release" / f"__{i}_0.distcp", per)
    # Sentinels in DAG order, so mtimes say "up to date".
    for path in [wf.paths.hf_dir / "glmsnake.manifest.json", *(wf.paths.dataset(n) for n in wf.preset.datasets),
                 wf.paths.torch_dist_dir / "glmsnake.done.json", wf.paths.fp8_dir / "glmsnake.done.json",
                 *(wf.paths.run(r).root / "glmsnake.done.json" for r in wf.runs), *(wf.paths.run(r).root / "hf" / "glmsnake.done.json" for r in wf.runs)]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("{}\n")
        time.sleep(0.01)
    return 2 * shards * per


def time_dry_run(workdir: Path, base: Path) -> float:
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir), "--configfile",
           str(REPO / "config/config.yaml"), "-n", "train", "--config", f"base_dir={base}", f"preset={PRESET}", "launcher=slurm"]
    t = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--gb", type=int, default=700)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        full, empty = tmp / "full", tmp / "empty"
        apparent = populate(full / "base", args.gb)
        empty.mkdir()
        os.sync()
        t_full, t_empty = [], []
        for _ in range(args.repeat):  # interleaved, so machine noise hits both alike
            t_full.append(time_dry_run(full, full / "base"))
            t_empty.append(time_dry_run(empty, empty / "base"))
    f, e = statistics.median(t_full), statistics.median(t_empty)
    print(f"snakemake -n train, preset {PRESET}, median of {args.repeat}:")
    print(f"  every output present ({apparent / 2**30:.0f} GiB of sparse shards): {f:.2f} s")
    print(f"  nothing present:                                      {e:.2f} s")
    print(f"  ratio present/empty: {f / e:.2f}x (goal <= 1.5x)")


if __name__ == "__main__":
    main()
