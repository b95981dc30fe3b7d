"""glm4_moe_lite: GLM-4.7-Flash (30B-A3B), the GLM MoE with multi-latent attention.

Queries go through a low-rank down projection, a norm and an up projection (or one projection
without `q_lora_rank`); keys and values share a compressed latent plus a decoupled RoPE key
(`kv_a_proj_with_mqa`), normed and projected up per head (`kv_b_proj`). Every attention tensor
is one HF tensor under another name: no reshuffling, as in slime's DeepSeek-layout converter.

Key layouts (megatron-core 0.19.2, `models/gpt/gpt_layer_specs.py`):
- local spec: `input_layernorm`, `q_layernorm` / `kv_layernorm` as modules of their own, and
  `pre_mlp_layernorm` on every layer (the MLA spec has no keys map onto linear_fc1);
- Transformer Engine spec: the q/kv norms fused into the up projections
  (`linear_q_up_proj.layer_norm_weight`), `pre_mlp_layernorm` before MoE blocks only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable, Mapping

from glmsnake.architectures.base import GlmArch, GlmMoeArchitecture, config_getter
from glmsnake.convert.megatron_names import Layout, MegatronTensor, Unit, extra_state_key, singleton_in
from glmsnake.errors import GlmsnakeError

if TYPE_CHECKING:
    from glmsnake.recipe.args import ModelArgs


class Glm4MoeLite(GlmMoeArchitecture):
    model_type = "glm4_moe_lite"
    config_class = "Glm4MoeLiteConfig"
    model_class = "Glm4MoeLiteForCausalLM"
    attention_projections = "q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj"

    def matches(self, m: "ModelArgs") -> bool:
        return m.multi_latent_attention

    def hf_defaults(self, cfg: Mapping[str, Any]) -> dict[str, Any]:
        return super().hf_defaults(cfg) | {"num_key_value_heads": config_getter(cfg)("num_attention_heads")}

    def attention_fields(self, m: "ModelArgs") -> dict[str, Any]:
        if not m.qk_layernorm:
            raise GlmsnakeError(
                "multi-latent attention without qk_layernorm: GLM-4.7-Flash's q_a and kv_a norms would have no place in Megatron",
                "set model.qk_layernorm: true (slime's glm4.7-30B-A3B model script has --qk-layernorm)",
            )
        return {
            "num_key_value_heads": m.num_attention_heads,
            "q_lora_rank": m.q_lora_rank,
            "kv_lora_rank": m.kv_lora_rank,
            "qk_nope_head_dim": m.qk_head_dim,
            "qk_rope_head_dim": m.qk_pos_emb_head_dim,
            "v_head_dim": m.v_head_dim,
        }

    def attention_args(self, cfg: Mapping[str, Any]) -> dict[str, Any]:
        get = config_getter(cfg)
        # The rest follows slime's glm4.7-30B-A3B model script (MLA runs without rope fusion there).
        return {
            "qk_layernorm": True,
            "add_qkv_bias": True,
            "multi_latent_attention": True,
            "q_lora_rank": get("q_lora_rank"),
            "kv_lora_rank": int(get("kv_lora_rank")),
            "qk_head_dim": int(get("qk_nope_head_dim")),
            "v_head_dim": int(get("v_head_dim")),
            "kv_channels": int(get("qk_nope_head_dim")),
            "qk_pos_emb_head_dim": int(get("qk_rope_head_dim")),
            "make_vocab_size_divisible_by": 64,
            "no_position_embedding": True,
            "no_rope_fusion": True,
        }

    def attention(self, u: Unit, arch: GlmArch, mp: str, hp: str, layout: Layout) -> None:
        t = u.tensors.append
        att, hatt = f"{mp}self_attention.", f"{hp}self_attn."
        te = layout.norms == "te"
        t(MegatronTensor(f"{mp}input_layernorm.weight", "copy", (f"{hp}input_layernorm.weight",)))
        u.extra_states += [extra_state_key(f"{mp}input_layernorm")] if te else []

        def up(module: str, norm_local: str, hf_norm: str, hf_up: str) -> None:
            # The latent's norm: fused into the up projection (TE) or a module of its own (local).
            norm_key = f"{att}{module}.layer_norm_weight" if te else f"{att}{norm_local}.weight"
            t(MegatronTensor(norm_key, "copy", (f"{hatt}{hf_norm}.weight",)))
            t(MegatronTensor(f"{att}{module}.weight", "copy", (f"{hatt}{hf_up}.weight",)))

        linears = []
        if arch.q_lora_rank:
            t(MegatronTensor(f"{att}linear_q_down_proj.weight", "copy", (f"{hatt}q_a_proj.weight",)))
            up("linear_q_up_proj", "q_layernorm", "q_a_layernorm", "q_b_proj")
            linears += ["linear_q_down_proj", "linear_q_up_proj"]
        else:
            t(MegatronTensor(f"{att}linear_q_proj.weight", "copy", (f"{hatt}q_proj.weight",)))
            linears += ["linear_q_proj"]
        t(MegatronTensor(f"{att}linear_kv_down_proj.weight", "copy", (f"{hatt}kv_a_proj_with_mqa.weight",)))
        up("linear_kv_up_proj", "kv_layernorm", "kv_a_layernorm", "kv_b_proj")
        t(MegatronTensor(f"{att}linear_proj.weight", "copy", (f"{hatt}o_proj.weight",)))
        linears += ["linear_kv_down_proj", "linear_kv_up_proj", "linear_proj"]
        u.extra_states += [extra_state_key(f"{att}{n}") for n in linears]

    def transformers_fields(self, m: "ModelArgs", num_hidden_layers: int) -> dict[str, Any]:
        # transformers' glm4_moe_lite ignores first_k_dense_replace and reads mlp_layer_types.
        fields = super().transformers_fields(m, num_hidden_layers)
        dense = fields["first_k_dense_replace"]
        return fields | {"mlp_layer_types": ["dense"] * dense + ["sparse"] * (num_hidden_layers - dense)}

    def pre_mlp_norm_in_fc1(self, moe: bool, layout: Layout) -> bool:
        return layout.norms == "te" and not moe

    def detect_layout(self, keys: Iterable[str]) -> Layout:
        keys = list(keys)
        norms = "te" if any(k.endswith("_up_proj.layer_norm_weight") for k in keys) else "local"
        return Layout(norms, singleton_in(keys))

    def attention_shapes(self, m: "ModelArgs") -> list[tuple[int, ...]]:
        h, heads = m.hidden_size, m.num_attention_heads
        nope, rope, v, r_kv = m.qk_head_dim, m.qk_pos_emb_head_dim, m.v_head_dim, m.kv_lora_rank
        q = heads * (nope + rope)
        shapes: list[tuple[int, ...]] = (
            [(m.q_lora_rank, h), (m.q_lora_rank,), (q, m.q_lora_rank)] if m.q_lora_rank else [(q, h)]
        )
        return shapes + [(r_kv + rope, h), (r_kv,), (heads * (nope + v), r_kv), (h, heads * v)]

    def quantized_attention_shapes(self, m: "ModelArgs") -> list[tuple[int, int]]:
        return [s for s in self.attention_shapes(m) if len(s) == 2]  # type: ignore[misc]


ARCH = Glm4MoeLite()
