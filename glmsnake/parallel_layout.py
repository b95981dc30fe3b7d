"""Checks of the parallel layout and feature combinations, run before anything is allocated.

Each check returns the problem and the fix; `workflow_problems` lists them and `resolve.load`
raises them together (with the input checks),
so a user sees every mistake of a config in one go.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from glmsnake.errors import GlmsnakeError
from glmsnake.recipe.args import parse_layer_freq
from glmsnake.recipe.command import sglang_args

if TYPE_CHECKING:
    from glmsnake.config import Preset, Run, Workflow


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def pipeline_layers(num_layers: int, pp: int, first: int | None, last: int | None) -> list[int]:
    """Layers per pipeline stage, as Megatron splits them: the stated first/last counts, the rest evenly."""
    if pp == 1:
        return [num_layers]
    middle = pp - (first is not None) - (last is not None)
    rest = num_layers - (first or 0) - (last or 0)
    each = rest // middle if middle else 0
    return ([first] if first is not None else []) + [each] * middle + ([last] if last is not None else [])


def _pipeline_split(layers: int, pp: int, first: int | None, last: int | None) -> list[tuple[str, str]]:
    """Megatron's own rule: without first/last counts PP divides the layers; with them, the
    remaining stages share the remaining layers evenly."""
    if first is None and last is None:
        if layers % pp:
            # As slime's converter splits: the last stage (output layer, loss, MTP) takes the fewest.
            each = -(-layers // pp)
            last = layers - (pp - 1) * each
            hint = (f"set perf.decoder_last_pipeline_num_layers: {last} ({each} on each other stage), or "
                    if last > 0 else "choose ")
            return [(f"PP={pp} does not divide the {layers} layers", f"{hint}a PP dividing {layers}")]
        return []
    if pp == 1:
        return [("decoder_first/last_pipeline_num_layers need pipeline parallelism", "set pipeline_model_parallel_size >= 2, or drop them")]
    middle = pp - (first is not None) - (last is not None)
    rest = layers - (first or 0) - (last or 0)
    if rest < 0 or bool(rest) != bool(middle) or (middle and rest % middle):
        return [(f"with {first or 0} layers first and {last or 0} last, the other {middle} pipeline stages cannot "
                 f"split the remaining {rest} of {layers} layers evenly",
                 "choose decoder_first/last_pipeline_num_layers so that the rest divides evenly")]
    return []


def check_run(preset: "Preset", run: "Run") -> list[tuple[str, str]]:
    """All layout problems of one run, as (problem, fix) pairs."""
    m, p, alloc = preset.model, run.perf, run.train.allocation
    tp, pp, cp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.context_parallel_size
    ep, etp = p.expert_model_parallel_size, p.expert_tensor_parallel_size
    gpus = alloc.nodes * alloc.gpus_per_node
    out: list[tuple[str, str]] = []

    for name, val in (("tensor", tp), ("pipeline", pp), ("context", cp), ("expert", ep), ("expert tensor", etp)):
        if val < 1:
            out.append((f"{name} parallel size is {val}", "parallel sizes must be >= 1"))
    if out:
        return out
    if gpus < 1:
        out.append((f"train.allocation gives {gpus} GPUs", "set nodes and gpus_per_node to at least 1"))
        return out
    if alloc.gpus_per_node > preset.hardware.gpus_per_node:
        out.append((f"train.allocation asks for {alloc.gpus_per_node} GPUs a node, but the hardware has "
                    f"{preset.hardware.gpus_per_node}",
                    f"set train.allocation.gpus_per_node <= {preset.hardware.gpus_per_node}, or hardware.gpus_per_node "
                    "to what your nodes have (overrides: {hardware: ...})"))

    for what, n in (("attention heads", m.num_attention_heads), ("query groups", m.query_groups)):
        if n % tp:
            ok = [d for d in _divisors(n) if d <= gpus]
            out.append((f"TP={tp} does not divide the {n} {what}", f"set tensor_model_parallel_size to one of {ok}"))
    if tp * pp * cp > gpus or gpus % (tp * pp * cp):
        out.append(
            (
                f"TP x PP x CP = {tp}x{pp}x{cp} = {tp * pp * cp} does not divide the {gpus} actor GPUs "
                f"({alloc.nodes} nodes x {alloc.gpus_per_node}), so TP x PP x CP x DP cannot equal {gpus}",
                f"choose TP, PP, CP whose product divides {gpus}, or change train.allocation",
            )
        )
    if pp > m.num_layers:
        out.append((f"PP={pp} is more than the {m.num_layers} layers", f"set pipeline_model_parallel_size <= {m.num_layers}"))
    else:
        out += _pipeline_split(m.num_layers, pp, p.decoder_first_pipeline_num_layers, p.decoder_last_pipeline_num_layers)
    if m.num_experts % ep:
        out.append(
            (
                f"EP={ep} does not divide the {m.num_experts} experts",
                f"set expert_model_parallel_size to one of {[d for d in _divisors(m.num_experts) if d <= gpus]}",
            )
        )
    # Megatron folds experts over TP x CP x DP of each pipeline stage: EP x ETP must divide it.
    stage = gpus // pp if gpus % pp == 0 else 0
    if stage and stage % (ep * etp):
        out.append(
            (
                f"EP x ETP = {ep}x{etp} = {ep * etp} does not divide the expert-parallel world of "
                f"{stage} GPUs per pipeline stage ({gpus} GPUs / PP={pp})",
                f"choose EP x ETP dividing {stage}",
            )
        )

    sg = sglang_args(run)
    per_engine = sg.rollout_num_gpus_per_engine
    if per_engine < 1 or gpus % per_engine:
        out.append(
            (
                f"rollout_num_gpus_per_engine={per_engine} does not divide the {gpus} rollout GPUs",
                f"set it to one of {_divisors(gpus)}",
            )
        )
    else:
        for flag, size in (("sglang dp_size", sg.dp_size), ("sglang ep_size", sg.ep_size)):
            if size is not None and (size < 1 or per_engine % size):
                out.append(
                    (
                        f"{flag}={size} does not divide the {per_engine} GPUs per rollout engine",
                        f"set {flag.split()[1]} to one of {_divisors(per_engine)}",
                    )
                )
        ep_size = sg.ep_size or 1
        if ep_size > 1 and m.num_experts % ep_size and not sg.ep_num_redundant_experts:
            need = -m.num_experts % ep_size
            out.append(
                (
                    f"the {ep_size} rollout GPUs of expert parallelism do not divide the {m.num_experts} experts",
                    f"add sglang ep_num_redundant_experts: {need} (--sglang-ep-num-redundant-experts), "
                    f"or choose an ep_size dividing {m.num_experts}",
                )
            )

    r = run.rollout
    dp = gpus // (tp * pp * cp) if gpus % (tp * pp * cp) == 0 else 0
    if r.global_batch_size and r.global_batch_size > r.samples_per_rollout:
        out.append((f"global_batch_size={r.global_batch_size} is more than a rollout's {r.samples_per_rollout} samples "
                    f"(rollout_batch_size x n_samples_per_prompt)", f"set global_batch_size <= {r.samples_per_rollout}"))
    mbs = run.perf.micro_batch_size or 1
    if r.global_batch_size and dp and r.global_batch_size % (mbs * dp):
        # Megatron's micro-batch calculator asserts this at start-up, after the allocation.
        out.append((f"global_batch_size={r.global_batch_size} is not a multiple of micro_batch_size x DP = {mbs} x {dp}",
                    f"choose a global_batch_size that {mbs * dp} divides"))
    if r.num_steps_per_rollout and r.global_batch_size and \
            r.global_batch_size != r.rollout_batch_size * r.n_samples_per_prompt // r.num_steps_per_rollout:
        # slime's own check at start-up (after the allocation): the two must agree.
        out.append((f"global_batch_size={r.global_batch_size} disagrees with rollout_batch_size x n_samples_per_prompt / "
                    f"num_steps_per_rollout = {r.rollout_batch_size} x {r.n_samples_per_prompt} / {r.num_steps_per_rollout}",
                    "set only one of global_batch_size and num_steps_per_rollout"))
    if run.train.backend == "slime" and run.rollout.num_rollout % run.train.save_interval:
        # slime saves only on save_interval boundaries; the run's sentinel needs the final checkpoint.
        out.append(
            (
                f"num_rollout={run.rollout.num_rollout} is not a multiple of save_interval={run.train.save_interval}, "
                "so slime would not save the final checkpoint",
                "choose a save_interval that divides num_rollout",
            )
        )
    if preset.export.backend == "slime" and run.train.backend == "local":
        out.append(("export.backend slime runs slime's converter, which reads slime's own checkpoints (their "
                    "common.pt holds slime's args); this run trains with the local trainer",
                    "set export.backend: glmsnake (it reads either), or train.backend: slime"))
    if run.features.mtp_training and not (m.mtp_num_layers or 0) >= 1:
        out.append(("features.mtp_training needs an MTP layer", "set model.mtp_num_layers: 1 (GLM-4.7 has one)"))
    if run.features.mtp_training and not run.mtp.enable_mtp_training:
        out.append(("features.mtp_training is on but mtp.enable_mtp_training is off", "set mtp.enable_mtp_training: true"))
    if run.features.mtp_speculative_decoding and not (m.mtp_num_layers or 0) >= 1:
        out.append(
            ("MTP speculative decoding needs the model's MTP layer", "set model.mtp_num_layers: 1, or turn the feature off")
        )
    if run.features.fp8_rollout and sg.moe_a2a_backend == "deepep" and preset.convert.fp8.strategy != "block":
        out.append(
            (
                f"FP8 rollout with DeepEP needs block FP8, but convert.fp8.strategy is {preset.convert.fp8.strategy!r}",
                "set convert.fp8.strategy: block",
            )
        )
    return out


def check_model(preset: "Preset") -> list[tuple[str, str]]:
    """MODEL args that make no GLM MoE: caught here, not as a ZeroDivisionError in conversion."""
    m = preset.model
    out = []
    if m.multi_latent_attention and m.group_query_attention:
        out.append(("multi_latent_attention and group_query_attention are both on; Megatron refuses the pair at start-up",
                    "drop group_query_attention (GLM-4.7-Flash's MLA has none)"))
    if m.num_attention_heads % m.query_groups:
        out.append((f"num_query_groups={m.query_groups} does not divide num_attention_heads={m.num_attention_heads}",
                    f"set num_query_groups to one of {_divisors(m.num_attention_heads)}"))
    if m.moe_router_topk > m.num_experts:
        out.append((f"moe_router_topk={m.moe_router_topk} is more than the {m.num_experts} experts",
                    f"set moe_router_topk <= {m.num_experts}"))
    if m.moe_shared_expert_intermediate_size % m.moe_ffn_hidden_size:
        out.append((f"moe_shared_expert_intermediate_size={m.moe_shared_expert_intermediate_size} is not a multiple "
                    f"of moe_ffn_hidden_size={m.moe_ffn_hidden_size} (GLM's shared experts are whole experts)",
                    f"set it to a multiple of {m.moe_ffn_hidden_size}"))
    return out


def workflow_problems(wf: "Workflow") -> list[str]:
    """Every layout and model problem of a workflow, each with its fix."""
    problems: list[str] = []
    for problem, fix in check_model(wf.preset):
        problems.append(f"model: {problem}\n    fix: {fix}")

    try:
        parse_layer_freq(wf.preset.model.moe_layer_freq, wf.preset.model.num_layers)
    except ValueError as e:
        problems.append(f"model.moe_layer_freq: {e}\n    fix: write one 0/1 per layer, e.g. [0]*3+[1]*89")
    for name, run in wf.runs.items():
        for problem, fix in check_run(wf.preset, run):
            problems.append(f"runs.{name}: {problem}\n    fix: {fix}")
    return problems


def check_launcher(wf: "Workflow") -> None:
    """For a workflow that will run (the Snakefile; `render` only shows): each run's backend can run
    on its launcher. slime needs the GPU cluster; found here, not after the downloads and conversions."""
    problems = [
        f"runs.{name}: train.backend slime runs slime's train.py on GPU nodes, but the launcher is "
        f"{wf.user.launcher!r}\n    fix: run with --profile slurm (launcher: slurm), or set train.backend: local"
        for name, run in wf.runs.items() if run.train.backend == "slime" and wf.user.launcher != "slurm"
    ]
    if problems:
        raise GlmsnakeError("impossible configuration:\n  " + "\n  ".join(problems), "see each fix above")
