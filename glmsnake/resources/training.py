"""GPU memory of one training step, per GPU of each pipeline stage (first, middle, last).

The model is Megatron's, as slime runs it: bf16 weights, an fp32 gradient buffer
(`accumulate_allreduce_grads_in_fp32`), the distributed optimizer's fp32 master weights and two
Adam moments sharded over data parallel (on the host with CPU offload), activations kept for
backward, and the transient peak of the backward pass (the fp32 logits at the loss, or the
layers being recomputed).

Activation bytes per token are counted from the tensors megatron-core keeps for backward, in the
spirit of Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer
Models") and of Megatron-LM's theoretical memory report; the coefficients were then checked
against one training step measured on an H200 (tests/fixtures/gpu_memory_h200.json, twelve
GLM-4-MoE-shaped models, every prediction within 10%: benchmarks/planner_accuracy.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from glmsnake.resources.shapes import ModelShape, TrainLayout
from glmsnake.resources.terms import Estimate

# ---- measured constants (H200, torch 2.11 + CUDA 13, megatron-core 0.19.2)
CONTEXT_BYTES = 2.6e9  # device memory outside PyTorch's allocator: CUDA context, NCCL (2,595,028,992 B measured)
WORKSPACE_BYTES = 75e6  # allocated beside the model's tensors (cuBLAS workspace, RNG, rotary tables)
MASK_CACHE_BYTES = 16  # per (token x token): the local spec's unfused attention keeps causal masks between steps

# ---- bytes a parameter holds on the GPU
WEIGHT = 2  # bf16
GRAD_FP32, GRAD_BF16 = 4, 2
OPTIMIZER = 12  # fp32 master weight and Adam's two moments
TORCH_ADAM_TEMP = 4  # torch's foreach AdamW builds one fp32 temporary per parameter during step()

# ---- activation bytes a token keeps for backward, per layer (bf16 tensors; fp32 where megatron upcasts)
ATTN_H = 8  # input norm's input, QKV's input, pre-MLP norm's input, the residual branch
ATTN_Q = {"unfused": 10, "flash": 6}  # q-norm input, Q (and K, V expanded to all heads in the unfused path), context
ATTN_KV = {"unfused": 2, "flash": 6}  # k-norm input (and K, V themselves where flash keeps them unexpanded)
SCORE = 6  # unfused attention, per head and key: fp32 softmax output and its bf16 copy
SCORE_BACKWARD = 16  # the same during its backward: the scores' gradients in bf16 and fp32 on top
FLASH_STATS = 4  # flash attention, per head: the fp32 log-sum-exp
MLP_H, MLP_F = 2, 6  # dense MLP: fc1's input; per intermediate channel: fc1's output (gate, up) and SwiGLU's
MOE_H, MOE_ROUTED_H, MOE_E = 6, 4, 12  # router input in fp32 and the combine; per routed copy; router scores
MTP_H = 8  # the MTP layer's own norms and eh_proj input
RECOMPUTE_INPUT = 2  # full recompute keeps only each recomputed block's input
LOGIT = 10  # per vocabulary entry: bf16 logits, their fp32 copy, and the fp32 softmax kept for backward
MTP_LOGIT = 4  # the MTP head's fp32 softmax, kept beside the main one when nothing is recomputed


@dataclass(frozen=True)
class Stage:
    name: str  # first | middle | last | only
    layers: tuple[bool, ...]  # is_moe per layer of this stage
    embedding: bool
    head: bool  # output layer, final norm, MTP


def stages(shape: ModelShape, lay: TrainLayout) -> list[Stage]:
    """The first, a middle and the last stage, with Megatron's split of the layers over PP."""
    from glmsnake.parallel_layout import pipeline_layers

    pp = lay.pp
    counts = pipeline_layers(shape.layers, pp, lay.first_stage_layers, lay.last_stage_layers)
    starts = [sum(counts[:i]) for i in range(pp)]
    chunks = [shape.layer_is_moe[s:s + n] for s, n in zip(starts, counts)]
    if pp == 1:
        return [Stage("only", chunks[0], True, True)]
    out = [Stage("first", chunks[0], True, False)]
    if pp > 2:
        out.append(Stage("middle", chunks[1], False, False))  # the second: most micro-batches in flight
    return out + [Stage("last", chunks[-1], False, True)]


