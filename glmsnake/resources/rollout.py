"""SGLang's share of a rollout GPU: the weights each engine GPU loads, and the KV cache left for tokens.

SGLang sizes its static memory as `mem_fraction_static` x the GPU's memory: the weights come out
of it first and the rest becomes the KV-cache pool. So the weights must fit inside the fraction,
and the pool decides how many tokens run at once; more requests than fit are queued, which makes
the rollout slower, not failed.
"""

from __future__ import annotations

from dataclasses import dataclass

from glmsnake.resources.shapes import PROMPT_TOKENS, ModelShape
from glmsnake.resources.storage import BF16, FP8
from glmsnake.resources.terms import Estimate
from glmsnake.resources.training import CONTEXT_BYTES

KV_BYTES = 2  # bf16 K and V
DEFAULT_MEM_FRACTION = 0.9  # SGLang's own default where the config sets none (an upper bound)


@dataclass(frozen=True)
class RolloutLayout:
    gpus: int  # rollout GPUs (the training allocation when colocated)
    per_engine: int
    dp_size: int = 1  # DP attention: attention runs TP over per_engine / dp_size
    ep_size: int = 1
    dense_tp: int | None = None  # moe_dense_tp_size: dense MLPs' TP (1: replicated)
    dp_lm_head: bool = False
    fp8: bool = False
    draft: bool = False  # MTP / EAGLE speculative decoding loads the MTP layer as a draft model
    mem_fraction: float = DEFAULT_MEM_FRACTION
    requests: int = 1  # sent at once: rollout batch (or over-sampling batch) x samples per prompt
    tokens_per_request: int = 1

    @property
    def engines(self) -> int:
        return max(1, self.gpus // self.per_engine)

    @property
    def attn_tp(self) -> int:
        return max(1, self.per_engine // max(1, self.dp_size))

    @classmethod
    def of(cls, run, gpus: int) -> "RolloutLayout":
        from glmsnake.recipe.command import sglang_args

        sg, r = sglang_args(run), run.rollout
        batch = max(r.rollout_batch_size, r.over_sampling_batch_size or 0)
        return cls(gpus=gpus, per_engine=sg.rollout_num_gpus_per_engine,
                   dp_size=sg.dp_size if sg.enable_dp_attention and sg.dp_size else 1,
                   ep_size=sg.ep_size or 1, dense_tp=sg.moe_dense_tp_size, dp_lm_head=sg.enable_dp_lm_head,
                   fp8=run.features.fp8_rollout, draft=run.features.mtp_speculative_decoding,
                   mem_fraction=sg.mem_fraction_static or DEFAULT_MEM_FRACTION,
                   requests=batch * r.n_samples_per_prompt,
                   tokens_per_request=PROMPT_TOKENS + r.rollout_max_response_len)


def kv_bytes_per_token(shape: ModelShape, lay: RolloutLayout, layers: int) -> float:
    """K and V of every layer for one token on one GPU: KV heads split over attention TP (never below one).
    Multi-latent attention caches one latent per layer, whole on every attention-TP rank."""
    if shape.kv_latent:
        return layers * shape.kv_latent * KV_BYTES
    heads = max(1.0, shape.query_groups / lay.attn_tp)
    return 2 * layers * heads * shape.head_dim * KV_BYTES


def rollout_estimate(shape: ModelShape, lay: RolloutLayout, gpu_bytes: float) -> tuple[Estimate, dict]:
    """(SGLang's static memory on one engine GPU, the KV-cache figures)."""
    est = Estimate("rollout GPU (SGLang)")
    q = FP8 if lay.fp8 else BF16
    layers = list(shape.layer_is_moe)
    attention = len(layers) * shape.attention_params() / lay.attn_tp
    experts = sum(layers) * shape.expert_params() / lay.per_engine  # EP or TP, experts spread over the engine
    shared = sum(layers) * 3 * shape.hidden * shape.shared_ffn / lay.attn_tp
    dense_tp = lay.dense_tp or lay.attn_tp
    dense = (len(layers) - sum(layers)) * shape.dense_mlp_params() / dense_tp
    embed_head = shape.vocab * shape.hidden * (1 / lay.attn_tp + 1 / (lay.attn_tp if lay.dp_lm_head else lay.per_engine))
    kind = "FP8 (1 B)" if lay.fp8 else "bf16 (2 B)"
    est.add("weights: attention", q * attention, f"{kind} x {len(layers)} layers / attention TP {lay.attn_tp}")
    est.add("weights: routed experts", q * experts, f"{kind} x {sum(layers)} MoE layers / {lay.per_engine} GPUs per engine")
    est.add("weights: shared experts, dense MLPs", q * (shared + dense),
            f"{kind}; dense MLPs / TP {dense_tp}")
    est.add("weights: embedding, lm_head", BF16 * embed_head, "bf16, vocabulary-parallel")
    draft_layers = shape.mtp_layers if lay.draft else 0
    if draft_layers:
        draft = draft_layers * (shape.attention_params() / lay.attn_tp + shape.expert_params() / lay.per_engine
                                + (3 * shape.hidden * shape.shared_ffn + shape.mtp_extra_params()) / lay.attn_tp)
        est.add("weights: MTP draft layer", q * draft, f"{draft_layers} layer(s) for speculative decoding")
    # SGLang: pool = free after loading - free before loading x (1 - mem_fraction_static), so
    # fraction x (GPU - context) - weights, with the CUDA context taken before either.
    budget = lay.mem_fraction * (gpu_bytes - CONTEXT_BYTES)
    pool = max(0.0, budget - est.total)
    est.add("KV-cache pool", pool, f"mem_fraction_static {lay.mem_fraction} x ({gpu_bytes / 2**30:.0f} GiB less the CUDA "
            "context), less the weights")
    per_token = kv_bytes_per_token(shape, lay, len(layers) + draft_layers)
    per_rank = pool / per_token if per_token else 0.0
    capacity = per_rank * max(1, lay.dp_size)  # each DP-attention rank has a pool of its own
    need = lay.requests * lay.tokens_per_request / lay.engines
    return est, {"weights": est.total - pool, "budget": budget, "kv_bytes_per_token": per_token,
                 "tokens_per_engine": capacity, "tokens_needed_per_engine": need,
                 "requests_per_engine": lay.requests / lay.engines, "tokens_per_request": lay.tokens_per_request}
