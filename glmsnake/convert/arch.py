"""The GLM-4-MoE architecture as HF `config.json` fields, derived from Megatron's MODEL args.

One mapping serves the tiny factory (which writes config.json) and the conversions
(which refuse a checkpoint whose config.json disagrees with the MODEL args).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from glmsnake.errors import GlmsnakeError

if TYPE_CHECKING:  # the writer tasks import this module in the container: no pydantic there
    from glmsnake.recipe.args import ModelArgs


def hf_fields(m: ModelArgs) -> dict[str, Any]:
    """The config.json fields that the MODEL args determine."""
    dense = m.dense_layers
    if dense != list(range(len(dense))):
        raise GlmsnakeError(
            f"moe_layer_freq {m.moe_layer_freq!r} puts dense layers at {dense}; GLM-4-MoE has them first",
            "write it as [0]*K+[1]*(L-K)",
        )
    return {
        "model_type": "glm4_moe",
        "hidden_size": m.hidden_size,
        "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_attention_heads,
        "num_key_value_heads": m.num_query_groups,
        "head_dim": m.kv_channels,
        "intermediate_size": m.ffn_hidden_size,
        "moe_intermediate_size": m.moe_ffn_hidden_size,
        "n_routed_experts": m.num_experts,
        "n_shared_experts": m.moe_shared_expert_intermediate_size // m.moe_ffn_hidden_size,
        "num_experts_per_tok": m.moe_router_topk,
        "routed_scaling_factor": m.moe_router_topk_scaling_factor or 1.0,
        "first_k_dense_replace": len(dense),
        "vocab_size": m.vocab_size,
        "attention_bias": m.add_qkv_bias,
        "use_qk_norm": m.qk_layernorm,
        "tie_word_embeddings": not m.untie_embeddings_and_output_weights,
        "num_nextn_predict_layers": m.mtp_num_layers or 0,
    }


def rope_fields(m: ModelArgs) -> dict[str, Any]:
    return {"rope_theta": float(m.rotary_base), "partial_rotary_factor": m.rotary_percent, "rope_type": "default"}


def check_hf_config(config: dict[str, Any], m: ModelArgs, where: str) -> None:
    """Raise, naming every field, when an HF config.json disagrees with the MODEL args."""
    want = hf_fields(m)
    bad = []
    for key, value in want.items():
        have = config.get(key)
        if key == "num_nextn_predict_layers" and have is None:
            have = 0
        if key == "tie_word_embeddings" and have is None:
            have = False
        if have != value:
            bad.append(f"{key}: config.json has {have!r}, MODEL args say {value!r}")
    rope = config.get("rope_parameters") or {}
    theta = rope.get("rope_theta", config.get("rope_theta"))
    prf = rope.get("partial_rotary_factor", config.get("partial_rotary_factor"))
    if theta is not None and float(theta) != float(m.rotary_base):
        bad.append(f"rope_theta: config.json has {theta!r}, MODEL args say {m.rotary_base!r}")
    if prf is not None and float(prf) != float(m.rotary_percent):
        bad.append(f"partial_rotary_factor: config.json has {prf!r}, MODEL args say {m.rotary_percent!r}")
    if bad:
        raise GlmsnakeError(
            f"{where}/config.json does not match the preset's MODEL args:\n    " + "\n    ".join(bad),
            "use the preset that matches these weights, or fix `model:` in the preset/overrides",
        )
