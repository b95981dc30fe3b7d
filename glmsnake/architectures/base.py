"""What every GLM MoE architecture shares, and what each one must say for itself.

A GLM MoE model is: an embedding; decoder layers whose first K MLPs are dense SwiGLUs and
the rest MoE blocks (sigmoid router with an fp32 expert bias, routed experts, shared experts);
MTP layers (a full decoder layer plus eh_proj, enorm, hnorm and a head norm) after the last
layer; a final norm and an untied output layer. Only the attention differs between members
(grouped-query attention in glm4_moe, multi-latent attention in glm4_moe_lite), so a subclass
of `GlmMoeArchitecture` supplies:

- its attention's HF config fields <-> MODEL args, both ways;
- its attention's HF <-> Megatron tensor names, in each key layout;
- where the pre-MLP norm lives in each layout, and how to tell the layouts apart;
- its transformers classes (the tiny factory and the local trainer build with them);
- the projections FP8 quantizes, and the attention's parameter shapes (sizes and estimates).

The writer tasks import this package in the container: nothing here imports pydantic.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from glmsnake.convert.megatron_names import (
    LOCAL,
    MTP_SHARED_SUFFIXES,
    Layout,
    MegatronTensor,
    Unit,
    extra_state_key,
    fc1_tensors,
    routed_experts,
)
from glmsnake.errors import GlmsnakeError

if TYPE_CHECKING:
    from glmsnake.recipe.args import ModelArgs


@dataclass(frozen=True)
class GlmArch:
    """What the name mapping needs to know about a checkpoint (read from its config.json)."""

    model_type: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_groups: int
    head_dim: int
    num_experts: int
    first_dense: int  # layers [0, first_dense) are dense
    mtp_layers: int
    qkv_bias: bool
    qk_norm: bool
    tied_embeddings: bool
    shared_experts: bool
    q_lora_rank: int | None = None  # multi-latent attention only: None means one q projection

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_groups

    def is_moe(self, hf_layer: int) -> bool:
        return self.num_experts > 0 and hf_layer >= self.first_dense


def config_getter(cfg: Mapping[str, Any] | Any):
    """`get(key, default)` over a config.json dict or a transformers config object."""
    if isinstance(cfg, Mapping):
        return lambda k, d=None: cfg.get(k, d)
    return lambda k, d=None: getattr(cfg, k, d)


def dense_prefix(cfg: Mapping[str, Any] | Any) -> int:
    """How many leading layers are dense: `mlp_layer_types` where the config has it, else
    `first_k_dense_replace`. Dense layers anywhere but first are not a GLM MoE."""
    get = config_getter(cfg)
    types = get("mlp_layer_types")
    if not types:
        return int(get("first_k_dense_replace") or 0)
    k = types.index("sparse") if "sparse" in types else len(types)
    if any(t != "sparse" for t in types[k:]):
        raise GlmsnakeError(
            f"config.json's mlp_layer_types puts dense layers after MoE layers: {types}",
            "GLM MoE models have their dense layers first; check that this is a GLM checkpoint",
        )
    return k


class GlmMoeArchitecture:
    """The GLM MoE family; subclasses fill in the attention (see the module docstring)."""

    model_type: str = ""
    config_class: str = ""  # transformers' config and causal-LM classes, by name
    model_class: str = ""
    # Projections FP8 quantizes (slime's tools/convert_hf_to_fp8.py quantizes every such linear):
    # the attention's (per subclass) and the dense, shared-expert and routed-expert gate/up/down,
    # in every decoder layer including MTP. An allow-list: an unknown tensor is kept, not broken.
    attention_projections: str = ""

    @property
    def quantized_weight(self) -> re.Pattern:
        return re.compile(
            rf"(^|\.)(self_attn\.({self.attention_projections})|mlp\.(shared_experts\.|experts\.\d+\.)?(gate|up|down)_proj)\.weight$"
        )

    # ------------------------------------------------------------------ which models are ours

    def matches(self, m: "ModelArgs") -> bool:
        raise NotImplementedError

    # ------------------------------------------------------------------ config.json <-> MODEL args

    def hf_fields(self, m: "ModelArgs") -> dict[str, Any]:
        """The config.json fields the MODEL args determine."""
        dense = m.dense_layers
        if dense != list(range(len(dense))):
            raise GlmsnakeError(
                f"moe_layer_freq {m.moe_layer_freq!r} puts dense layers at {dense}; GLM MoE models have them first",
                "write it as [0]*K+[1]*(L-K)",
            )
        return {
            "model_type": self.model_type,
            "hidden_size": m.hidden_size,
            "num_hidden_layers": m.num_layers,
            "num_attention_heads": m.num_attention_heads,
            "intermediate_size": m.ffn_hidden_size,
            "moe_intermediate_size": m.moe_ffn_hidden_size,
            "n_routed_experts": m.num_experts,
            "n_shared_experts": m.moe_shared_expert_intermediate_size // m.moe_ffn_hidden_size,
            "num_experts_per_tok": m.moe_router_topk,
            "routed_scaling_factor": m.moe_router_topk_scaling_factor or 1.0,
            "first_k_dense_replace": len(dense),
            "vocab_size": m.vocab_size,
            "tie_word_embeddings": not m.untie_embeddings_and_output_weights,
            "num_nextn_predict_layers": m.mtp_num_layers or 0,
        } | self.attention_fields(m)

    def attention_fields(self, m: "ModelArgs") -> dict[str, Any]:
        raise NotImplementedError

    def rope_fields(self, m: "ModelArgs") -> dict[str, Any]:
        return {"rope_theta": float(m.rotary_base), "rope_type": "default"}

    def model_args(self, cfg: Mapping[str, Any]) -> dict[str, Any]:
        """MODEL args (as a `model:` block) from a config.json: what `model: from_hf` uses.

        The flags that are not architecture (fusions, dtypes, the dispatcher) follow slime's
        model scripts for the GLM family."""
        get = config_getter(cfg)
        layers, dense = int(get("num_hidden_layers")), dense_prefix(cfg)
        rope = get("rope_parameters") or {}
        moe_ffn = int(get("moe_intermediate_size"))
        args = {
            "disable_bias_linear": True,
            "num_layers": layers,
            "hidden_size": int(get("hidden_size")),
            "ffn_hidden_size": int(get("intermediate_size")),
            "num_attention_heads": int(get("num_attention_heads")),
            "normalization": "RMSNorm",
            "position_embedding_type": "rope",
            "swiglu": True,
            "untie_embeddings_and_output_weights": not bool(get("tie_word_embeddings", False)),
            "vocab_size": int(get("vocab_size")),
            "rotary_base": _number(rope.get("rope_theta", get("rope_theta", 10000))),
            "moe_ffn_hidden_size": moe_ffn,
            "moe_shared_expert_intermediate_size": moe_ffn * int(get("n_shared_experts") or 0),
            "moe_router_pre_softmax": True,
            "moe_router_score_function": "sigmoid",
            "moe_router_enable_expert_bias": True,
            "moe_router_bias_update_rate": 0,
            "moe_router_load_balancing_type": "seq_aux_loss",
            "moe_router_topk": int(get("num_experts_per_tok")),
            "moe_router_topk_scaling_factor": float(get("routed_scaling_factor") or 1.0),
            "moe_layer_freq": f"[0]*{dense}+[1]*{layers - dense}",
            "num_experts": int(get("n_routed_experts")),
            "moe_grouped_gemm": True,
            "moe_router_dtype": "fp32",
            "moe_permute_fusion": True,
            "moe_aux_loss_coeff": 0,
        }
        eps = float(get("rms_norm_eps", 1e-5))
        if eps != 1e-5:  # Megatron's default
            args["norm_epsilon"] = eps
        mtp = int(get("num_nextn_predict_layers") or 0)
        if mtp:
            args["mtp_num_layers"] = mtp
        return args | self.attention_args(cfg)

    def attention_args(self, cfg: Mapping[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def hf_defaults(self, cfg: Mapping[str, Any]) -> dict[str, Any]:
        """What transformers takes for a field config.json leaves out (model_args reads the same)."""
        return {"num_nextn_predict_layers": 0, "tie_word_embeddings": False, "first_k_dense_replace": 0,
                "routed_scaling_factor": 1.0, "n_shared_experts": 0}

    def check_hf_config(self, config: Mapping[str, Any], m: "ModelArgs", where: str) -> None:
        """Raise, naming every field, when a config.json disagrees with the MODEL args (a field it
        leaves out counts as transformers' default)."""
        bad = []
        if config.get("model_type") != self.model_type:
            bad.append(f"model_type: config.json has {config.get('model_type')!r}, MODEL args say {self.model_type!r}")
        else:
            want = self.hf_fields(m)
            have_cfg = self.hf_defaults(config) | {k: v for k, v in config.items() if v is not None}
            if "mlp_layer_types" in have_cfg:
                have_cfg["first_k_dense_replace"] = dense_prefix(have_cfg)
            for key, value in want.items():
                have = have_cfg.get(key)
                if have != value:
                    bad.append(f"{key}: config.json has {have!r}, MODEL args say {value!r}")
            rope = config.get("rope_parameters") or {}
            for key, mine in self.rope_fields(m).items():
                if key == "rope_type":
                    continue
                theirs = rope.get(key, config.get(key, self.hf_defaults(config).get(key)))
                if theirs is not None and float(theirs) != float(mine):
                    bad.append(f"{key}: config.json has {theirs!r}, MODEL args say {mine!r}")
        if bad:
            raise GlmsnakeError(
                f"{where}/config.json does not match the preset's MODEL args:\n    " + "\n    ".join(bad),
                "use the preset that matches these weights, set `model: from_hf`, or fix `model:` in the preset/overrides",
            )

    def shape(self, cfg: Mapping[str, Any] | Any) -> GlmArch:
        get = config_getter(cfg)
        heads, hidden = int(get("num_attention_heads")), int(get("hidden_size"))
        return GlmArch(
            model_type=self.model_type,
            num_layers=int(get("num_hidden_layers")),
            hidden_size=hidden,
            num_heads=heads,
            num_groups=int(get("num_key_value_heads") or heads),
            head_dim=int(get("head_dim") or hidden // heads),
            num_experts=int(get("n_routed_experts") or 0),
            first_dense=dense_prefix(cfg),
            mtp_layers=int(get("num_nextn_predict_layers") or 0),
            qkv_bias=bool(get("attention_bias", False)),
            qk_norm=bool(get("use_qk_norm", False)),
            tied_embeddings=bool(get("tie_word_embeddings", False)),
            shared_experts=int(get("n_shared_experts") or 0) > 0,
            q_lora_rank=get("q_lora_rank"),
        )

    # ------------------------------------------------------------------ tensor names

    def attention(self, u: Unit, arch: GlmArch, mp: str, hp: str, layout: Layout) -> None:
        """Append the layer's input norm and attention tensors (Megatron prefix `mp`, HF `hp`)."""
        raise NotImplementedError

    def pre_mlp_norm_in_fc1(self, moe: bool, layout: Layout) -> bool:
        """Whether the pre-MLP norm is stored as `mlp.linear_fc1.layer_norm_weight` (else `pre_mlp_layernorm`).
        The Transformer Engine spec fuses it into a dense layer's fc1 and keeps a TENorm before a MoE block."""
        return not moe

    def detect_layout(self, keys: Iterable[str]) -> Layout:
        raise NotImplementedError

    def units(self, arch: GlmArch, layout: Layout = LOCAL) -> list[Unit]:
        """Every Megatron tensor of the model, grouped into streaming units, in model order."""
        out = [Unit("embedding", [MegatronTensor("embedding.word_embeddings.weight", "copy", ("model.embed_tokens.weight",))])]
        for i in range(arch.num_layers):
            out.append(self._layer(arch, f"layer {i}", f"decoder.layers.{i}.", f"model.layers.{i}.", arch.is_moe(i), layout))
        te = layout.norms == "te"
        for j in range(arch.mtp_layers):
            hf_i = arch.num_layers + j
            hp, mp = f"model.layers.{hf_i}.", f"mtp.layers.{j}."
            u = self._layer(arch, f"mtp {j}", f"{mp}transformer_layer.", hp, arch.is_moe(hf_i), layout)
            u.tensors[:0] = [
                MegatronTensor(f"{mp}enorm.weight", "copy", (f"{hp}enorm.weight",)),
                MegatronTensor(f"{mp}hnorm.weight", "copy", (f"{hp}hnorm.weight",)),
                MegatronTensor(f"{mp}eh_proj.weight", "copy", (f"{hp}eh_proj.weight",)),
                MegatronTensor(f"{mp}final_layernorm.weight", "copy", (f"{hp}shared_head.norm.weight",)),
            ]
            u.extra_states.insert(0, extra_state_key(f"{mp}eh_proj"))
            if te:
                u.extra_states += [extra_state_key(f"{mp}{n}") for n in ("enorm", "hnorm", "final_layernorm")]
            u.dropped = [hp + s for s in MTP_SHARED_SUFFIXES]
            out.append(u)
        head = Unit("head", [MegatronTensor("decoder.final_layernorm.weight", "copy", ("model.norm.weight",))])
        if te:
            head.extra_states.append(extra_state_key("decoder.final_layernorm"))
        if not arch.tied_embeddings:
            head.tensors.append(MegatronTensor("output_layer.weight", "copy", ("lm_head.weight",)))
        # No output_layer._extra_state: GPTModel drops it from its sharded state dict (old checkpoints lack it).
        out.append(head)
        return out

    def _layer(self, arch: GlmArch, name: str, mp: str, hp: str, moe: bool, layout: Layout) -> Unit:
        u = Unit(name)
        self.attention(u, arch, mp, hp, layout)
        t = u.tensors.append
        post = (f"{hp}post_attention_layernorm.weight",)
        if self.pre_mlp_norm_in_fc1(moe, layout):
            t(MegatronTensor(f"{mp}mlp.linear_fc1.layer_norm_weight", "copy", post))
        else:
            t(MegatronTensor(f"{mp}pre_mlp_layernorm.weight", "copy", post))
            if layout.norms == "te":
                u.extra_states.append(extra_state_key(f"{mp}pre_mlp_layernorm"))
        if not moe:
            fc1_tensors(u, layout, f"{mp}mlp.linear_fc1", f"{hp}mlp.gate_proj.weight", f"{hp}mlp.up_proj.weight")
            t(MegatronTensor(f"{mp}mlp.linear_fc2.weight", "copy", (f"{hp}mlp.down_proj.weight",)))
            u.extra_states += [extra_state_key(f"{mp}mlp.linear_fc1"), extra_state_key(f"{mp}mlp.linear_fc2")]
            return u
        t(MegatronTensor(f"{mp}mlp.router.weight", "copy", (f"{hp}mlp.gate.weight",)))
        t(MegatronTensor(f"{mp}mlp.router.expert_bias", "copy", (f"{hp}mlp.gate.e_score_correction_bias",)))
        if arch.shared_experts:
            se, hse = f"{mp}mlp.shared_experts.", f"{hp}mlp.shared_experts."
            fc1_tensors(u, layout, f"{se}linear_fc1", f"{hse}gate_proj.weight", f"{hse}up_proj.weight")
            t(MegatronTensor(f"{se}linear_fc2.weight", "copy", (f"{hse}down_proj.weight",)))
            u.extra_states += [extra_state_key(f"{se}linear_fc1"), extra_state_key(f"{se}linear_fc2")]
        routed_experts(u, layout, f"{mp}mlp.experts.experts.", f"{hp}mlp.experts.", arch.num_experts)
        return u

    def check_hf_keys(self, arch: GlmArch, hf_keys: Iterable[str], where: str) -> None:
        """Refuse a checkpoint whose tensors are not exactly the set its config.json describes."""
        have = set(hf_keys)
        us = self.units(arch)
        want = {k for u in us for k in u.hf_keys}
        optional = {k for u in us for k in u.dropped}
        missing, unknown = sorted(want - have), sorted(have - want - optional)
        if missing or unknown:
            lines = [f"missing {k}" for k in missing[:10]] + [f"unknown {k}" for k in unknown[:10]]
            more = len(missing) + len(unknown) - len(lines)
            raise GlmsnakeError(
                f"{where}: the checkpoint's tensors are not the {self.model_type} set its config.json describes:\n    "
                + "\n    ".join(lines) + (f"\n    ... and {more} more" if more > 0 else ""),
                "check that config.json belongs to these weights (layers, experts, MTP layers, attention)",
            )

    # ------------------------------------------------------------------ sizes

    def attention_shapes(self, m: "ModelArgs") -> list[tuple[int, ...]]:
        """Every attention tensor of one layer (weights, biases, norms), as (rows, cols) or (n,)."""
        raise NotImplementedError

    def quantized_attention_shapes(self, m: "ModelArgs") -> list[tuple[int, int]]:
        """The attention projections FP8 quantizes, one layer."""
        raise NotImplementedError

    # ------------------------------------------------------------------ transformers

    def transformers_fields(self, m: "ModelArgs", num_hidden_layers: int) -> dict[str, Any]:
        """The MODEL args as keyword arguments of transformers' config class, for a model of
        `num_hidden_layers` layers (the tiny factory builds the MTP layers as extra layers)."""
        fields = self.hf_fields(m)
        fields.pop("model_type")
        return fields | {"num_hidden_layers": num_hidden_layers, "rope_parameters": self.rope_fields(m)}

    def transformers_config(self, fields: Mapping[str, Any]):
        import transformers

        return getattr(transformers, self.config_class)(**fields)

    def transformers_model(self, config):
        import transformers

        return getattr(transformers, self.model_class)(config)


def _number(x: Any) -> int | float:
    f = float(x)
    return int(f) if f.is_integer() else f
