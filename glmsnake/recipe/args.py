"""slime/Megatron/SGLang argument groups as typed models.

A field named `foo_bar` is the flag `--foo-bar` (SGLang fields get the
`--sglang-` prefix from their group). Unset (None) and False fields are not
rendered; True renders the bare flag; a list renders its items after the flag.
Unknown keys are rejected, so a typo in a preset is an error, not a silent no-op.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import (BaseModel, ConfigDict, Field, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt,
                      model_validator)

Scalar = int | float | str
Value = bool | Scalar | list[Scalar] | None


class FlagGroup(BaseModel):
    """One of slime's argument groups (MODEL_ARGS, ROLLOUT_ARGS, ...)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    prefix: ClassVar[str] = "--"

    def render(self) -> list[str]:
        args: list[str] = []
        for name, value in self:
            args += render_flag(self.prefix + name.replace("_", "-"), value)
        return args


def render_flag(flag: str, value: Any) -> list[str]:
    if value is None or value is False:
        return []
    if value is True:
        return [flag]
    if isinstance(value, (list, tuple)):
        return [flag, *(_str(v) for v in value)]
    return [flag, _str(value)]


def _str(value: Any) -> str:
    # Python's repr is the shortest spelling that round-trips (1e-06, 0.2, 2.5).
    return repr(value) if isinstance(value, float) else str(value)


class ModelArgs(FlagGroup):
    """MODEL_ARGS: the architecture. Only these (plus the weights) decide torch_dist staleness."""

    disable_bias_linear: bool = False
    qk_layernorm: bool = False
    group_query_attention: bool = False
    num_attention_heads: PositiveInt
    num_query_groups: PositiveInt | None = None  # Megatron's default: one group per head
    kv_channels: PositiveInt
    num_layers: PositiveInt
    hidden_size: PositiveInt
    ffn_hidden_size: PositiveInt
    add_qkv_bias: bool = False
    normalization: str = "RMSNorm"
    norm_epsilon: float | None = None
    position_embedding_type: str = "rope"
    rotary_percent: float = 1.0
    swiglu: bool = False
    untie_embeddings_and_output_weights: bool = False
    vocab_size: PositiveInt
    rotary_base: int | float
    moe_ffn_hidden_size: PositiveInt
    moe_shared_expert_intermediate_size: NonNegativeInt
    moe_router_pre_softmax: bool = False
    moe_router_score_function: str = "sigmoid"
    moe_router_enable_expert_bias: bool = False
    moe_router_bias_update_rate: float | None = None
    moe_router_load_balancing_type: str | None = None
    moe_token_dispatcher_type: str | None = None
    moe_router_topk: PositiveInt
    moe_router_topk_scaling_factor: float | None = None
    moe_layer_freq: str
    num_experts: PositiveInt
    moe_grouped_gemm: bool = False
    moe_router_dtype: str | None = None
    moe_permute_fusion: bool = False
    moe_aux_loss_coeff: float | None = None
    mtp_num_layers: NonNegativeInt | None = None
    # Multi-latent attention (GLM-4.7-Flash); Megatron's qk_head_dim is the part without RoPE.
    multi_latent_attention: bool = False
    q_lora_rank: PositiveInt | None = None
    kv_lora_rank: PositiveInt | None = None
    qk_head_dim: PositiveInt | None = None
    v_head_dim: PositiveInt | None = None
    qk_pos_emb_head_dim: PositiveInt | None = None
    make_vocab_size_divisible_by: PositiveInt | None = None
    no_position_embedding: bool = False
    no_rope_fusion: bool = False

    @model_validator(mode="after")
    def _mla_dims(self) -> "ModelArgs":
        missing = [n for n in ("kv_lora_rank", "qk_head_dim", "v_head_dim", "qk_pos_emb_head_dim") if getattr(self, n) is None]
        if self.multi_latent_attention and missing:
            raise ValueError(f"multi_latent_attention needs {', '.join(missing)} (GLM-4.7-Flash: kv_lora_rank 512, "
                             "qk_head_dim 192, v_head_dim 256, qk_pos_emb_head_dim 64)")
        return self

    @property
    def query_groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    @property
    def dense_layers(self) -> list[int]:
        """Layer indices of the dense (non-MoE) layers, from `--moe-layer-freq`."""
        return [i for i, moe in enumerate(self.layer_is_moe) if not moe]

    @property
    def layer_is_moe(self) -> list[bool]:
        return [bool(x) for x in parse_layer_freq(self.moe_layer_freq, self.num_layers)]


