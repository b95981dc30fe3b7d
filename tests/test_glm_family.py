"""The GLM family: the multi-latent-attention sibling (tiny-mla, GLM-4.7-Flash's architecture)
through the converters, MODEL args from a config.json (`model: from_hf`), and config checks."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from glmsnake import architectures, resolve
from glmsnake.convert import fp8
from glmsnake.convert import megatron_names as names
from glmsnake.convert import torch_dist as td
from glmsnake.convert.tiny import make_tiny
from glmsnake.errors import GlmsnakeError
from glmsnake.recipe.args import ModelArgs
from test_torch_dist import assert_bit_identical, hf_tensors

REPO = Path(__file__).resolve().parent.parent
LITE = architectures.ARCHITECTURES["glm4_moe_lite"]


@pytest.fixture(scope="module")
def mla_args() -> ModelArgs:
    return resolve.load({"preset": "tiny-mla"}).preset.model


@pytest.fixture(scope="module")
def mla_hf(mla_args, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mla") / "tiny-glm4moe-lite"
    make_tiny(out, mla_args, seed=1234)
    return out


def config_of(hf: Path) -> dict:
    return json.loads((hf / "config.json").read_text())


def test_tiny_mla_is_transformers_glm4_moe_lite_with_an_mtp_layer(mla_hf):
    from transformers import AutoModelForCausalLM

    cfg = config_of(mla_hf)
    assert cfg["model_type"] == "glm4_moe_lite" and cfg["num_nextn_predict_layers"] == 1
    assert cfg["mlp_layer_types"] == ["dense", "sparse", "sparse"] and cfg["q_lora_rank"] == 32
    keys = set(hf_tensors(mla_hf))
    assert {"model.layers.1.self_attn.kv_a_proj_with_mqa.weight", "model.layers.3.eh_proj.weight",
            "model.layers.3.self_attn.q_a_layernorm.weight"} <= keys
    model = AutoModelForCausalLM.from_pretrained(mla_hf, dtype=torch.float32)
    assert type(model).__name__ == "Glm4MoeLiteForCausalLM"
    logits = model(torch.tensor([[5, 6, 7, 8]])).logits
    assert logits.shape == (1, 4, 128) and torch.isfinite(logits).all()


VARIANTS = [names.LOCAL, names.TE, names.Layout("local", "singleton"), names.Layout("te", "singleton")]


@pytest.mark.parametrize("layout", VARIANTS, ids=lambda v: f"{v.norms}-{v.experts}")
def test_every_mla_key_layout_round_trips_and_is_detected(mla_hf, tmp_path, layout):
    cfg, state = config_of(mla_hf), hf_tensors(mla_hf)
    final = td.save_hf_state(state, cfg, tmp_path / "ck", 3, layout)
    keys = set(td.describe_checkpoint(final, cfg)["tensors"])
    att, dense, moe = "decoder.layers.1.self_attention.", "decoder.layers.0.", "decoder.layers.1."
    te = layout.norms == "te"
    assert f"{moe}input_layernorm.weight" in keys and f"{att}linear_kv_down_proj.weight" in keys
    assert (f"{att}q_layernorm.weight" in keys) == (not te) == (f"{att}kv_layernorm.weight" in keys)
    assert (f"{att}linear_q_up_proj.layer_norm_weight" in keys) == te == (f"{att}linear_kv_up_proj.layer_norm_weight" in keys)
    assert f"{moe}pre_mlp_layernorm.weight" in keys  # MoE layers: a norm of its own in both specs
    assert (f"{dense}pre_mlp_layernorm.weight" in keys) == (not te)  # the local MLA spec has no keys map
    assert (f"{dense}mlp.linear_fc1.layer_norm_weight" in keys) == te
    assert "mtp.layers.0.transformer_layer.self_attention.linear_q_down_proj.weight" in keys
    assert td.describe_checkpoint(final, cfg)["layout"] == layout.describe()
    assert_bit_identical(td.load_hf_state(final, cfg), state)
    summary = td.export_hf(final, mla_hf, tmp_path / "hf")
    assert summary["layout"] == layout.describe()
    assert_bit_identical(hf_tensors(tmp_path / "hf"), hf_tensors(mla_hf))


def test_the_writer_converts_mla_with_two_writers_bit_identically(mla_hf, mla_args, tmp_path):
    release = td.convert(mla_hf, tmp_path / "td", mla_args, writers=2)
    assert sorted(p.name for p in release.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert_bit_identical(td.load_hf_state(release, config_of(mla_hf)), hf_tensors(mla_hf))


def test_mla_key_set_and_shapes_equal_megatron_manifest(mla_hf, mla_args, tmp_path):
    """What megatron-core 0.19.2's GPTModel with multi-latent attention (local spec, MTP block) asks
    for, recorded on an H200 by tests/gpu/megatron_check.py (which also loaded these checkpoints
    strictly and matched transformers' fp32 logits: tests/gpu/h200_results_mla_tp1_ep1.json)."""
    from glmsnake.convert.dcp_io import read_metadata, tensor_index

    release = td.convert(mla_hf, tmp_path / "td", mla_args, writers=1)
    want = json.loads((REPO / "tests" / "fixtures" / "megatron_keys_tiny_mla.json").read_text())
    md = read_metadata(release)
    tensors = {k: list(s) for k, (s, _) in tensor_index(md).items()}
    assert tensors == want["tensors"]
    assert sorted(k for k in md.state_dict_metadata if k not in tensors) == want["objects"]


def test_fp8_quantizes_the_mla_projections_and_loads_in_transformers(mla_hf, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "fp8"
    fp8.convert(mla_hf, out, block_size=(32, 32), workers=2, device="cpu", log=io.StringIO())
    src, got = hf_tensors(mla_hf), hf_tensors(out)
    quantized = {k for k, v in got.items() if v.dtype == torch.float8_e4m3fn}
    attention = {k.rsplit(".", 2)[-2] for k in quantized if ".self_attn." in k}
    assert attention == {"q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"}
    assert quantized == {k for k in src if LITE.quantized_weight.search(k)}
    assert not any("layernorm" in k or "eh_proj" in k or "mlp.gate.weight" in k for k in quantized)
    ids = torch.tensor([[5, 9, 17, 33, 40, 41, 60, 70]])
    ref = AutoModelForCausalLM.from_pretrained(mla_hf, dtype=torch.bfloat16).eval()
    quant = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        a, b = ref(ids).logits.float(), quant(ids).logits.float()
    rel = float((a - b).norm() / a.norm())
    # The same bound as the tiny glm4_moe's (tests/test_fp8.py): e4m3's 3 mantissa bits on every
    # projection of a 3-layer model with random weights.
    assert rel < 0.10, rel


def test_fp8_refuses_a_model_type_it_does_not_know(mla_hf, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(mla_hf, other)
    cfg = config_of(other) | {"model_type": "qwen3_moe"}
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(GlmsnakeError) as e:
        fp8.convert(other, tmp_path / "out", block_size=(32, 32), workers=1, device="cpu", log=io.StringIO())
    assert "model_type 'qwen3_moe', which glmsnake does not convert" in e.value.problem
    assert "glm4_moe, glm4_moe_lite" in e.value.fix and not (tmp_path / "out").exists()


# ----------------------------------------------------------------- MODEL args <-> config.json


@pytest.mark.parametrize("model_file", ["glm4.7-30b-a3b", "glm4.7-355b-a32b"])
def test_model_args_from_the_hf_config_are_the_model_files(model_file):
    """The shipped model files (slime's model scripts) come back from the config.json they describe."""
    m = ModelArgs.model_validate(yaml.safe_load((REPO / "config" / "models" / f"{model_file}.yaml").read_text()))
    arch = architectures.of_model_args(m)
    cfg = arch.hf_fields(m) | {"rope_parameters": arch.rope_fields(m), "rms_norm_eps": 1e-5}
    assert arch.model_args(cfg) == m.model_dump(exclude_unset=True)


def test_from_hf_reads_a_local_checkpoint_and_the_conversion_accepts_it(mla_hf, mla_args, tmp_path):
    wf = resolve.load({"preset": "tiny-mla", "base_dir": str(tmp_path / "b"),
                       "overrides": {"weights": {"source": f"local:{mla_hf}"}, "model": "from_hf"}})
    m = wf.preset.model
    assert m.multi_latent_attention and (m.q_lora_rank, m.kv_lora_rank, m.qk_head_dim, m.v_head_dim) == (32, 16, 16, 16)
    assert (m.num_layers, m.num_experts, m.moe_layer_freq, m.mtp_num_layers) == (3, 8, "[0]*1+[1]*2", 1)
    architectures.check_hf_config(config_of(mla_hf), m, str(mla_hf))  # the converters' own check passes
    assert td.plan_conversion(mla_hf, m).arch.q_lora_rank == 32


def test_from_hf_without_a_config_json_says_so():
    with pytest.raises(GlmsnakeError) as e:
        resolve.load({"preset": "tiny", "overrides": {"model": "from_hf"}})
    assert "model: from_hf with weights 'tiny'" in e.value.problem and "model: tiny-glm4moe" in e.value.fix


def test_a_config_json_of_other_weights_is_refused_naming_each_field(mla_hf, mla_args):
    cfg = config_of(mla_hf) | {"kv_lora_rank": 64, "v_head_dim": 32}
    with pytest.raises(GlmsnakeError) as e:
        architectures.check_hf_config(cfg, mla_args, "/w")
    assert "kv_lora_rank: config.json has 64, MODEL args say 16" in e.value.problem
    assert "v_head_dim: config.json has 32, MODEL args say 16" in e.value.problem
    with pytest.raises(GlmsnakeError) as e:
        architectures.check_hf_config(config_of(mla_hf), resolve.load({}).preset.model, "/w")
    assert "model_type: config.json has 'glm4_moe_lite', MODEL args say 'glm4_moe'" in e.value.problem


@pytest.mark.parametrize("preset", resolve.preset_names())
def test_every_preset_renders_and_plans(preset):
    """`glmsnake render` works for every preset and the resource planner finds no GPU, rollout or
    host budget exceeded (disk depends on the machine and is checked at the run's start)."""
    from glmsnake.recipe.command import render_text
    from glmsnake.resources import planner

    wf = resolve.load({"preset": preset, "base_dir": "/shared/glm"})
    assert "MODEL_ARGS=(" in render_text(wf, "default")
    findings = planner.run_findings(wf.preset, wf.runs["default"])
    assert not [f for f in findings if f.level == "error"], findings


@pytest.mark.parametrize("preset", resolve.preset_names())
def test_a_broken_variant_of_every_preset_is_refused_with_the_fix(preset):
    heads = resolve.load({"preset": preset}).preset.model.num_attention_heads
    with pytest.raises(GlmsnakeError) as e:
        resolve.load({"preset": preset, "runs": {"r": {"perf": {"tensor_model_parallel_size": 7}}}})
    assert f"TP=7 does not divide the {heads} attention heads" in e.value.problem
    assert "fix: set tensor_model_parallel_size to one of [1, 2" in e.value.problem


def test_the_planner_refuses_the_docs_one_node_flash_layout_and_names_a_fix_that_fits():
    """slime's docs give TP 1 / EP 8 for one node: 32k-token samples' fp32 logits over a 154880-entry
    vocabulary do not fit an H100 at TP 1; the fix the planner names was checked to fit."""
    wf = resolve.load({"preset": "glm4.7-flash-8xh100", "runs": {"r": {"perf": {
        "tensor_model_parallel_size": 1, "sequence_parallel": False, "context_parallel_size": 1}}}})
    with pytest.raises(GlmsnakeError) as e:
        resolve.refuse_over_budget(wf)  # what `snakemake -n`, `snakemake` and `glmsnake render` call
    assert "runs.r: training needs" in e.value.problem and "fp32 logits at the loss" in e.value.problem
    assert "fix: tensor parallel 2" in e.value.problem


# config.json as HF checkpoints of the family write it: rope fields at the top level, no
# rope_parameters, the dense layers as first_k_dense_replace (GLM-4.5/4.6/4.7 and 4.7-Flash's shape).
GLM47_CONFIG = {
    "model_type": "glm4_moe", "architectures": ["Glm4MoeForCausalLM"], "hidden_size": 5120, "num_hidden_layers": 92,
    "num_attention_heads": 96, "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 12288,
    "moe_intermediate_size": 1536, "n_routed_experts": 160, "n_shared_experts": 1, "num_experts_per_tok": 8,
    "routed_scaling_factor": 2.5, "first_k_dense_replace": 3, "vocab_size": 151552, "attention_bias": True,
    "use_qk_norm": True, "tie_word_embeddings": False, "num_nextn_predict_layers": 1, "rope_theta": 1000000,
    "partial_rotary_factor": 0.5, "rms_norm_eps": 1e-05, "n_group": 1, "topk_group": 1, "norm_topk_prob": True,
}
FLASH_CONFIG = {
    "model_type": "glm4_moe_lite", "architectures": ["Glm4MoeLiteForCausalLM"], "hidden_size": 2048,
    "num_hidden_layers": 47, "num_attention_heads": 20, "num_key_value_heads": 20, "q_lora_rank": 768,
    "kv_lora_rank": 512, "qk_nope_head_dim": 192, "qk_rope_head_dim": 64, "v_head_dim": 256,
    "intermediate_size": 10240, "moe_intermediate_size": 1536, "n_routed_experts": 64, "n_shared_experts": 1,
    "num_experts_per_tok": 4, "routed_scaling_factor": 1.8, "first_k_dense_replace": 1, "vocab_size": 154880,
    "tie_word_embeddings": False, "num_nextn_predict_layers": 1, "rope_theta": 1000000, "rms_norm_eps": 1e-05,
}


@pytest.mark.parametrize("cfg, model_file", [(GLM47_CONFIG, "glm4.7-355b-a32b"), (FLASH_CONFIG, "glm4.7-30b-a3b")])
def test_a_checkpoints_own_config_json_gives_the_model_file_and_passes_the_check(cfg, model_file):
    m = ModelArgs.model_validate(yaml.safe_load((REPO / "config" / "models" / f"{model_file}.yaml").read_text()))
    arch = architectures.of_hf_config(cfg)
    assert arch.model_args(cfg) == m.model_dump(exclude_unset=True)
    arch.check_hf_config(cfg, m, "/w")
    # A field config.json leaves out is transformers' default on both sides: derived, then accepted.
    sparse = {k: v for k, v in cfg.items() if k not in ("head_dim", "attention_bias", "routed_scaling_factor",
                                                        "partial_rotary_factor", "num_key_value_heads")}
    derived = ModelArgs.model_validate(arch.model_args(sparse))
    arch.check_hf_config(sparse, derived, "/w")


def test_pipeline_split_follows_megatrons_rule():
    from glmsnake.parallel_layout import _pipeline_split, pipeline_layers

    assert pipeline_layers(47, 2, None, 23) == [24, 23] and pipeline_layers(92, 4, None, None) == [23] * 4
    assert _pipeline_split(47, 2, None, 23) == [] and _pipeline_split(92, 4, None, None) == []
    (problem, fix), = _pipeline_split(47, 2, None, None)
    assert problem == "PP=2 does not divide the 47 layers" and "decoder_last_pipeline_num_layers: 23 (24 on each" in fix
    assert _pipeline_split(47, 3, 24, 23)[0][0].startswith("with 24 layers first and 23 last, the other 1 pipeline")
    assert _pipeline_split(47, 3, 10, 10) == [] and pipeline_layers(47, 3, 10, 10) == [10, 27, 10]
    assert _pipeline_split(47, 4, 10, 10)[0][0].endswith("other 2 pipeline stages cannot split the remaining 27 of 47 layers evenly")
    assert "need pipeline parallelism" in _pipeline_split(47, 1, None, 23)[0][0]


def test_global_batch_size_must_fit_a_rollout_and_megatrons_micro_batches():
    def problems(**rollout):
        with pytest.raises(GlmsnakeError) as e:
            resolve.load({"preset": "glm4.7-flash-8xh100", "runs": {"r": {"rollout": rollout}}})
        return e.value.problem

    # 8 GPUs, TP 2 x CP 2: DP 2.
    assert "global_batch_size=1023 is not a multiple of micro_batch_size x DP = 1 x 2" in problems(global_batch_size=1023)
    assert "global_batch_size=4096 is more than a rollout's 1024 samples" in problems(global_batch_size=4096)
    assert "global_batch_size=512 disagrees with rollout_batch_size x n_samples_per_prompt / num_steps_per_rollout" \
        in problems(global_batch_size=512, num_steps_per_rollout=4)
    ok = resolve.load({"preset": "glm4.7-flash-8xh100", "runs": {"r": {"rollout": {"global_batch_size": 256}}}})
    assert ok.runs["r"].rollout.steps_per_rollout == 4
    # Neither said: one optimizer step a rollout, on the command line (not Megatron's mbs x DP).
    assert ModelArgs is not None and resolve.load({}).runs["default"].rollout.num_steps_per_rollout == 1


def test_extends_merges_a_childs_model_keys_onto_the_parents_model_file(tmp_path, monkeypatch):
    monkeypatch.setattr(resolve, "PRESET_DIR", tmp_path)
    shutil.copy(REPO / "config" / "presets" / "tiny.yaml", tmp_path / "tiny.yaml")
    (tmp_path / "wide.yaml").write_text("extends: tiny\nmodel: {vocab_size: 256}\n")
    (tmp_path / "a.yaml").write_text("extends: b\n")
    (tmp_path / "b.yaml").write_text("extends: a\n")
    wf = resolve.load({"preset": "wide"})
    assert wf.preset.model.vocab_size == 256 and wf.preset.model.num_layers == 3
    with pytest.raises(GlmsnakeError) as e:
        resolve.read_preset("a")
    assert "extends 'a', which extends it back" in e.value.problem
