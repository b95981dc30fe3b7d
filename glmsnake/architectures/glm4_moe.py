"""glm4_moe: GLM-4.5 / 4.6 / 4.7 (355B-A32B, 106B-A12B) and the tiny embedded default.

Grouped-query attention with a QKV bias, QK norm and half-rotary RoPE. Megatron keeps q, k and
v in one `linear_qkv` tensor, interleaved per query group; the input norm is fused into it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable, Mapping

from glmsnake.architectures.base import GlmArch, GlmMoeArchitecture, config_getter
from glmsnake.convert.megatron_names import Layout, MegatronTensor, Unit, extra_state_key, singleton_in

if TYPE_CHECKING:
    from glmsnake.recipe.args import ModelArgs


PARTIAL_ROTARY = 0.5  # transformers' Glm4MoeConfig default, where config.json says nothing


class Glm4Moe(GlmMoeArchitecture):
    model_type = "glm4_moe"
    config_class = "Glm4MoeConfig"
    model_class = "Glm4MoeForCausalLM"
    attention_projections = "[qkvo]_proj"

    def matches(self, m: "ModelArgs") -> bool:
        return not m.multi_latent_attention

    def attention_fields(self, m: "ModelArgs") -> dict[str, Any]:
        return {
            "num_key_value_heads": m.query_groups,
            "head_dim": m.kv_channels,
            "attention_bias": m.add_qkv_bias,
            "use_qk_norm": m.qk_layernorm,
        }

    def rope_fields(self, m: "ModelArgs") -> dict[str, Any]:
        return super().rope_fields(m) | {"partial_rotary_factor": m.rotary_percent}

    def hf_defaults(self, cfg: Mapping[str, Any]) -> dict[str, Any]:
        get = config_getter(cfg)
        heads = int(get("num_attention_heads") or 1)
        return super().hf_defaults(cfg) | {"num_key_value_heads": heads, "attention_bias": False, "use_qk_norm": False,
                                           "head_dim": int(get("hidden_size") or 0) // heads,
                                           "partial_rotary_factor": PARTIAL_ROTARY}

    def attention_args(self, cfg: Mapping[str, Any]) -> dict[str, Any]:
        get = config_getter(cfg)
        rope = get("rope_parameters") or {}
        heads = int(get("num_attention_heads"))
        return {
            "qk_layernorm": bool(get("use_qk_norm", False)),
            "group_query_attention": True,
            "num_query_groups": int(get("num_key_value_heads") or heads),
            "kv_channels": int(get("head_dim") or int(get("hidden_size")) // heads),
            "add_qkv_bias": bool(get("attention_bias", False)),
            "rotary_percent": float(rope.get("partial_rotary_factor", get("partial_rotary_factor", PARTIAL_ROTARY))),
            "moe_token_dispatcher_type": "alltoall",  # as slime's glm4.5 model scripts have it
        }

    def attention(self, u: Unit, arch: GlmArch, mp: str, hp: str, layout: Layout) -> None:
        t = u.tensors.append
        att = f"{mp}self_attention."
        t(MegatronTensor(f"{att}linear_qkv.layer_norm_weight", "copy", (f"{hp}input_layernorm.weight",)))
        t(MegatronTensor(f"{att}linear_qkv.weight", "qkv", tuple(f"{hp}self_attn.{p}_proj.weight" for p in "qkv"), arch.num_groups))
        if arch.qkv_bias:
            t(MegatronTensor(f"{att}linear_qkv.bias", "qkv", tuple(f"{hp}self_attn.{p}_proj.bias" for p in "qkv"), arch.num_groups))
        if arch.qk_norm:
            t(MegatronTensor(f"{att}q_layernorm.weight", "copy", (f"{hp}self_attn.q_norm.weight",)))
            t(MegatronTensor(f"{att}k_layernorm.weight", "copy", (f"{hp}self_attn.k_norm.weight",)))
            u.extra_states += [extra_state_key(f"{att}{n}_layernorm") for n in "qk"] if layout.norms == "te" else []
        t(MegatronTensor(f"{att}linear_proj.weight", "copy", (f"{hp}self_attn.o_proj.weight",)))
        u.extra_states += [extra_state_key(f"{att}linear_qkv"), extra_state_key(f"{att}linear_proj")]

    def pre_mlp_norm_in_fc1(self, moe: bool, layout: Layout) -> bool:
        # The local spec's keys map renames pre_mlp_layernorm onto linear_fc1 on every layer.
        return layout.norms == "local" or not moe

    def detect_layout(self, keys: Iterable[str]) -> Layout:
        keys = list(keys)
        norms = "te" if any(k.endswith(".pre_mlp_layernorm.weight") for k in keys) else "local"
        return Layout(norms, singleton_in(keys))

    def attention_shapes(self, m: "ModelArgs") -> list[tuple[int, ...]]:
        h, q, kv = m.hidden_size, m.num_attention_heads * m.kv_channels, m.query_groups * m.kv_channels
        shapes: list[tuple[int, ...]] = [(q, h), (kv, h), (kv, h), (h, q)]
        shapes += [(q,), (kv,), (kv,)] if m.add_qkv_bias else []
        shapes += [(m.kv_channels,), (m.kv_channels,)] if m.qk_layernorm else []
        return shapes

    def quantized_attention_shapes(self, m: "ModelArgs") -> list[tuple[int, int]]:
        return [s for s in self.attention_shapes(m)[:4]]  # type: ignore[misc]


ARCH = Glm4Moe()