def stage_parameters(shape: ModelShape, lay: TrainLayout, st: Stage) -> tuple[float, float]:
    """(dense, expert) parameters one GPU of the stage holds: dense ones split over TP, experts over EP x ETP."""
    dense = expert = 0.0
    for moe in st.layers:
        dense += shape.attention_params() / lay.tp
        if moe:
            dense += shape.shared_and_router_params() / lay.tp
            expert += shape.expert_params() / (lay.ep * lay.etp)
        else:
            dense += shape.dense_mlp_params() / lay.tp
    if st.embedding:
        dense += shape.vocab * shape.hidden / lay.tp
    if st.head:
        dense += shape.vocab * shape.hidden / lay.tp + shape.hidden
        dense += shape.mtp_layers * (shape.attention_params() + shape.shared_and_router_params() + shape.mtp_extra_params()) / lay.tp
        expert += shape.mtp_layers * shape.expert_params() / (lay.ep * lay.etp)
    return dense, expert


def layer_activation(shape: ModelShape, lay: TrainLayout, moe: bool, keep_scores: bool) -> float:
    """Bytes one token keeps for backward in one layer, on one GPU."""
    h, tp = shape.hidden, lay.tp
    norm_side = ATTN_H * h / (tp if lay.sp else 1)  # outside TP regions, split only by sequence parallel
    inner = ATTN_Q[lay.attention] * shape.q + ATTN_KV[lay.attention] * shape.kv
    if lay.attention == "flash":
        inner += FLASH_STATS * shape.heads
    elif keep_scores:
        inner += SCORE * shape.heads * lay.tokens
    if moe:
        inner += MOE_H * h + shape.topk * (MOE_ROUTED_H * h + MLP_F * shape.expert_ffn / lay.etp) \
            + MLP_F * shape.shared_ffn + MOE_E * shape.experts
    else:
        inner += MLP_H * h + MLP_F * shape.ffn
    return norm_side + inner / tp


def recompute_window(shape: ModelShape, lay: TrainLayout, st: Stage) -> float:
    """Per token: the block of layers recomputed at once during backward, plus the gradients of
    the one whose backward runs (for the unfused path, its score gradients in bf16 and fp32)."""
    n = lay.recompute_layers if lay.recompute_method == "uniform" else 1
    kept = max((layer_activation(shape, lay, moe, True) for moe in st.layers), default=0.0)
    grads = max((layer_activation(shape, lay, moe, False) for moe in st.layers), default=0.0)
    if lay.attention == "unfused":
        grads += (SCORE_BACKWARD - SCORE) * shape.heads * lay.tokens / lay.tp
    return n * kept + grads


