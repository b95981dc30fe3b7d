"""The embedded default: a tiny GLM-4-MoE that transformers loads, with the MTP layer GLM-4.7 has."""

from __future__ import annotations

import json

import torch
from safetensors import safe_open

from glmsnake import resolve
from glmsnake.convert.tiny import make_tiny


def keys_and_dtypes(folder) -> dict[str, str]:
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    out = {}
    for shard in sorted(set(index.values())):
        with safe_open(folder / shard, "pt") as f:
            for k in f.keys():
                out[k] = str(f.get_slice(k).get_dtype())
    assert set(out) == set(index), "the index maps exactly the stored tensors"
    return out


def test_architecture_family(tiny_hf):
    cfg = json.loads((tiny_hf / "config.json").read_text())
    m = resolve.load({}).preset.model
    assert cfg["model_type"] == "glm4_moe" and cfg["num_nextn_predict_layers"] == 1
    assert cfg["first_k_dense_replace"] == 1 and cfg["num_hidden_layers"] == m.num_layers == 3
    assert cfg["rope_parameters"]["partial_rotary_factor"] == 0.5 and cfg["use_qk_norm"] and cfg["attention_bias"]
    keys = keys_and_dtypes(tiny_hf)
    assert "model.layers.0.mlp.gate_proj.weight" in keys  # dense first layer
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in keys and "model.layers.1.mlp.shared_experts.up_proj.weight" in keys
    assert keys["model.layers.1.mlp.gate.e_score_correction_bias"] == "F32"
    assert "model.layers.1.self_attn.q_proj.bias" in keys and "model.layers.1.self_attn.k_norm.weight" in keys
    # The MTP layer, as GLM-4.7 ships it: MTP-only tensors and a full MoE decoder layer.
    for k in ("eh_proj.weight", "enorm.weight", "hnorm.weight", "shared_head.norm.weight", "mlp.experts.0.gate_proj.weight",
              "mlp.gate.weight", "self_attn.q_proj.weight", "input_layernorm.weight"):
        assert f"model.layers.3.{k}" in keys
    assert not any(k.startswith("model.layers.4.") for k in keys)
    size = sum(p.stat().st_size for p in tiny_hf.glob("*.safetensors"))
    assert 100_000 < size < 8_000_000


def test_deterministic_for_a_seed(tmp_path, tiny_hf):
    m = resolve.load({}).preset.model
    make_tiny(tmp_path / "again", m, seed=1234)
    make_tiny(tmp_path / "other", m, seed=7)
    for shard in tiny_hf.glob("*.safetensors"):
        assert (tmp_path / "again" / shard.name).read_bytes() == shard.read_bytes()
    assert (tmp_path / "other" / "model-00001-of-00003.safetensors").read_bytes() != (tiny_hf / "model-00001-of-00003.safetensors").read_bytes()


def test_transformers_loads_and_generates(tiny_hf):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_hf)
    model = AutoModelForCausalLM.from_pretrained(tiny_hf, dtype=torch.bfloat16)
    ids = tok("say c:", return_tensors="pt").input_ids
    assert tok.decode(ids[0]) == "say c:"
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], 128) and torch.isfinite(logits).all()
    bias = model.model.layers[1].mlp.gate.e_score_correction_bias
    assert bias.dtype == torch.float32 and bias.abs().sum() > 0
