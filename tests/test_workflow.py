"""The DAG with real Snakemake runs: dry runs for both presets, lint, and staleness."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest

from conftest import REPO, run_local, snakemake

PRESETS = ["tiny", "tiny-mla", "glm4.7-355b-64xh100", "glm4.7-flash-8xh100", "glm4.7-flash-16xh100"]


def jobs_of(dry_run_output: str) -> dict[str, int]:
    """Snakemake's 'Job stats' table of a dry run: {rule: count}; {} when nothing is to be done."""
    if "Nothing to be done" in dry_run_output:
        return {}
    table = dry_run_output.split("Job stats:")[1].split("Reasons:")[0]
    return {m[0]: int(m[1]) for m in re.findall(r"^(\w+)\s+(\d+)$", table, re.M) if m[0] != "total"}


def reasons_of(dry_run_output: str, rule: str) -> list[str]:
    blocks = re.split(r"\n(?=\[.*\]\n(?:local)?rule )", dry_run_output)
    return [re.search(r"reason: (.*)", b).group(1) for b in blocks if re.search(rf"(?:local)?rule {rule}:", b)]


@pytest.mark.parametrize("preset", PRESETS)
def test_dry_run_of_train_lists_every_step_with_a_reason(tmp_path, preset):
    # The GPU presets train with slime, which runs only on the Slurm launcher.
    launcher = "launcher=slurm" if not preset.startswith("tiny") else "launcher=local"
    out = snakemake(tmp_path, "-n", "train", "--config", f"base_dir={tmp_path / 'base'}", f"preset={preset}",
                    launcher).stdout
    jobs = jobs_of(out)
    assert jobs == {"download_hf": 1, "download_dataset": 2, "convert_torch_dist": 1, "train_run": 1, "train": 1}
    name = {"tiny": "tiny-glm4moe", "tiny-mla": "tiny-glm4moe-lite", "glm4.7-355b-64xh100": "GLM-4.7-355B-A32B"}.get(preset, "GLM-4.7-Flash")
    assert reasons_of(out, "download_hf") == [f"Missing output files: {tmp_path / 'base'}/{name}/glmsnake.manifest.json"]
    assert not (tmp_path / "base").exists(), "a dry run writes nothing"


def test_fp8_rollout_makes_train_depend_on_fp8(tmp_path):
    out = snakemake(tmp_path, "-n", "train", "--config", f"base_dir={tmp_path / 'b'}", "preset=glm4.7-355b-64xh100",
                    "launcher=slurm",
                    "runs={r: {features: {fp8_rollout: true}}}").stdout
    assert jobs_of(out)["convert_fp8"] == 1


def test_slime_on_the_local_launcher_is_refused_before_any_job(tmp_path):
    out = snakemake(tmp_path, "-n", "train", "--config", f"base_dir={tmp_path / 'b'}", "preset=glm4.7-355b-64xh100",
                    check=False)
    assert out.returncode != 0
    assert "runs.default: train.backend slime runs slime's train.py on GPU nodes, but the launcher is 'local'" in out.stdout
    assert "fix: run with --profile slurm (launcher: slurm), or set train.backend: local" in out.stdout
    assert not (tmp_path / "b").exists()


def test_lint_reports_nothing(tmp_path):
    out = snakemake(tmp_path, "--lint").stdout
    assert "Lints for" not in out
    assert "Congratulations, your workflow is in a good condition!" in out


def test_rulegraph_renders(tmp_path):
    import subprocess

    dot = snakemake(tmp_path, "--rulegraph", "dot", "train", "--config", f"base_dir={tmp_path / 'b'}", merge_stderr=False).stdout
    assert "convert_torch_dist" in dot and "download_hf" in dot
    svg = subprocess.run(["dot", "-Tsvg"], input=dot, capture_output=True, text=True, check=True).stdout
    assert svg.startswith("<?xml") and "convert_torch_dist" in svg


# --------------------------------------------------------------------------- staleness on real runs


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """weights + torch_dist of the tiny preset, run for real once, with the local profile."""
    wd = tmp_path_factory.mktemp("wf")
    return wd, run_local(wd, "torch_dist")


def dry(wd: Path, base: Path, *targets_and_config: str) -> str:
    targets = [t for t in targets_and_config if "=" not in t]
    cfg = [c for c in targets_and_config if "=" in c]
    return snakemake(wd, "-n", *targets, "--config", f"base_dir={base}", *cfg).stdout