def stored_per_token(shape: ModelShape, lay: TrainLayout, st: Stage) -> float:
    """Per token, what one micro-batch keeps until its backward on this stage."""
    h = shape.hidden / (lay.tp if lay.sp else 1)
    layers = list(st.layers) + ([True] * shape.mtp_layers if st.head else [])
    extra = MTP_H * h * shape.mtp_layers if st.head else 0.0
    if lay.recompute == "full" and lay.recompute_method == "uniform":
        return RECOMPUTE_INPUT * h * -(-len(layers) // lay.recompute_layers) + extra
    if lay.recompute == "full":  # block: the first N layers of the stage keep only their input
        n = min(lay.recompute_layers, len(layers))
        return RECOMPUTE_INPUT * h * n + sum(layer_activation(shape, lay, m, True) for m in layers[n:]) + extra
    keep_scores = lay.recompute != "selective"  # selective recomputes the core attention
    return sum(layer_activation(shape, lay, m, keep_scores) for m in layers) + extra


def logits_per_token(shape: ModelShape, lay: TrainLayout) -> float:
    mtp = MTP_LOGIT * shape.mtp_layers if lay.recompute != "full" else 0
    return (LOGIT + lay.extra_logit_bytes + mtp) * shape.vocab / lay.tp


def stage_estimate(shape: ModelShape, lay: TrainLayout, st: Stage, index: int) -> Estimate:
    est = Estimate(f"training GPU, {st.name} stage")
    dense, expert = stage_parameters(shape, lay, st)
    params = dense + expert
    grad = GRAD_FP32 if lay.grads_fp32 else GRAD_BF16
    inputs = f"{params / 1e9:.3f} B parameters on this GPU ({len(st.layers)} layers"
    inputs += (", embedding" if st.embedding else "") + (", output layer" + (f", {shape.mtp_layers} MTP" if shape.mtp_layers else "") if st.head else "")
    inputs += f"; dense / TP {lay.tp}, experts / EP {lay.ep} x ETP {lay.etp})"
    est.add("weights (bf16)", WEIGHT * params, f"{WEIGHT} B x {inputs}")
    est.add("gradient buffer", grad * params, f"{grad} B x parameters ({'fp32' if lay.grads_fp32 else 'bf16'} accumulation)")
    shard = dense / lay.dp + expert / lay.expert_dp
    if lay.cpu_offload:
        est.add("optimizer states", 0, f"on the host (CPU offload): {OPTIMIZER} B x {shard / 1e9:.3f} B parameters")
    else:
        est.add("optimizer states", OPTIMIZER * shard,
                f"{OPTIMIZER} B (fp32 master + 2 moments) x dense / DP {lay.dp} + experts / expert-DP {lay.expert_dp}")
    est.add("workspace", WORKSPACE_BYTES, "measured beside the model's tensors")
    if lay.attention == "unfused":
        est.add("causal mask cache", MASK_CACHE_BYTES * lay.tokens ** 2, f"{MASK_CACHE_BYTES} B x {lay.tokens}^2 tokens (unfused attention)")
    inflight = lay.pp - index if st.name != "only" else 1
    stored = stored_per_token(shape, lay, st) * lay.tokens
    est.add("activations kept", stored * inflight,
            f"{stored_per_token(shape, lay, st) / 1024:.1f} KiB/token x {lay.tokens} tokens x {inflight} micro-batch(es) "
            f"in flight (recompute {lay.recompute}, {lay.attention} attention, TP {lay.tp}{' + SP' if lay.sp else ''})")
    window = recompute_window(shape, lay, st) * lay.tokens if lay.recompute == "full" else 0.0
    if lay.recompute == "selective" and lay.attention == "unfused":  # one layer's core attention, recomputed
        window = SCORE_BACKWARD * shape.heads * lay.tokens / lay.tp * lay.tokens
    logits = logits_per_token(shape, lay) * lay.tokens if st.head else 0.0
    if window:
        peak_name, peak = ("fp32 logits at the loss", logits) if logits >= window else ("recomputed layers in backward", window)
    else:
        peak_name, peak = "fp32 logits at the loss", logits
    if peak:
        per_logit = logits_per_token(shape, lay) * lay.tp / shape.vocab
        how = (f"{per_logit:.0f} B x {shape.vocab} vocabulary / TP {lay.tp} x {lay.tokens} tokens"
               if peak is logits else f"{lay.recompute_layers} layer(s) with their gradients x {lay.tokens} tokens")
        est.add(peak_name, peak, how)
    temp = 0.0 if lay.fused_adam or lay.cpu_offload else TORCH_ADAM_TEMP * shard
    if temp > stored * inflight + peak:  # the optimizer step's peak, when it is the larger one
        est.add("optimizer step temporaries", temp - stored * inflight - peak,
                f"torch AdamW: {TORCH_ADAM_TEMP} B x {shard / 1e9:.3f} B parameters, beyond the activations")
    return est


def training_estimates(shape: ModelShape, lay: TrainLayout) -> list[Estimate]:
    """One estimate per distinct stage, allocator bytes only (add CONTEXT_BYTES for the device)."""
    sts = stages(shape, lay)
    index = {"first": 0, "middle": 1, "last": lay.pp - 1, "only": 0}
    return [stage_estimate(shape, lay, st, index[st.name]) for st in sts]


def peak_allocated(shape: ModelShape, lay: TrainLayout) -> float:
    return max(e.total for e in training_estimates(shape, lay))
