"""What the estimates need of a model and of a training layout, from the config or from a probe.

Kept apart from the config models so that the GPU measurements (plain dicts, as recorded in
tests/fixtures/gpu_memory_h200.json) and a preset's run go through the very same arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from glmsnake.config import Preset, Run
    from glmsnake.recipe.args import ModelArgs


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    heads: int
    query_groups: int
    head_dim: int
    ffn: int  # dense layers' SwiGLU width
    vocab: int
    layer_is_moe: tuple[bool, ...]
    experts: int = 0
    topk: int = 0
    expert_ffn: int = 0
    shared_ffn: int = 0
    mtp_layers: int = 0
    qkv_bias: bool = True
    qk_norm: bool = True
    untied: bool = True
    # Multi-latent attention: its attention weights counted by the architecture, and the latent
    # SGLang caches per token and layer (kv_lora_rank + RoPE dims) instead of per-head K and V.
    latent_attention_params: int = 0
    kv_latent: int = 0

    @property
    def layers(self) -> int:
        return len(self.layer_is_moe)

    @property
    def q(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv(self) -> int:
        return self.query_groups * self.head_dim

    @classmethod
    def of(cls, m: "ModelArgs") -> "ModelShape":
        mla = {}
        if m.multi_latent_attention:
            from glmsnake import model_size

            # Activations as for one full-width head per query head: q and k are nope + RoPE wide.
            mla = dict(query_groups=m.num_attention_heads, head_dim=m.qk_head_dim + m.qk_pos_emb_head_dim,
                       latent_attention_params=model_size.attention_parameters(m),
                       kv_latent=m.kv_lora_rank + m.qk_pos_emb_head_dim)
        return cls(**{"hidden": m.hidden_size, "heads": m.num_attention_heads, "query_groups": m.query_groups,
                      "head_dim": m.kv_channels, **mla}, ffn=m.ffn_hidden_size, vocab=m.vocab_size,
                   layer_is_moe=tuple(m.layer_is_moe), experts=m.num_experts, topk=m.moe_router_topk,
                   expert_ffn=m.moe_ffn_hidden_size, shared_ffn=m.moe_shared_expert_intermediate_size,
                   mtp_layers=m.mtp_num_layers or 0, qkv_bias=m.add_qkv_bias, qk_norm=m.qk_layernorm,
                   untied=m.untie_embeddings_and_output_weights)

    @classmethod
    def of_probe(cls, p: dict) -> "ModelShape":
        moe = p["num_experts"] > 0
        first_dense = p["first_k_dense"] if moe else p["num_layers"]
        return cls(hidden=p["hidden_size"], heads=p["num_attention_heads"], query_groups=p["num_query_groups"],
                   head_dim=p["kv_channels"], ffn=p["ffn_hidden_size"], vocab=p["vocab_size"],
                   layer_is_moe=tuple(i >= first_dense for i in range(p["num_layers"])), experts=p["num_experts"],
                   topk=p["moe_router_topk"], expert_ffn=p["moe_ffn_hidden_size"],
                   shared_ffn=p["moe_shared_expert_intermediate_size"], mtp_layers=p["mtp_num_layers"])

    # ---- parameters, as the converters write them (glmsnake/model_size.py counts the same)
    def attention_params(self) -> int:
        h = self.hidden
        if self.latent_attention_params:
            return self.latent_attention_params + 2 * h
        n = h * self.q + 2 * h * self.kv + self.q * h
        n += (self.q + 2 * self.kv) if self.qkv_bias else 0
        n += 2 * self.head_dim if self.qk_norm else 0
        return n + 2 * h  # input and pre-MLP norms

    def dense_mlp_params(self) -> int:
        return 3 * self.hidden * self.ffn

    def expert_params(self) -> int:
        """Routed experts of one MoE layer: what EP x ETP shards."""
        return self.experts * 3 * self.hidden * self.expert_ffn

    def shared_and_router_params(self) -> int:
        return 3 * self.hidden * self.shared_ffn + self.experts * self.hidden  # the expert bias is a buffer, not trained

    def mtp_extra_params(self) -> int:
        return 2 * self.hidden * self.hidden + 3 * self.hidden  # eh_proj, enorm, hnorm, final norm

    def parameters(self) -> int:
        h = self.hidden
        n = sum(self.attention_params() + (self.expert_params() + self.shared_and_router_params() if moe
                                           else self.dense_mlp_params()) for moe in self.layer_is_moe)
        n += self.mtp_layers * (self.attention_params() + self.expert_params() + self.shared_and_router_params()
                                + self.mtp_extra_params())
        return n + self.vocab * h * (2 if self.untied else 1) + h


@dataclass(frozen=True)
class TrainLayout:
    """How one training step runs: parallel sizes, tokens, recompute, optimizer placement."""

    gpus: int
    tp: int = 1
    pp: int = 1
    first_stage_layers: int | None = None  # an uneven pipeline split (decoder_first/last_pipeline_num_layers)
    last_stage_layers: int | None = None
    cp: int = 1
    ep: int = 1
    etp: int = 1
    sp: bool = False
    tokens: int = 4096  # per GPU per micro-batch, after the CP split
    recompute: str = "none"  # none | selective | full
    recompute_method: str = "uniform"  # uniform | block
    recompute_layers: int = 1
    attention: str = "flash"  # flash (production: TE / flash-attn) | unfused (megatron-core's local spec)
    grads_fp32: bool = True
    cpu_offload: bool = False
    fused_adam: bool = True  # TE/apex FusedAdam; torch's foreach AdamW needs a temporary of 4 B a parameter
    extra_logit_bytes: int = 0  # slime's log-prob path: entropy and temperature add fp32 copies of the logits

    @property
    def dp(self) -> int:
        """What the distributed optimizer shards dense parameters over: data parallel with CP in it."""
        return max(1, self.gpus // (self.tp * self.pp))

    @property
    def expert_dp(self) -> int:
        return max(1, self.gpus // (self.ep * self.etp * self.pp))

    @classmethod
    def of(cls, preset: "Preset", run: "Run") -> "TrainLayout":
        p, alloc = run.perf, run.train.allocation
        sample = -(-(PROMPT_TOKENS + run.rollout.rollout_max_response_len) // p.context_parallel_size)
        if p.use_dynamic_batch_size and p.max_tokens_per_gpu:
            # slime packs micro-batches up to max_tokens_per_gpu, but a longer sample gets one of its own.
            tokens = max(p.max_tokens_per_gpu, sample)
        else:
            tokens = (p.micro_batch_size or 1) * sample
        recompute = {"full": "full", "selective": "selective"}.get(p.recompute_granularity or "", "none")
        return cls(gpus=alloc.nodes * alloc.gpus_per_node, tp=p.tensor_model_parallel_size,
                   pp=p.pipeline_model_parallel_size, first_stage_layers=p.decoder_first_pipeline_num_layers,
                   last_stage_layers=p.decoder_last_pipeline_num_layers, cp=p.context_parallel_size, ep=p.expert_model_parallel_size,
                   etp=p.expert_tensor_parallel_size, sp=p.sequence_parallel, tokens=tokens, recompute=recompute,
                   recompute_method=p.recompute_method or "uniform", recompute_layers=p.recompute_num_layers or 1,
                   attention="unfused" if run.misc.attention_backend == "local" else "flash",
                   grads_fp32=run.misc.accumulate_allreduce_grads_in_fp32,
                   cpu_offload=run.optimizer.optimizer_cpu_offload,
                   extra_logit_bytes=ENTROPY_LOGIT + (TEMPERATURE_LOGIT if run.rollout.rollout_temperature != 1 else 0))

    @classmethod
    def of_probe(cls, p: dict) -> "TrainLayout":
        # The probe machine: megatron-core's local spec and torch's AdamW (no TE, no apex there).
        return cls(gpus=1, tokens=p["seq_length"], recompute=p["recompute"], recompute_layers=p.get("recompute_layers", 1),
                   attention="unfused", fused_adam=False)


# slime computes log-probs and entropy from the same fp32 logits (counted from its code, not measured):
ENTROPY_LOGIT = 4  # its policy loss always computes the entropy in the graph: the fp32 logits stay for backward
TEMPERATURE_LOGIT = 4  # logits / temperature is one more fp32 copy when the temperature is not 1

# Prompt length where the config has none (slime truncates nothing by default): an assumption,
# shown as one under --explain.
PROMPT_TOKENS = 1024