def test_rerun_does_nothing(converted):
    wd, base = converted
    sentinel = base / "tiny-glm4moe_torch_dist/glmsnake.done.json"
    before = sentinel.stat().st_mtime_ns
    out = snakemake(wd, "--profile", str(REPO / "profiles/local"), "torch_dist", "--config", f"base_dir={base}").stdout
    assert "Nothing to be done" in out
    assert sentinel.stat().st_mtime_ns == before


def test_parallelism_change_leaves_torch_dist_up_to_date(converted):
    wd, base = converted
    out = dry(wd, base, "torch_dist", "runs={default: {perf: {tensor_model_parallel_size: 2, expert_model_parallel_size: 2}}}")
    assert jobs_of(out) == {}
    out = dry(wd, base, "train", "runs={default: {perf: {tensor_model_parallel_size: 2}}}")
    assert "convert_torch_dist" not in jobs_of(out) and jobs_of(out)["train_run"] == 1


def test_writer_count_change_leaves_torch_dist_up_to_date(converted):
    wd, base = converted
    out = dry(wd, base, "torch_dist", "overrides={convert: {torch_dist: {writers_per_node: 4}}}")
    assert jobs_of(out) == {}


def test_architecture_change_reruns_torch_dist(converted):
    wd, base = converted
    out = dry(wd, base, "torch_dist", "overrides={model: {moe_router_topk: 4}}")
    # The tiny weights are generated from the architecture, so they are remade first.
    assert jobs_of(out) == {"download_hf": 1, "convert_torch_dist": 1, "torch_dist": 1}
    assert any("Params have changed" in r for r in reasons_of(out, "download_hf"))


def test_touching_a_shard_reruns_nothing(converted):
    wd, base = converted
    shard = base / "tiny-glm4moe/model-00001-of-00003.safetensors"
    t = time.time() + 5
    os.utime(shard, (t, t))
    assert jobs_of(dry(wd, base, "torch_dist")) == {}


def test_revision_change_reruns_the_weights_step(tmp_path, hub_server, tiny_hf):
    hub_server.add_repo("zai-org/Tiny-GLM", tiny_hf, branches={"main": "a" * 40, "v2": "b" * 40})
    env = {"HF_ENDPOINT": hub_server.url, "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(tmp_path / "hfhome")}
    base = tmp_path / "base"

    def run(rev: str, *flags: str):
        return snakemake(tmp_path, *flags, "--profile", str(REPO / "profiles/local"), "download_hf", "--config", f"base_dir={base}",
                         f"overrides={{weights: {{source: 'hf://zai-org/Tiny-GLM@{rev}'}}}}", env=env).stdout

    run("main")
    manifest = base / "tiny-glm4moe/glmsnake.manifest.json"
    assert json.loads(manifest.read_text())["commit"] == "a" * 40
    assert jobs_of(run("main", "-n")) == {}
    out = run("v2", "-n")
    assert jobs_of(out) == {"download_hf": 1} and any("Params have changed" in r for r in reasons_of(out, "download_hf"))
    run("v2")
    assert json.loads(manifest.read_text())["commit"] == "b" * 40


def test_plan_shows_allocations_and_snakemakes_reasons(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "glmsnake.cli", "plan", "train", "--configfile", str(REPO / "config/config.yaml"),
         "--snakemake-args", "-d", str(tmp_path), "--config", f"base_dir={tmp_path / 'b'}", "preset=glm4.7-355b-64xh100",
         "launcher=slurm"],
        capture_output=True, text=True, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "convert_torch_dist" in out and "2 x 8 GPU (submitit)" in out
    assert "train_run" in out and "8 x 8 GPU (submitit + Ray)" in out
    assert "Missing output files" in out
    assert not (tmp_path / "b").exists()


def test_a_local_dataset_fixed_in_place_is_copied_again(tmp_path):
    data = tmp_path / "my prompts.jsonl"
    data.write_text('{"prompt": "1+1=", "label": "3"}\n')
    base = tmp_path / "base"
    cfg = ["--config", f"base_dir={base}", f"overrides={{datasets: {{prompt: {{source: 'local:{data}'}}}}}}"]

    def run(*flags: str):
        return snakemake(tmp_path, *flags, "--profile", str(REPO / "profiles/local"), "weights", *cfg).stdout

    run()
    copy = base / "data/prompt.jsonl"
    assert copy.read_text() == data.read_text()
    assert jobs_of(run("-n")) == {}
    data.write_text('{"prompt": "1+1=", "label": "2"}\n')  # the fix, in place
    out = run("-n")
    assert jobs_of(out) == {"download_dataset": 1, "weights": 1}
    assert any("Params have changed" in r for r in reasons_of(out, "download_dataset"))
    run()
    assert json.loads(copy.read_text())["label"] == "2"
