"""Measure a GLM-4-MoE-shaped training step's GPU memory with megatron-core (needs a CUDA GPU).

For each probe configuration (tests/gpu/probes.py: dense and MoE, under 1 GB up to a
few billion parameters, 2k to 16k tokens, no, selective and full recompute, MTP on and off), one fresh
process builds a megatron-core GPTModel with the local layer spec (no Transformer Engine: the
attention is megatron-core's unfused DotProductAttention), wraps it in megatron-core's DDP with
the distributed optimizer and fp32 gradient buffers (as slime runs it, TP = PP = EP = 1), and
runs three forward + backward + Adam steps on random tokens. Steps 2 and 3 are the steady
state, so the peaks are theirs:

- `peak_fwd_bwd`: `torch.cuda.max_memory_allocated` over forward and backward;
- `peak_optimizer`: over the optimizer step (torch's AdamW here: no apex or TE on the probe
  machine, so its foreach temporaries are in this figure, not in production's fused Adam);
- `static`: allocated between steps (weights, gradient buffer, fp32 master weights, moments);
- `context`: device memory in use outside PyTorch's allocator (CUDA context, NCCL), from
  `torch.cuda.mem_get_info` after the first step.

    python3 tests/gpu/memory_probe.py --out OUT_DIR [--only NAME,...]

Writes OUT_DIR/gpu_memory.json: one entry per configuration with its inputs and figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))  # the repository: the probe table lives in glmsnake

STEPS = 3


def transformer_config(p: dict):
    import torch
    import torch.nn.functional as F
    from megatron.core.transformer.transformer_config import TransformerConfig

    moe = p["num_experts"] > 0
    kw = {}
    if moe:
        kw = dict(
            num_moe_experts=p["num_experts"], moe_ffn_hidden_size=p["moe_ffn_hidden_size"],
            moe_shared_expert_intermediate_size=p["moe_shared_expert_intermediate_size"],
            moe_router_topk=p["moe_router_topk"], moe_router_score_function="sigmoid",
            moe_router_enable_expert_bias=True, moe_router_bias_update_rate=0.0,
            moe_router_topk_scaling_factor=2.5, moe_router_pre_softmax=True, moe_router_dtype="fp32",
            moe_router_load_balancing_type="seq_aux_loss", moe_aux_loss_coeff=0.0,
            moe_token_dispatcher_type="alltoall", moe_grouped_gemm=False,
            moe_layer_freq=[0] * p["first_k_dense"] + [1] * (p["num_layers"] - p["first_k_dense"]),
        )
    if p["recompute"] == "full":
        kw.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=p["recompute_layers"])
    elif p["recompute"] == "selective":
        kw.update(recompute_granularity="selective")
    return TransformerConfig(
        num_layers=p["num_layers"], hidden_size=p["hidden_size"], num_attention_heads=p["num_attention_heads"],
        num_query_groups=p["num_query_groups"], kv_channels=p["kv_channels"], ffn_hidden_size=p["ffn_hidden_size"],
        normalization="RMSNorm", gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
        add_qkv_bias=True, qk_layernorm=True, mtp_num_layers=p["mtp_num_layers"] or None,
        mtp_loss_scaling_factor=0.1, hidden_dropout=0.0, attention_dropout=0.0, bf16=True,
        params_dtype=torch.bfloat16, pipeline_dtype=torch.bfloat16, apply_rope_fusion=False,
        masked_softmax_fusion=False, bias_activation_fusion=False, bias_dropout_fusion=False,
        gradient_accumulation_fusion=False, persist_layer_norm=False, attention_softmax_in_fp32=True,
        **kw,
    )


def measure_one(p: dict) -> dict:
    import torch
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec, get_gpt_mtp_block_spec
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": "29541"}.items():
        os.environ.setdefault(k, v)
    torch.cuda.set_device(0)
    torch.distributed.init_process_group("nccl")
    parallel_state.initialize_model_parallel()
    model_parallel_cuda_manual_seed(1234)

    cfg = transformer_config(p)
    spec = get_gpt_decoder_block_spec(cfg, use_transformer_engine=False, normalization="RMSNorm")
    mtp = get_gpt_mtp_block_spec(cfg, spec, use_transformer_engine=False) if cfg.mtp_num_layers else None
    model = GPTModel(config=cfg, transformer_layer_spec=spec, vocab_size=p["vocab_size"],
                     max_sequence_length=p["seq_length"], share_embeddings_and_output_weights=False,
                     position_embedding_type="rope", rotary_percent=0.5, rotary_base=1000000,
                     mtp_block_spec=mtp).cuda()
    params = sum(t.numel() for t in model.parameters())
    ddp = DistributedDataParallel(
        config=cfg, module=model,
        ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                                 use_distributed_optimizer=True))
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-6, bf16=True, weight_decay=0.1,
                                                 use_distributed_optimizer=True, clip_grad=1.0), [ddp])
    s = p["seq_length"]
    gen = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.randint(0, p["vocab_size"], (1, s), device="cuda", generator=gen)
    labels = torch.randint(0, p["vocab_size"], (1, s), device="cuda", generator=gen)
    pos = torch.arange(s, device="cuda").unsqueeze(0)
    loss_mask = torch.ones(1, s, device="cuda")

    figures = {"params": params}
    for step in range(STEPS):
        ddp.zero_grad_buffer()
        opt.zero_grad()
        torch.cuda.synchronize()
        if step == 1:
            figures["static"] = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        loss = ddp(ids, pos, None, labels=labels, loss_mask=loss_mask)
        (loss.float() * loss_mask).sum().div(s).backward()
        ddp.finish_grad_sync()
        torch.cuda.synchronize()
        fwd_bwd = torch.cuda.max_memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        opt.step()
        torch.cuda.synchronize()
        optimizer = torch.cuda.max_memory_allocated()
        if step == 0:
            free, total = torch.cuda.mem_get_info()
            figures["context"] = total - free - torch.cuda.memory_reserved()
            figures["first_step_s"] = round(time.perf_counter() - t0, 3)
        else:
            figures["peak_fwd_bwd"] = max(figures.get("peak_fwd_bwd", 0), fwd_bwd)
            figures["peak_optimizer"] = max(figures.get("peak_optimizer", 0), optimizer)
        del loss
    figures["max_reserved"] = torch.cuda.max_memory_reserved()
    torch.distributed.destroy_process_group()
    return figures


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--only", default="")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a child: measure this probe and print JSON
    args = ap.parse_args()
    from probes import PROBES  # beside this script

    if args.one:
        print("RESULT " + json.dumps(measure_one(PROBES[args.one])), flush=True)
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = [n for n in args.only.split(",") if n] or list(PROBES)
    results = {}
    for name in names:
        t0 = time.monotonic()
        proc = subprocess.run([sys.executable, __file__, "--out", str(out), "--one", name],
                              capture_output=True, text=True)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        entry = {"probe": PROBES[name], "seconds": round(time.monotonic() - t0, 1)}
        if line is None:
            entry["error"] = (proc.stdout + proc.stderr)[-3000:]
        else:
            entry.update(json.loads(line.removeprefix("RESULT ")))
        results[name] = entry
        print(name, {k: v for k, v in entry.items() if k != "probe"}, flush=True)
        (out / "gpu_memory.json").write_text(json.dumps(
            {"device": _device(), "versions": _versions(), "results": results}, indent=1))
    return 0


def _device() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"


def _versions() -> dict:
    from importlib.metadata import version

    return {n: version(n) for n in ("torch", "megatron-core")}


if __name__ == "__main__":
    sys.exit(main())
