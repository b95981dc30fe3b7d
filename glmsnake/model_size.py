"""How big a GLM MoE is, from its MODEL args: parameters, and bytes per training checkpoint.

One count serves the disk guard (room for checkpoints before a job is submitted) and the
resource estimates. It follows the tensors the converters write (glmsnake/architectures/):
the architecture's attention tensors, dense MLPs in the first layers, routed experts
plus shared experts and a router in the others, and the MTP layers (each a full MoE layer plus
its input projection and norms).
"""

from __future__ import annotations

from glmsnake.recipe.args import ModelArgs

# A checkpoint with optimizer state per parameter: bf16 weights, fp32 master copy, Adam's two
# fp32 moments. 355e9 x 14 B = 5.0 TB for GLM-4.7, as slime's checkpoints measure.
CHECKPOINT_BYTES_PER_PARAMETER = 2 + 4 + 4 + 4


def layer_parameters(m: ModelArgs, moe: bool) -> int:
    h = m.hidden_size
    attention = attention_parameters(m)
    norms = 2 * h  # input and pre-MLP layer norms
    if not moe:
        return attention + norms + 3 * h * m.ffn_hidden_size  # SwiGLU: gate, up, down
    experts = m.num_experts * 3 * h * m.moe_ffn_hidden_size
    shared = 3 * h * m.moe_shared_expert_intermediate_size
    router = m.num_experts * h + (m.num_experts if m.moe_router_enable_expert_bias else 0)
    return attention + norms + experts + shared + router


def attention_parameters(m: ModelArgs) -> int:
    from math import prod

    from glmsnake import architectures

    return sum(prod(s) for s in architectures.of_model_args(m).attention_shapes(m))


def parameter_count(m: ModelArgs) -> int:
    h = m.hidden_size
    layers = sum(layer_parameters(m, moe) for moe in m.layer_is_moe)
    embedding = m.vocab_size * h * (2 if m.untie_embeddings_and_output_weights else 1)
    mtp = (m.mtp_num_layers or 0) * (layer_parameters(m, True) + 2 * h * h + 3 * h)  # eh_proj, enorm, hnorm, final norm
    return layers + embedding + h + mtp  # + the final norm


def checkpoint_bytes(m: ModelArgs) -> int:
    """Bytes of one training checkpoint with its optimizer state, before any is written."""
    return parameter_count(m) * CHECKPOINT_BYTES_PER_PARAMETER