def parse_layer_freq(expr: str, num_layers: int) -> list[int]:
    """Evaluate Megatron's `--moe-layer-freq`: an int (every Nth layer) or a list expression.

    Only list literals, ints, `*` and `+` are allowed, the subset slime's scripts use.
    """
    import ast

    expr = str(expr).strip()
    if expr.isdigit():
        n = int(expr)
        return [1 if i % n == 0 else 0 for i in range(num_layers)]

    def ev(node: ast.AST) -> Any:
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.List):
            return [ev(e) for e in node.elts]
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Mult, ast.Add)):
            left, right = ev(node.left), ev(node.right)
            return left * right if isinstance(node.op, ast.Mult) else left + right
        raise ValueError(f"unsupported element in moe_layer_freq: {ast.dump(node)}")

    try:
        freq = ev(ast.parse(expr, mode="eval").body)
    except (SyntaxError, ValueError, TypeError) as e:
        raise ValueError(f"moe_layer_freq {expr!r} is not an int or a list like [0]*3+[1]*89: {e}") from e
    if not isinstance(freq, list) or len(freq) != num_layers or any(x not in (0, 1) for x in freq):
        raise ValueError(
            f"moe_layer_freq {expr!r} must give one 0/1 per layer ({num_layers} layers), "
            f"got {len(freq) if isinstance(freq, list) else freq!r}"
        )
    return freq


