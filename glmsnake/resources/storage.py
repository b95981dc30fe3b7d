"""Bytes under base_dir: each output of the DAG, the checkpoints a run keeps, and what is still to come.

Sizes come from the model's tensors (the HF checkpoint's dtypes, the FP8 allow-list, one
checkpoint's optimizer state), never from reading an output, so a dry run stays as fast with
5 TB present as with nothing. A step whose sentinel exists has written its output already.
"""

from __future__ import annotations

import functools
import json
from typing import TYPE_CHECKING

from glmsnake import model_size, retention
from glmsnake.disk import human
from glmsnake.resources.terms import Estimate, count
from glmsnake.resources.training import OPTIMIZER

if TYPE_CHECKING:
    from glmsnake.config import Run, Workflow
    from glmsnake.recipe.args import ModelArgs

BF16, FP32, FP8 = 2, 4, 1
# Beside the tensors, measured on the tiny preset's outputs: a safetensors header entry plus the
# index's line per HF tensor; DCP's framing of each item plus its .metadata entry per torch_dist
# key; the small files of a folder (config, tokenizer, common.pt, sentinel).
HF_PER_TENSOR = 200
DCP_PER_ITEM = 1600
FOLDER_FILES = 12 * 1024


def tensor_counts(m: "ModelArgs") -> tuple[int, int]:
    """(HF tensors, torch_dist items: tensors and extra states) from the name mapping the converters use."""
    return _tensor_counts(m.model_dump_json())


@functools.lru_cache(maxsize=8)
def _tensor_counts(model_json: str) -> tuple[int, int]:
    from glmsnake import architectures
    from glmsnake.recipe.args import ModelArgs

    m = ModelArgs.model_validate_json(model_json)
    arch = architectures.of_model_args(m)
    us = arch.units(arch.shape(arch.hf_fields(m)))
    return sum(len(u.hf_keys) for u in us), sum(len(u.tensors) + len(u.extra_states) for u in us)


def hf_payload(m: "ModelArgs") -> float:
    """Bytes of the HF checkpoint's tensors: bf16, the routers' expert bias in fp32."""
    params = model_size.parameter_count(m)
    moe_layers = sum(m.layer_is_moe) + (m.mtp_num_layers or 0)
    bias = moe_layers * m.num_experts if m.moe_router_enable_expert_bias else 0
    return BF16 * (params - bias) + FP32 * bias


def hf_bytes(m: "ModelArgs") -> float:
    return hf_payload(m) + HF_PER_TENSOR * tensor_counts(m)[0] + FOLDER_FILES


def torch_dist_bytes(m: "ModelArgs") -> float:
    """The weights-only torch_dist checkpoint: the same tensors in Megatron's layout."""
    return hf_payload(m) + DCP_PER_ITEM * tensor_counts(m)[1] + FOLDER_FILES


