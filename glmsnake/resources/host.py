"""Host memory of one training node: what slime keeps in RAM per GPU, times the GPUs of a node.

- The CPU-offloaded optimizer (`optimizer_cpu_offload`, all of it: Megatron's
  `--optimizer-offload-fraction` defaults to 1.0): fp32 master weights and two Adam moments of the
  GPU's distributed-optimizer shard, plus an fp32 copy of that shard's gradients for the CPU Adam.
- Colocation: while SGLang generates, slime pauses the training side with torch_memory_saver. The
  bf16 weights of each model slime keeps (the actor; the reference model when a KL term is on)
  wait in pinned host memory; the optimizer shard is backed up to the host too when it lives on
  the GPU. Gradient and parameter buffers are dropped, not backed up.
- Loading torch_dist: each rank reads its shard of the weights through host memory once.
- Each training process's own footprint (Python, CUDA, NCCL and Ray): an assumption, stated.
"""

from __future__ import annotations

from glmsnake.resources.shapes import ModelShape, TrainLayout
from glmsnake.resources.terms import GIB, Estimate
from glmsnake.resources.training import OPTIMIZER, stage_parameters, stages

GRAD_COPY = 4  # fp32 gradients on the host for the CPU Adam
PROCESS_BYTES = 6 * GIB  # per training process: an assumption, not a measurement


def host_estimate(shape: ModelShape, lay: TrainLayout, gpus_per_node: int, colocate: bool, reference: bool) -> Estimate:
    worst = max(stages(shape, lay), key=lambda st: sum(stage_parameters(shape, lay, st)))
    dense, expert = stage_parameters(shape, lay, worst)
    params, shard = dense + expert, dense / lay.dp + expert / lay.expert_dp
    n = gpus_per_node
    est = Estimate(f"host memory of a node ({n} GPUs, per GPU as on the {worst.name} stage)")
    if lay.cpu_offload:
        est.add("CPU-offloaded optimizer", n * (OPTIMIZER + GRAD_COPY) * shard,
                f"{n} GPUs x ({OPTIMIZER} B states + {GRAD_COPY} B fp32 gradients) x {shard / 1e9:.3f} B parameters "
                f"(dense / DP {lay.dp}, experts / expert-DP {lay.expert_dp})")
    elif colocate:
        est.add("optimizer backup during rollout", n * OPTIMIZER * shard,
                f"{n} GPUs x {OPTIMIZER} B x {shard / 1e9:.3f} B parameters (torch_memory_saver's CPU backup)")
    if colocate:
        models = 2 if reference else 1
        est.add("weights parked during rollout", n * 2 * params * models,
                f"{n} GPUs x 2 B x {params / 1e9:.3f} B parameters x {models} model(s) (actor"
                + (" + reference" if reference else "") + "), pinned")
    est.add("loading torch_dist", n * 2 * params, f"{n} GPUs x 2 B x {params / 1e9:.3f} B parameters, read once at start")
    est.add("training processes", n * PROCESS_BYTES, f"{n} x {PROCESS_BYTES / GIB:.0f} GiB (assumed: Python, CUDA, NCCL, Ray)")
    return est