class RolloutArgs(FlagGroup):
    input_key: str = "prompt"
    label_key: str = "label"
    apply_chat_template: bool = False
    rollout_shuffle: bool = False
    rm_type: str | None = None
    num_rollout: PositiveInt
    rollout_batch_size: PositiveInt
    n_samples_per_prompt: PositiveInt
    rollout_max_response_len: PositiveInt
    rollout_temperature: NonNegativeFloat = 1.0
    global_batch_size: PositiveInt | None = None
    over_sampling_batch_size: PositiveInt | None = None
    dynamic_sampling_filter_path: str | None = None
    num_steps_per_rollout: PositiveInt | None = None  # None with global_batch_size: that decides; with neither: 1
    balance_data: bool = False
    rollout_stop_token_ids: list[int] | None = None
    rollout_seed: int | None = None

    @model_validator(mode="after")
    def _one_step_unless_said(self) -> "RolloutArgs":
        # With neither set, Megatron would make global_batch_size = micro-batch x DP (many steps a
        # rollout); glmsnake's default is one optimizer step per rollout, said on the command line.
        if self.num_steps_per_rollout is None and self.global_batch_size is None:
            self.num_steps_per_rollout = 1
        return self

    @property
    def samples_per_rollout(self) -> int:
        return self.rollout_batch_size * self.n_samples_per_prompt

    @property
    def steps_per_rollout(self) -> int:
        """Optimizer steps per rollout, as slime derives them: num_steps_per_rollout, else
        rollout_batch_size x n_samples_per_prompt / global_batch_size."""
        if self.num_steps_per_rollout:
            return self.num_steps_per_rollout
        return max(1, self.samples_per_rollout // (self.global_batch_size or self.samples_per_rollout))


class EvalArgs(FlagGroup):
    eval_interval: PositiveInt | None = None
    n_samples_per_eval_prompt: PositiveInt = 1
    eval_max_response_len: PositiveInt | None = None
    eval_temperature: NonNegativeFloat | None = None
    eval_top_p: Annotated[float, Field(gt=0, le=1)] | None = None


class PerfArgs(FlagGroup):
    """PERF_ARGS: the parallel layout. Never part of torch_dist's staleness."""

    tensor_model_parallel_size: int = 1
    sequence_parallel: bool = False
    pipeline_model_parallel_size: int = 1
    context_parallel_size: int = 1
    expert_model_parallel_size: int = 1
    expert_tensor_parallel_size: int = 1
    decoder_first_pipeline_num_layers: PositiveInt | None = None  # an uneven split: these stages' own counts
    decoder_last_pipeline_num_layers: PositiveInt | None = None
    recompute_granularity: str | None = None
    recompute_method: str | None = None
    recompute_num_layers: PositiveInt | None = None
    use_dynamic_batch_size: bool = False
    max_tokens_per_gpu: PositiveInt | None = None
    micro_batch_size: PositiveInt | None = None


class GrpoArgs(FlagGroup):
    advantage_estimator: str = "grpo"
    use_kl_loss: bool = False
    kl_loss_coef: NonNegativeFloat = 0.0
    kl_loss_type: str | None = None
    kl_coef: NonNegativeFloat = 0.0
    entropy_coef: NonNegativeFloat = 0.0
    eps_clip: PositiveFloat = 0.2
    eps_clip_high: PositiveFloat | None = None
    use_tis: bool = False


class OptimizerArgs(FlagGroup):
    optimizer: str = "adam"
    lr: PositiveFloat
    lr_decay_style: str = "constant"
    weight_decay: NonNegativeFloat = 0.0
    adam_beta1: Annotated[float, Field(ge=0, lt=1)] = 0.9
    adam_beta2: Annotated[float, Field(ge=0, lt=1)] = 0.98
    optimizer_cpu_offload: bool = False
    overlap_cpu_optimizer_d2h_h2d: bool = False
    use_precision_aware_optimizer: bool = False


class SglangArgs(FlagGroup):
    """SGLANG_ARGS. `rollout_num_gpus_per_engine` is slime's; the rest get `--sglang-`."""

    prefix: ClassVar[str] = "--sglang-"
    rollout_num_gpus_per_engine: int = 1
    mem_fraction_static: Annotated[float, Field(gt=0, le=1)] | None = None
    enable_dp_attention: bool = False
    dp_size: int | None = None
    ep_size: int | None = None
    enable_dp_lm_head: bool = False
    moe_dense_tp_size: int | None = None
    ep_num_redundant_experts: int | None = None
    cuda_graph_bs: list[int] | None = None
    cuda_graph_max_bs: int | None = None
    max_running_requests: int | None = None
    speculative_algorithm: str | None = None
    speculative_num_steps: int | None = None
    speculative_eagle_topk: int | None = None
    speculative_num_draft_tokens: int | None = None
    moe_a2a_backend: str | None = None
    deepep_mode: str | None = None

    def render(self) -> list[str]:
        args = ["--rollout-num-gpus-per-engine", str(self.rollout_num_gpus_per_engine)]
        for name, value in self:
            if name != "rollout_num_gpus_per_engine":
                args += render_flag(self.prefix + name.replace("_", "-"), value)
        return args


class MtpArgs(FlagGroup):
    enable_mtp_training: bool = False
    mtp_loss_scaling_factor: float | None = None


class TrackingArgs(FlagGroup):
    """slime's W&B and TensorBoard flags (WANDB_ARGS in its scripts). glmsnake adds a stable
    `--wandb-run-id`, `--wandb-dir` and `--wandb-group` per run; the API key comes only from the
    environment (WANDB_API_KEY), never from the config or the command line."""

    use_wandb: bool = False
    wandb_project: str | None = None
    wandb_group: str | None = None  # default: the run's name
    wandb_team: str | None = None
    wandb_host: str | None = None
    wandb_mode: Literal["online", "offline", "disabled"] | None = None
    use_tensorboard: bool = False
    tb_project_name: str | None = None  # default: the model's name
    tb_experiment_name: str | None = None  # default: the run's name

    @model_validator(mode="before")
    @classmethod
    def _no_key(cls, v: Any) -> Any:
        if isinstance(v, dict) and {"wandb_key", "wandb_api_key"} & set(v):
            raise ValueError("a W&B key does not belong in the config (it would reach logs and the rendered "
                             "command); export WANDB_API_KEY in the shell that runs snakemake instead")
        return v


class MiscArgs(FlagGroup):
    attention_dropout: float | None = None
    hidden_dropout: float | None = None
    accumulate_allreduce_grads_in_fp32: bool = False
    attention_softmax_in_fp32: bool = False
    attention_backend: str | None = None
    moe_token_dispatcher_type: str | None = None
    moe_enable_deepep: bool = False
