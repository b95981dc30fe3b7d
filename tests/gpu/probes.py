"""The GLM-4-MoE-shaped models whose training-step memory was measured on an H200.

Plain data for the probe (tests/gpu/memory_probe.py, on the GPU machine); each measurement in
tests/fixtures/gpu_memory_h200.json carries its probe, which the planner's CPU test reads. GLM-4-MoE's shape throughout: QK norm, QKV bias,
partial rotary 0.5, SwiGLU, sigmoid router with expert bias, one shared expert, dense first
layers, untied embeddings, the GLM vocabulary; TP = PP = EP = 1, micro-batch of one sequence.
`recompute`: none, selective (megatron-core's core attention) or full (uniform, `recompute_layers`
layers a block).
"""

from __future__ import annotations


def _probe(**kw) -> dict:
    base = dict(num_experts=0, moe_ffn_hidden_size=0, moe_shared_expert_intermediate_size=0, moe_router_topk=0,
                first_k_dense=0, mtp_num_layers=0, recompute_layers=1)
    return base | kw


_DENSE_S = dict(hidden_size=512, num_layers=4, num_attention_heads=8, num_query_groups=2, kv_channels=64,
                ffn_hidden_size=2048, vocab_size=32768)
_DENSE_M = dict(hidden_size=2048, num_layers=12, num_attention_heads=8, num_query_groups=2, kv_channels=128,
                ffn_hidden_size=8192, vocab_size=151552)
_MOE_S = dict(hidden_size=1024, num_layers=6, first_k_dense=1, num_attention_heads=8, num_query_groups=2,
              kv_channels=128, ffn_hidden_size=4096, num_experts=16, moe_router_topk=4, moe_ffn_hidden_size=512,
              moe_shared_expert_intermediate_size=512, vocab_size=151552)
_MOE_L = dict(hidden_size=2048, num_layers=14, first_k_dense=1, num_attention_heads=16, num_query_groups=4,
              kv_channels=128, ffn_hidden_size=8192, num_experts=64, moe_router_topk=8, moe_ffn_hidden_size=768,
              moe_shared_expert_intermediate_size=768, vocab_size=151552)

PROBES: dict[str, dict] = {
    "dense-s-2k-none": _probe(**_DENSE_S, seq_length=2048, recompute="none"),
    "dense-m-8k-none": _probe(**_DENSE_M, seq_length=8192, recompute="none"),
    "dense-m-16k-full": _probe(**_DENSE_M, seq_length=16384, recompute="full"),
    "moe-s-2k-none": _probe(**_MOE_S, seq_length=2048, recompute="none"),
    "moe-s-4k-none-mtp": _probe(**_MOE_S, seq_length=4096, recompute="none", mtp_num_layers=1),
    "moe-s-8k-full-mtp": _probe(**_MOE_S, seq_length=8192, recompute="full", mtp_num_layers=1),
    "moe-s-16k-full-mtp": _probe(**_MOE_S, seq_length=16384, recompute="full", mtp_num_layers=1),
    "moe-l-2k-none": _probe(**_MOE_L, seq_length=2048, recompute="none"),
    "moe-l-4k-full-mtp": _probe(**_MOE_L, seq_length=4096, recompute="full", mtp_num_layers=1),
    "dense-m-8k-full2": _probe(**_DENSE_M, seq_length=8192, recompute="full", recompute_layers=2),
    "dense-m-8k-selective": _probe(**_DENSE_M, seq_length=8192, recompute="selective"),
    "moe-s-4k-selective-mtp": _probe(**_MOE_S, seq_length=4096, recompute="selective", mtp_num_layers=1),
}
