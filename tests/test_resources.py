"""The resource planner: its GPU model against H200 measurements, its verdicts, and its fixes.

The measurements (tests/fixtures/gpu_memory_h200.json) come from tests/gpu/memory_probe.py on
an H200 with megatron-core 0.19.2; the predictions recorded beside them
(gpu_memory_predictions.json, `benchmarks/planner_accuracy.py --record`) pin the planner: a change
to its arithmetic shows up here and must be re-recorded on purpose.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO, snakemake
from glmsnake import resolve, staleness
from glmsnake.errors import GlmsnakeError
from glmsnake.resources import planner
from glmsnake.resources.shapes import ModelShape, TrainLayout
from glmsnake.resources.training import CONTEXT_BYTES, peak_allocated, training_estimates

FIXTURES = REPO / "tests" / "fixtures"
MEASURED = json.loads((FIXTURES / "gpu_memory_h200.json").read_text())
RECORDED = json.loads((FIXTURES / "gpu_memory_predictions.json").read_text())
BIG = "glm4.7-355b-64xh100"


def big(**overrides) -> dict:
    return {"preset": BIG, "launcher": "slurm", **overrides}


def refusal(cfg: dict) -> str:
    """What a workflow that is about to run (the Snakefile, `glmsnake render`) says of this config."""
    wf = resolve.load(cfg)  # loading alone never refuses a budget: status, verify and plan still work
    with pytest.raises(GlmsnakeError) as e:
        resolve.refuse_over_budget(wf)
    return str(e.value)


# ------------------------------------------------------------------ the GPU model, measured


def test_the_measurements_cover_what_the_planner_must_predict():
    probes = [e["probe"] for e in MEASURED["results"].values()]
    assert MEASURED["device"] == "NVIDIA H200" and MEASURED["versions"]["megatron-core"] == "0.19.2"
    assert len(probes) >= 6
    assert {p["num_experts"] > 0 for p in probes} == {True, False}  # dense and MoE
    assert {p["recompute"] for p in probes} == {"none", "selective", "full"}
    assert {p["mtp_num_layers"] for p in probes} == {0, 1}
    assert min(p["seq_length"] for p in probes) == 2048 and max(p["seq_length"] for p in probes) == 16384
    sizes = [e["params"] for e in MEASURED["results"].values()]
    assert min(sizes) * 2 < 1e9 and max(sizes) > 4e9  # under 1 GB of bf16 weights, up to ~5 B parameters


@pytest.mark.parametrize("name", sorted(MEASURED["results"]))
def test_prediction_is_within_15_percent_of_the_h200_and_as_recorded(name):
    e = MEASURED["results"][name]
    shape, lay = ModelShape.of_probe(e["probe"]), TrainLayout.of_probe(e["probe"])
    assert shape.parameters() == e["params"]  # the planner counts the parameters megatron-core built
    predicted = peak_allocated(shape, lay)
    measured = max(e["peak_fwd_bwd"], e["peak_optimizer"])
    assert abs(predicted - measured) / measured < 0.15, (predicted, measured)
    assert predicted == pytest.approx(RECORDED[name], rel=1e-9), "re-record: benchmarks/planner_accuracy.py --record"
    assert e["context"] == pytest.approx(CONTEXT_BYTES, rel=0.02)  # the per-GPU constant is the one measured


def test_stages_differ_embedding_first_logits_and_mtp_last():
    wf = resolve.load(big())
    run = wf.runs["default"]
    first, middle, last = training_estimates(ModelShape.of(wf.preset.model), TrainLayout.of(wf.preset, run))
    assert [e.what for e in (first, middle, last)] == [f"training GPU, {s} stage" for s in ("first", "middle", "last")]
    names = lambda e: {t.name for t in e.terms}  # noqa: E731
    assert "fp32 logits at the loss" in names(last) and "fp32 logits at the loss" not in names(first)
    assert "embedding" in first.terms[0].how and "MTP" in last.terms[0].how
    in_flight = [t.how for e in (first, middle, last) for t in e.terms if t.name == "activations kept"]
    assert ["4 micro-batch" in in_flight[0], "3 micro-batch" in in_flight[1], "1 micro-batch" in in_flight[2]] == [True] * 3


def test_the_seed_recipe_fits_64_h100s_with_room():
    plan = planner.plan_resources(resolve.load(big()))
    used, worst = planner.training_peak(plan.runs["default"])
    assert 0.3 < used / (79.6 * 2**30) < 0.8  # CPU Adam and full recompute: about half of an H100
    assert plan.runs["default"].host.total < 2048 * 2**30
    assert not [f for f in plan.findings if f.where.startswith("runs.")]


# ------------------------------------------------------------------ layouts that do not fit, and the fix


def test_pipeline_parallel_1_for_355b_is_refused_with_the_depth_that_fits():
    msg = refusal(big(runs={"default": {"perf": {"pipeline_model_parallel_size": 1}}}))
    assert "runs.default: training needs" in msg and "of a 79.6 GiB H100 80GB on the only stage" in msg
    assert "fix: pipeline parallel 4 (perf: pipeline_model_parallel_size 4)" in msg


def test_optimizer_on_the_gpu_is_refused_naming_cpu_offload():
    msg = refusal(big(runs={"default": {"optimizer": {"optimizer_cpu_offload": False}}}))
    assert "largest term: optimizer states" in msg
    assert "fix: turn on optimizer CPU offload" in msg


def test_no_recompute_is_refused_naming_full_recompute_and_fewer_tokens():
    msg = refusal(big(runs={"default": {"perf": {"recompute_granularity": None, "recompute_method": None,
                                                  "recompute_num_layers": None}}}))
    assert "largest term: activations kept" in msg
    assert "fix: full recompute instead of no recompute" in msg
    # A smaller max_tokens_per_gpu is no fix here: one 1024 + 32768-token sample over CP 2 is 16896 tokens on a
    # GPU whatever the cap (slime gives a longer sample a micro-batch of its own).
    assert "max_tokens_per_gpu" not in msg


def test_every_named_fix_really_fits():
    cfg = big(runs={"default": {"perf": {"pipeline_model_parallel_size": 1}}})
    assert "pipeline parallel 4" in refusal(cfg)
    cfg["runs"]["default"]["perf"]["pipeline_model_parallel_size"] = 4
    resolve.refuse_over_budget(resolve.load(cfg))  # the fix, applied, is accepted


def test_host_memory_over_the_node_is_refused_with_a_fix():
    msg = refusal(big(overrides={"hardware": {"host_memory_gib": 512}}))
    assert "a training node needs" in msg and "of host memory of 512.0 GiB" in msg
    assert "largest term: CPU-offloaded optimizer" in msg
    assert "fix: train.allocation.nodes 32 (the optimizer shards spread over more nodes)" in msg  # 16 is not enough
    resolve.refuse_over_budget(resolve.load(big(overrides={"hardware": {"host_memory_gib": 512}},
                                                runs={"default": {"train": {"allocation": {"nodes": 32}}}})))


def test_sglang_weights_beyond_mem_fraction_are_refused():
    msg = refusal(big(runs={"default": {"sglang": {"mem_fraction_static": 0.2}}}))
    assert "SGLang's weights need" in msg and "mem_fraction_static leaves" in msg
    assert "rollout_num_gpus_per_engine 64 (sglang)" in msg or "sglang mem_fraction_static 0.85" in msg


def test_allocation_wider_than_the_nodes_is_refused():
    with pytest.raises(GlmsnakeError) as e:  # a layout problem: refused when the config is read
        resolve.load(big(overrides={"hardware": {"gpus_per_node": 4}}))
    msg = str(e.value)
    assert "train.allocation asks for 8 GPUs a node, but the hardware has 4" in msg


def test_above_90_percent_is_a_warning_and_the_dry_run_goes_on(tmp_path):
    # The tiny model's estimate is a few hundred MB: a GPU just above it is over 90% full.
    wf = resolve.load({})
    used, _ = planner.training_peak(planner.plan_run(wf.preset, wf.runs["default"]))
    gib = used / 0.95 / 2**30
    out = snakemake(tmp_path, "-n", "train", "--config", f"base_dir={tmp_path / 'r'}",
                    f"overrides={{hardware: {{gpu_memory_gib: {gib:.4f}}}}}")
    assert "glmsnake: warning: runs.default: training needs" in out.stdout
    assert out.stdout.count("glmsnake: warning:") == 1  # once, not again for each job


def test_snakemake_refuses_a_layout_that_does_not_fit_before_anything_runs(tmp_path):
    wd = tmp_path / "wd"
    wd.mkdir()
    out = snakemake(wd, "-n", "train", "--config", f"base_dir={tmp_path / 'r'}", "overrides={hardware: {gpu_memory_gib: 0.1}}",
                    check=False)
    assert out.returncode == 2
    assert "runs.default: training needs" in out.stdout and "fix:" in out.stdout
    assert "Traceback" not in out.stdout
    assert not (tmp_path / "r").exists()


def test_disk_beyond_the_quota_stops_the_run_not_the_dry_run(tmp_path):
    quota = "overrides={hardware: {base_dir_quota_tib: 0.0000001}}"  # 110 KB: less than the tiny outputs
    base = tmp_path / "r"
    dry = snakemake(tmp_path, "-n", "all", "--config", f"base_dir={base}", quota)
    assert "not enough disk" not in dry.stdout
    out = snakemake(tmp_path, "--profile", str(REPO / "profiles/local"), "all", "--config", f"base_dir={base}", quota,
                    check=False)
    assert out.returncode != 0
    assert "base_dir: all outputs together need" in out.stdout and "more than the quota of 1e-07 TiB" in out.stdout
    assert "fix: base_dir needs" in out.stdout
    assert not list(base.glob("*/glmsnake.manifest.json"))  # nothing was downloaded


# ------------------------------------------------------------------ the command


def test_plan_resources_explain_shows_every_term_with_its_inputs():
    proc = subprocess.run([sys.executable, "-m", "glmsnake.cli", "plan", "--resources", "--explain", "--preset", BIG],
                          capture_output=True, text=True, cwd=REPO)
    out = proc.stdout
    for needle in ("training GPU memory per pipeline stage", "first stage", "middle stage", "last stage",
                   "gradient buffer", "4 B x parameters (fp32 accumulation)", "rollout GPU (SGLang)", "KV cache:",
                   "host memory of a node", "CPU-offloaded optimizer", "disk under", "run default: checkpoints",
                   "keep_checkpoints last 3", "conversion time (estimate)"):
        assert needle in out, needle
    # A machine without 20 TB free for the 355B outputs refuses that, and only that.
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert proc.returncode == (2 if errors else 0)
    assert all(e.startswith("error: base_dir: the outputs still to write") for e in errors), errors
    tiny = subprocess.run([sys.executable, "-m", "glmsnake.cli", "plan", "--resources", "--preset", "tiny"],
                          capture_output=True, text=True, cwd=REPO)
    assert tiny.returncode == 0 and "Every budget holds" in tiny.stdout, tiny.stdout + tiny.stderr


def test_plan_resources_exits_2_on_a_budget_it_cannot_keep(tmp_path):
    cfg = tmp_path / "config" / "config.yaml"
    cfg.parent.mkdir()
    cfg.write_text(f"preset: {BIG}\nlauncher: slurm\nbase_dir: {tmp_path / 'r'}\n"
                   "overrides: {hardware: {base_dir_quota_tib: 1}}\n")
    proc = subprocess.run([sys.executable, "-m", "glmsnake.cli", "plan", "--resources", "--configfile", str(cfg)],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2
    assert "base_dir: all outputs together need" in proc.stdout and "more than the quota of 1 TiB" in proc.stdout
    assert "keep_checkpoints" not in proc.stdout  # two 5 TB checkpoints do not fit 1 TiB either: not offered


def test_plan_names_what_each_step_needs(tmp_path):
    from glmsnake.resources.report import step_needs

    wf = resolve.load({"base_dir": str(tmp_path / "r")})
    plan = planner.plan_resources(wf)
    needs = {rule: step_needs(wf, rule, wc, plan) for rule, wc in (
        ("download_hf", ""), ("convert_torch_dist", ""), ("convert_fp8", ""), ("train_run", "run=default"),
        ("export_hf", "run=default"), ("download_dataset", "name=prompt"))}
    assert needs["download_hf"].startswith("disk ") and "KiB" in needs["download_hf"]
    assert needs["convert_torch_dist"].startswith("disk ") and needs["convert_torch_dist"].endswith(" s")
    assert needs["convert_fp8"].startswith("disk ") and needs["convert_fp8"].endswith(" s")
    assert needs["train_run"].startswith("GPU ") and "of 79.6 GiB" in needs["train_run"]
    assert "only stage" in needs["train_run"] and "checkpoints" in needs["train_run"]
    assert needs["export_hf"] == needs["download_hf"]  # the export is the input's size
    assert needs["download_dataset"] == ""
    proc = subprocess.run([sys.executable, "-m", "glmsnake.cli", "plan", "all"], capture_output=True, text=True,
                          cwd=tmp_path, env={**__import__("os").environ, "COLUMNS": "250"})
    assert "needs (estimate)" in proc.stdout, proc.stdout + proc.stderr


def test_a_resumed_run_needs_room_only_for_the_checkpoints_it_does_not_have(tmp_path):
    from glmsnake.resources import storage

    wf = resolve.load({"base_dir": str(tmp_path)})
    one = storage.checkpoint_bytes(wf.preset.model, wf.runs["default"])
    running = {("train_run", "default")}
    _, fresh = storage.disk_estimate(wf, running)
    for i in (3, 7):
        (wf.paths.run("default").checkpoints / f"iter_{i:07d}").mkdir(parents=True)
    est, resumed = storage.disk_estimate(wf, running)
    assert fresh == pytest.approx(4 * one) and resumed == pytest.approx(2 * one)  # 3 kept + 1 being written, 2 there
    assert [t.name for t in est.terms] == ["run default: checkpoints"]  # only what the jobs about to run write


def test_checkpoints_held_count_milestones_and_the_last_save():
    from glmsnake.resources.storage import checkpoints_kept

    def held(n, interval, keep):
        return checkpoints_kept(resolve.load({"runs": {"r": {"rollout": {"num_rollout": n},
                                                              "train": {"save_interval": interval,
                                                                        "keep_checkpoints": keep}}}}).runs["r"])[0]

    assert held(3000, 20, {"last": 3, "every": 100}) == 3 + 1 + 30  # milestones every 100 rollouts: 30 of them
    assert held(3000, 20, {"last": 3, "every": 0}) == 4
    assert held(10, 4, None) == 3  # saves after rollouts 4 and 8, and the last one (10)
    assert held(2, 4, {"last": 3}) == 1  # a run shorter than the interval saves once


def test_changed_settings_need_room_again_for_every_checkpoint(tmp_path):
    from glmsnake.resources import storage
    from glmsnake.steps import lineage

    wf = resolve.load({"base_dir": str(tmp_path)})
    root = wf.paths.run("default").checkpoints
    for i in (3, 7):
        (root / f"iter_{i:07d}").mkdir(parents=True)
    one, running = storage.checkpoint_bytes(wf.preset.model, wf.runs["default"]), {("train_run", "default")}
    (root / lineage.RECORD).write_text(json.dumps({"key": staleness.train(wf, "default")}))
    assert storage.disk_estimate(wf, running)[1] == pytest.approx(2 * one)  # same settings: it resumes
    changed = resolve.load({"base_dir": str(tmp_path), "runs": {"default": {"optimizer": {"lr": 0.5}}}})
    assert storage.disk_estimate(changed, running)[1] == pytest.approx(4 * one)  # moved aside, kept: all again


def test_plan_resources_shows_a_run_that_does_not_fit_and_exits_2(tmp_path):
    cfg = tmp_path / "config" / "config.yaml"
    cfg.parent.mkdir()
    cfg.write_text(f"preset: {BIG}\nlauncher: slurm\nbase_dir: {tmp_path / 'r'}\n"
                   "runs: {default: {perf: {pipeline_model_parallel_size: 1}}}\n")
    proc = subprocess.run([sys.executable, "-m", "glmsnake.cli", "plan", "--resources", "--configfile", str(cfg)],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2, proc.stderr
    assert "only stage" in proc.stdout and "gradient buffer" in proc.stdout  # the tables, not a refusal
    assert "error: runs.default: training needs" in proc.stdout and "fix: pipeline parallel 4" in proc.stdout
    status = subprocess.run([sys.executable, "-m", "glmsnake.cli", "status", "--configfile", str(cfg)],
                            capture_output=True, text=True, cwd=REPO)
    assert status.returncode == 0, status.stderr  # inspecting is never refused
    render = subprocess.run([sys.executable, "-m", "glmsnake.cli", "render", "--configfile", str(cfg)],
                            capture_output=True, text=True, cwd=REPO)
    assert render.returncode == 2 and "fix: pipeline parallel 4" in render.stderr


def test_status_watch_needs_a_positive_interval():
    proc = subprocess.run([sys.executable, "-m", "glmsnake.cli", "status", "--watch", "-1"], capture_output=True,
                          text=True, cwd=REPO)
    assert proc.returncode == 2 and "'-1' is not a number of seconds of at least 0.1" in proc.stderr
    assert "Traceback" not in proc.stderr