def fp8_bytes(m: "ModelArgs", block: tuple[int, int]) -> float:
    """The FP8 folder: attention and MLP projections in FP8 with one fp32 scale per block, the rest as it was."""
    from glmsnake import architectures

    h, attention = m.hidden_size, architectures.of_model_args(m).quantized_attention_shapes(m)
    shapes: list[tuple[int, int]] = []
    for moe in list(m.layer_is_moe) + [True] * (m.mtp_num_layers or 0):
        shapes += attention
        widths = ([m.moe_ffn_hidden_size] * m.num_experts + ([m.moe_shared_expert_intermediate_size]
                  if m.moe_shared_expert_intermediate_size else [])) if moe else [m.ffn_hidden_size]
        for f in widths:
            shapes += [(f, h), (f, h), (h, f)]
    quantized = sum(r * c for r, c in shapes)
    scales = sum(-(-r // block[0]) * -(-c // block[1]) for r, c in shapes)
    tensors = tensor_counts(m)[0] + len(shapes)
    return hf_payload(m) - (BF16 - FP8) * quantized + FP32 * scales + HF_PER_TENSOR * tensors + FOLDER_FILES


def checkpoint_bytes(m: "ModelArgs", run: "Run") -> float:
    """One training checkpoint of the run's backend.

    slime: bf16 weights and the distributed optimizer's state, 14 B a parameter. The local trainer:
    the torch_dist weights plus fp32 master weights and Adam moments of what it trains (every
    parameter, less the MTP layers unless MTP training is on)."""
    if run.train.backend == "slime":
        return float(model_size.checkpoint_bytes(m)) + DCP_PER_ITEM * 4 * tensor_counts(m)[1]
    trained = model_size.parameter_count(m)
    if not run.features.mtp_training:
        trained -= (m.mtp_num_layers or 0) * (model_size.layer_parameters(m, True) + 2 * m.hidden_size ** 2
                                              + 3 * m.hidden_size)
    return torch_dist_bytes(m) + OPTIMIZER * trained


def checkpoints_kept(run: "Run") -> tuple[int, str]:
    """How many checkpoints a run holds at once at most, and why: the saves are every
    `save_interval`-th rollout and the last; retention keeps the last K, every milestone
    iteration i with (i + 1) % every == 0, and the one being written."""
    n, every = run.rollout.num_rollout, run.train.save_interval
    saves = [i for i in range(n) if (i + 1) % every == 0 or i == n - 1]
    keep = run.train.keep_checkpoints
    if keep is None:
        return len(saves), f"every save kept: {len(saves)} saves of {n} rollouts (save_interval {every})"
    milestones = [i for i in saves if keep.every and (i + 1) % keep.every == 0]
    held = min(len(saves), keep.last + 1 + len(milestones))
    return held, (f"keep_checkpoints last {keep.last} (+1 being written) + {len(milestones)} milestone(s), "
                  f"of {len(saves)} saves")


def resumable(wf: "Workflow", name: str) -> int:
    """Checkpoints the run already has that its next attempt resumes from (so needs no room for):
    none when changed settings move them aside (they stay on disk, under previous/)."""
    from glmsnake import staleness
    from glmsnake.steps import lineage

    root = wf.paths.run(name).checkpoints
    present = retention.present(root)
    if not present:
        return 0
    record = root / lineage.RECORD
    try:
        old = json.loads(record.read_text())["key"] if record.is_file() else None
    except (OSError, ValueError, KeyError):
        return 0
    decision = lineage.decide(old, staleness.train(wf, name), wf.runs[name].train.on_change, present[-1])
    return len(present) if decision.action == "resume" else 0


def disk_estimate(wf: "Workflow", running: set[tuple[str, str | None]] | None = None) -> tuple[Estimate, float]:
    """(the outputs under base_dir, the bytes still to write).

    `running`: the (rule, run) of the jobs about to run; None: every step not done yet. An output
    neither written nor about to be is left out."""
    m, paths = wf.preset.model, wf.paths
    est = Estimate(f"disk under {wf.base}")
    pending = 0.0

    def add(name: str, nbytes: float, how: str, done: bool, step: tuple[str, str | None] = ("", None),
            have: float = 0.0) -> None:
        nonlocal pending
        runs_now = not done if running is None else step in running
        if done and not runs_now:
            est.add(name + " (written)", nbytes, how)
        elif runs_now:
            est.add(name, nbytes, how + (f"; {human(have)} of it already there" if have else ""))
            pending += max(0.0, nbytes - have)

    params = model_size.parameter_count(m)
    add("HF weights", hf_bytes(m), f"{count(params)} parameters, bf16", paths.hf_manifest.exists(), ("download_hf", None))
    add("torch_dist", torch_dist_bytes(m), "the same weights, Megatron's layout", paths.torch_dist_sentinel.exists(),
        ("convert_torch_dist", None))
    block = wf.preset.convert.fp8.block_size  # `all` (the default target) makes it, whether a run serves it or not
    add("FP8 weights", fp8_bytes(m, block), f"projections in FP8, one fp32 scale per {block[0]}x{block[1]} block",
        paths.fp8_sentinel.exists(), ("convert_fp8", None))
    for name, run in wf.runs.items():
        rp = paths.run(name)
        held, why = checkpoints_kept(run)
        one = checkpoint_bytes(m, run)
        kind = (f"{model_size.CHECKPOINT_BYTES_PER_PARAMETER} B a parameter with optimizer state" if run.train.backend == "slime"
                else "weights + the local trainer's fp32 optimizer state")
        there = min(held, resumable(wf, name))  # a resumed run already has these
        add(f"run {name}: checkpoints", held * one, f"{held} x {human(one)} ({kind}); {why}", rp.sentinel.exists(),
            ("train_run", name), there * one)
        add(f"run {name}: HF export", hf_bytes(m), "bf16, as the input", rp.hf_sentinel.exists(), ("export_hf", name))
    return est, pending
