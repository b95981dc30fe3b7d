"""Config validation: presets, unknown keys, wrong types, impossible layouts — each error names the fix."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from glmsnake import config, resolve
from glmsnake.errors import GlmsnakeError
from conftest import REPO

RECIPE = "glm4.7-355b-64xh100"


def load_recipe(**run_overrides) -> config.Workflow:
    return resolve.load({"preset": RECIPE, "runs": {"r": run_overrides}})


def error_of(cfg: dict) -> str:
    with pytest.raises(GlmsnakeError) as e:
        resolve.load(cfg)
    return str(e.value)


def test_presets_load():
    assert resolve.preset_names() == ["glm4.7-355b-64xh100", "glm4.7-flash-16xh100", "glm4.7-flash-8xh100",
                                      "tiny", "tiny-mla"]
    tiny = resolve.load({})
    assert tiny.user.preset == "tiny" and tiny.preset.weights.source == "tiny"
    recipe = load_recipe()
    alloc = recipe.runs["r"].train.allocation
    assert (alloc.nodes, alloc.gpus_per_node) == (8, 8)
    assert recipe.preset.convert.torch_dist.allocation.nodes == 2
    # The conversion's allocation is the preset's shape: one node for the one-node Flash recipe.
    for preset, nodes in (("glm4.7-flash-8xh100", 1), ("glm4.7-flash-16xh100", 2)):
        wf = resolve.load({"preset": preset})
        assert wf.preset.convert.torch_dist.allocation.nodes == wf.runs["default"].train.allocation.nodes == nodes
        assert wf.preset.model.multi_latent_attention and wf.preset.model.num_layers == 47


def test_an_extending_preset_is_its_base_with_its_own_keys_on_top():
    mla, tiny = resolve.load({"preset": "tiny-mla"}), resolve.load({})
    assert mla.preset.model_name == "tiny-glm4moe-lite" and mla.preset.model.multi_latent_attention
    assert mla.preset.rollout == tiny.preset.rollout and mla.preset.train == tiny.preset.train
    flash16 = resolve.read_preset("glm4.7-flash-16xh100")
    assert flash16["perf"]["tensor_model_parallel_size"] == 4 and flash16["perf"]["expert_model_parallel_size"] == 8


def test_model_files_are_shared_and_overrides_merge_onto_them():
    """Presets name a model file; `overrides: {model: {...}}` changes single keys of it; an unknown
    name is refused with the list of model files."""
    wf = resolve.load({"preset": "tiny", "overrides": {"model": {"vocab_size": 256}}})
    assert wf.preset.model.vocab_size == 256 and wf.preset.model.num_layers == 3
    with pytest.raises(GlmsnakeError) as e:
        resolve.load({"preset": "tiny", "overrides": {"model": "glm5-745b"}})
    assert "model: 'glm5-745b' names no model file" in e.value.problem
    assert "glm4.7-30b-a3b" in e.value.fix and "from_hf" in e.value.fix


def test_cluster_quick_start_is_one_line():
    """The shipped config runs tiny; switching `preset:` alone gives the 64xH100 recipe."""
    import yaml

    user = yaml.safe_load((REPO / "config/config.yaml").read_text())
    assert user["preset"] == "tiny"
    wf = resolve.load({**user, "preset": RECIPE})
    assert wf.preset.model.num_layers == 92


def test_unknown_preset():
    msg = error_of({"preset": "glm5"})
    assert "unknown preset 'glm5'" in msg and f"set `preset:` to one of ['{RECIPE}', 'glm4.7-flash-16xh100', 'glm4.7-flash-8xh100', 'tiny', 'tiny-mla']" in msg


def test_unknown_key_top_level_and_nested():
    assert "config.presett: unknown key" in error_of({"presett": "tiny"})
    msg = error_of({"overrides": {"perf": {"tensor_parallel": 2}}})
    assert "perf.tensor_parallel: unknown key" in msg and "fix:" in msg


def test_wrong_type():
    msg = error_of({"runs": {"a": {"rollout": {"rollout_batch_size": "many"}}}})
    assert "runs.a.rollout.rollout_batch_size" in msg and "'many'" in msg


def test_per_run_key_that_is_not_per_run():
    msg = error_of({"runs": {"a": {"model": {"num_layers": 4}}}})
    assert "not per-run settings" in msg and "put model/weights/convert changes under overrides:" in msg


@pytest.mark.parametrize(
    "perf, expect",
    [
        ({"tensor_model_parallel_size": 5}, ["TP=5 does not divide the 96 attention heads", "TP=5 does not divide the 8 query groups", "set tensor_model_parallel_size to one of [1, 2, 4, 8]"]),
        ({"tensor_model_parallel_size": 16}, ["TP=16 does not divide the 8 query groups"]),
        ({"pipeline_model_parallel_size": 3}, ["TP x PP x CP = 8x3x2 = 48 does not divide the 64 actor GPUs", "TP x PP x CP x DP cannot equal 64"]),
        ({"expert_model_parallel_size": 7}, ["EP=7 does not divide the 160 experts", "set expert_model_parallel_size to one of [1, 2, 4, 5, 8, 10, 16, 20, 32, 40]"]),
        ({"expert_model_parallel_size": 32, "expert_tensor_parallel_size": 2}, ["EP x ETP = 32x2 = 64 does not divide the expert-parallel world of 16 GPUs per pipeline stage"]),
    ],
)
def test_impossible_perf_layouts(perf, expect):
    msg = error_of({"preset": RECIPE, "runs": {"r": {"perf": perf}}})
    for e in expect:
        assert e in msg


def test_pipeline_deeper_than_the_model():
    msg = error_of({"preset": "tiny", "runs": {"r": {"perf": {"pipeline_model_parallel_size": 4}}}})
    assert "PP=4 is more than the 3 layers" in msg and "set pipeline_model_parallel_size <= 3" in msg


def test_rollout_layouts():
    msg = error_of({"preset": RECIPE, "runs": {"r": {"sglang": {"rollout_num_gpus_per_engine": 48}}}})
    assert "rollout_num_gpus_per_engine=48 does not divide the 64 rollout GPUs" in msg
    msg = error_of({"preset": RECIPE, "runs": {"r": {"sglang": {"dp_size": 3}}}})
    assert "sglang dp_size=3 does not divide the 32 GPUs per rollout engine" in msg
    msg = error_of({"preset": RECIPE, "runs": {"r": {"sglang": {"ep_size": 64, "rollout_num_gpus_per_engine": 64}}}})
    assert "the 64 rollout GPUs of expert parallelism do not divide the 160 experts" in msg
    assert "add sglang ep_num_redundant_experts: 32 (--sglang-ep-num-redundant-experts)" in msg
    ok = load_recipe(sglang={"ep_size": 64, "rollout_num_gpus_per_engine": 64, "ep_num_redundant_experts": 32})
    assert ok.runs["r"].sglang.ep_num_redundant_experts == 32


def test_feature_combinations():
    msg = error_of({"preset": RECIPE, "overrides": {"model": {"mtp_num_layers": 0}},
                    "runs": {"r": {"features": {"mtp_training": True}}}})
    assert "features.mtp_training needs an MTP layer" in msg and "set model.mtp_num_layers: 1" in msg
    msg = error_of({"preset": RECIPE, "overrides": {"convert": {"fp8": {"strategy": "channel"}}}, "runs": {"r": {"features": {"fp8_rollout": True}}}})
    assert "FP8 rollout with DeepEP needs block FP8" in msg and "set convert.fp8.strategy: block" in msg


def test_all_problems_are_reported_at_once():
    msg = error_of({"preset": RECIPE, "runs": {"r": {"perf": {"tensor_model_parallel_size": 5, "expert_model_parallel_size": 7}}}})
    assert "TP=5" in msg and "EP=7" in msg


def test_time_shorter_than_the_step_minimum():
    msg = error_of({"preset": RECIPE, "runs": {"r": {"train": {"allocation": {"time_min": 10}}}}})
    assert "time_min=10 is shorter than this step's minimum of 30 minutes" in msg


def test_bad_fp8_block_size():
    msg = error_of({"overrides": {"convert": {"fp8": {"block_size": [128, 0]}}}})
    assert "block_size must be two positive integers" in msg


def test_schema_file_is_in_sync_and_validates():
    exported = json.loads((REPO / "config" / "config.schema.json").read_text())
    assert exported == json.loads(json.dumps(resolve.user_config_schema())), "run `glmsnake schema > config/config.schema.json`"


def test_bad_config_fails_before_any_job(tmp_path):
    """A Snakemake run with an impossible layout stops at parse time: no job, no output, the fix named."""
    base = tmp_path / "base"
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(tmp_path), "--configfile",
         str(REPO / "config/config.yaml"), "--cores", "1", "weights", "--config", f"base_dir={base}",
         "overrides={perf: {tensor_model_parallel_size: 3}}"],
        capture_output=True, text=True,
    )
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "TP=3 does not divide the 4 attention heads" in out and "fix:" in out
    assert not base.exists()


def test_slime_needs_a_final_checkpoint():
    msg = error_of({"preset": RECIPE, "runs": {"r": {"train": {"save_interval": 7}}}})
    assert "num_rollout=3000 is not a multiple of save_interval=7" in msg and "choose a save_interval that divides num_rollout" in msg


# The table of bad inputs, each run through the real workflow and CLI, is tests/test_bad_input.py.


def test_slime_on_the_local_launcher_is_refused_where_the_workflow_runs():
    from glmsnake.parallel_layout import check_launcher

    wf = resolve.load({"preset": RECIPE})  # render shows it (launcher local is the default)
    with pytest.raises(GlmsnakeError, match="train.backend slime runs slime's train.py on GPU nodes"):
        check_launcher(wf)
    check_launcher(resolve.load({"preset": RECIPE, "launcher": "slurm"}))
