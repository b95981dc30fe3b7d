"""Megatron itself checks glmsnake's torch_dist checkpoints (run on a GPU machine with megatron-core).

For each checkpoint given (e.g. written by 1, 2 and 4 writer ranks) and each dtype:
build a megatron-core GPTModel for the checkpoint's config.json (glm4_moe, or glm4_moe_lite with
multi-latent attention, configured as slime configures it: YaRN RoPE at scaling factor 1) with
the local spec (no Transformer Engine) and the MTP block, load the checkpoint with
`dist_checkpointing.load(strict=RETURN_ALL)` (no missing and no unexpected keys allowed),
run a forward pass on fixed tokens and compare
- the main logits with transformers' Glm4MoeForCausalLM on the same HF weights;
- the MTP logits with a reference built from transformers' own GLM-4-MoE modules
  (enorm/hnorm/eh_proj/decoder layer/shared_head.norm/lm_head from `model.layers.{N}`),
  fed the hidden states Megatron hands its MTP block.
It also writes the key manifest (tensor keys with global shapes, ShardedObject keys)
that the model's `sharded_state_dict()` asks for and compares it with the committed fixture.

Runs as one process or under `torchrun --nproc-per-node N` (--tp/--ep/--sp choose the
layout; every rank loads, rank 0 compares and reports). Results go to --out as JSON.

    python3 tests/gpu/megatron_check.py --hf HF_DIR --ckpt w1=DIR --ckpt w2=DIR \
        --fixture tests/fixtures/megatron_keys_tiny.json --out OUT_DIR
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

SEQ, BATCH, SEED = 32, 2, 1234


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--hf", required=True)
    p.add_argument("--ckpt", action="append", default=[], help="NAME=DIR of a torch_dist root (tracker + release/)")
    p.add_argument("--fixture", default=None)
    p.add_argument("--manifest-name", default="megatron_keys_tiny.json")
    p.add_argument("--latent-norm-eps", choices=["hf", "megatron"], default="hf",
                   help="transformers' glm4_moe_lite builds its q_a/kv_a norms with eps 1e-6, megatron-core's MLA "
                        "with the model's norm epsilon: `megatron` gives the reference Megatron's value")
    p.add_argument("--mla-rope", default="yarn", choices=["yarn", "rope"], help="MLA's RoPE (slime's default: yarn)")
    p.add_argument("--out", required=True)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--ep", type=int, default=1)
    p.add_argument("--sp", action="store_true")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--rel-tol-bf16", type=float, default=2e-2)
    p.add_argument("--rel-tol-fp32", type=float, default=1e-4)
    p.add_argument("--save-variants", default=None,
                   help="after loading the first checkpoint in fp32, save megatron-core's own checkpoints here "
                        "(default layout and singleton_local_shards) with its logits, as test fixtures")
    return p.parse_args()


def init_dist(tp: int, ep: int) -> None:
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29533"}.items():
        os.environ.setdefault(k, v)
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    torch.distributed.init_process_group("nccl")
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, expert_model_parallel_size=ep)
    model_parallel_cuda_manual_seed(SEED)


MLA_ROPE = ["yarn"]  # set from --mla-rope
LATENT_EPS = ["hf"]  # set from --latent-norm-eps


def is_mla(hf: dict) -> bool:
    return hf["model_type"] == "glm4_moe_lite"


def dense_layers(hf: dict) -> int:
    types = hf.get("mlp_layer_types")
    return types.index("sparse") if types else hf["first_k_dense_replace"]


def megatron_config(hf: dict, dtype: torch.dtype, tp: int, ep: int, sp: bool):
    from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig

    n = hf["num_hidden_layers"]
    fkd = dense_layers(hf)
    if is_mla(hf):
        # What slime hands megatron-core for GLM-4.7-Flash: MLA defaults to YaRN (slime's
        # arguments.py), with Megatron's argument defaults rotary_scaling_factor 1, mscale 1.
        cls, attention = MLATransformerConfig, dict(
            num_query_groups=hf["num_attention_heads"], kv_channels=hf["qk_nope_head_dim"],
            q_lora_rank=hf["q_lora_rank"], kv_lora_rank=hf["kv_lora_rank"], qk_head_dim=hf["qk_nope_head_dim"],
            qk_pos_emb_head_dim=hf["qk_rope_head_dim"], v_head_dim=hf["v_head_dim"], qk_layernorm=True,
            rope_type=MLA_ROPE[0], rotary_scaling_factor=1.0, mscale=1.0, mscale_all_dim=0.0,
            rotary_base=float((hf.get("rope_parameters") or {}).get("rope_theta", hf.get("rope_theta", 10000))),
            add_qkv_bias=False)
    else:
        cls, attention = TransformerConfig, dict(
            num_query_groups=hf["num_key_value_heads"], kv_channels=hf["head_dim"],
            add_qkv_bias=hf["attention_bias"], qk_layernorm=hf["use_qk_norm"])
    return cls(
        **attention,
        num_layers=n,
        hidden_size=hf["hidden_size"],
        num_attention_heads=hf["num_attention_heads"],
        ffn_hidden_size=hf["intermediate_size"],
        normalization="RMSNorm",
        layernorm_epsilon=hf["rms_norm_eps"],
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        num_moe_experts=hf["n_routed_experts"],
        moe_ffn_hidden_size=hf["moe_intermediate_size"],
        moe_shared_expert_intermediate_size=hf["moe_intermediate_size"] * hf["n_shared_experts"],
        moe_router_topk=hf["num_experts_per_tok"],
        moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True,
        moe_router_bias_update_rate=0.0,
        moe_router_topk_scaling_factor=hf["routed_scaling_factor"],
        moe_router_pre_softmax=True,
        moe_router_dtype="fp32",
        moe_router_load_balancing_type="seq_aux_loss",
        moe_aux_loss_coeff=0.0,
        moe_token_dispatcher_type="alltoall",
        moe_layer_freq=[0] * fkd + [1] * (n - fkd),
        moe_grouped_gemm=False,
        mtp_num_layers=hf.get("num_nextn_predict_layers") or None,
        mtp_loss_scaling_factor=0.1,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bf16=dtype == torch.bfloat16,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        tensor_model_parallel_size=tp,
        expert_model_parallel_size=ep,
        sequence_parallel=sp,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        attention_softmax_in_fp32=True,
    )


class SdpaCoreAttention(torch.nn.Module):
    """Causal attention whose q/k and v heads differ in size, for the local MLA spec: megatron-core
    0.19.2's DotProductAttention takes no k_channels/v_channels (only Transformer Engine's does, and
    this machine has none). It holds no parameters, so the keys and weights checked are unchanged;
    the softmax scale is the one MLA computes."""

    def __init__(self, config, layer_number, attn_mask_type, attention_type, softmax_scale=None, **_):
        super().__init__()
        self.scale = softmax_scale

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, packed_seq_params=None, **_):
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [s, b, heads, d] -> [b, heads, s, d]
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        s_, b = out.shape[2], out.shape[0]
        return out.permute(2, 0, 1, 3).reshape(s_, b, -1)


def use_sdpa_for_mla(spec) -> None:
    for layer in spec.layer_specs:
        layer.submodules.self_attention.submodules.core_attention = SdpaCoreAttention


def build_model(hf: dict, dtype, tp, ep, sp):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec, get_gpt_mtp_block_spec

    cfg = megatron_config(hf, dtype, tp, ep, sp)
    spec = get_gpt_decoder_block_spec(cfg, use_transformer_engine=False, normalization="RMSNorm")
    if is_mla(hf):
        use_sdpa_for_mla(spec)
    mtp = get_gpt_mtp_block_spec(cfg, spec, use_transformer_engine=False) if cfg.mtp_num_layers else None
    rope = hf.get("rope_parameters") or {}
    model = GPTModel(
        config=cfg, transformer_layer_spec=spec, vocab_size=hf["vocab_size"], max_sequence_length=512,
        pre_process=True, post_process=True, share_embeddings_and_output_weights=False,
        position_embedding_type="rope",
        rotary_percent=float(rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))),
        rotary_base=int(rope.get("rope_theta", hf.get("rope_theta", 10000))),
        mtp_block_spec=mtp,
    )
    return model.cuda().eval()


def key_manifest(model) -> dict:
    """Tensor keys with global shapes and ShardedObject keys, as the model asks for them."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, apply_factories

    sd = model.sharded_state_dict()
    apply_factories(sd)
    tensors, objects = {}, set()
    for v in nested_values(sd):
        if isinstance(v, ShardedTensor):
            tensors[v.key] = list(v.global_shape)
        elif isinstance(v, ShardedObject):
            objects.add(v.unique_key)
    return {"tensors": dict(sorted(tensors.items())), "objects": sorted(objects)}


def gather_manifest(local: dict) -> dict:
    """Union over ranks (each rank asks for its own expert shards' objects)."""
    parts = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, local)
    tensors, objects = {}, set()
    for p in parts:
        tensors.update(p["tensors"])
        objects.update(p["objects"])
    return {"tensors": dict(sorted(tensors.items())), "objects": sorted(objects)}


def load_checkpoint(model, ckpt_root: Path) -> dict:
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    tracker = (ckpt_root / "latest_checkpointed_iteration.txt").read_text().strip()
    folder = ckpt_root / ("release" if tracker == "release" else f"iter_{int(tracker):07d}")
    sd = model.sharded_state_dict()
    t0 = time.monotonic()
    loaded, missing, unexpected = dist_checkpointing.load(sd, str(folder), strict=StrictHandling.RETURN_ALL)
    seconds = time.monotonic() - t0
    common = set(dist_checkpointing.load_common_state_dict(str(folder)))  # common.pt entries, not weights
    result = model.load_state_dict({k: v for k, v in loaded.items() if k not in common}, strict=False)
    return {"missing": sorted(missing), "unexpected": sorted(unexpected), "load_seconds": round(seconds, 3),
            "torch_missing": list(result.missing_keys), "torch_unexpected": list(result.unexpected_keys)}


def megatron_forward(model, ids: torch.Tensor, sp: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(main logits [B,S,V], hidden states handed to the MTP block [S,B,H], MTP logits [B,S,V])."""
    captured = {}

    def pre(_m, _args, kwargs):
        captured["h_in"] = kwargs["hidden_states"].detach().clone()

    def post(_m, _args, _kwargs, out):
        captured["mtp_out"] = out.detach().clone()

    hooks = []
    if getattr(model, "mtp_process", False):
        hooks = [model.mtp.register_forward_pre_hook(pre, with_kwargs=True),
                 model.mtp.register_forward_hook(post, with_kwargs=True)]
    pos = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0).expand_as(ids)
    mask = torch.triu(torch.ones(1, 1, ids.shape[1], ids.shape[1], dtype=torch.bool, device=ids.device), diagonal=1)
    with torch.no_grad():
        logits = model(ids, pos, mask, runtime_gather_output=True)
        mtp_logits = h_in = None
        if hooks:
            from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

            out, h_in = captured["mtp_out"], captured["h_in"]
            if sp:  # sequence-parallel activations are split along the sequence
                out = gather_from_sequence_parallel_region(out, tensor_parallel_output_grad=False)
                h_in = gather_from_sequence_parallel_region(h_in, tensor_parallel_output_grad=False)
            mtp_h = out.chunk(1 + model.config.mtp_num_layers, dim=0)[1]
            mtp_logits, _ = model.output_layer(mtp_h, runtime_gather_output=True)
            mtp_logits = mtp_logits.transpose(0, 1).contiguous()
    for h in hooks:
        h.remove()
    return logits, h_in, mtp_logits


def save_variants(model, folder: Path, ids: torch.Tensor, logits: torch.Tensor) -> dict:
    """megatron-core writes the loaded model itself, in each key layout it can produce here (the local
    spec: stacked experts, and one key per expert with `singleton_local_shards`), plus its fp32
    logits on `ids`: fixtures for glmsnake's reader."""
    import inspect

    from megatron.core import dist_checkpointing

    made = {}
    for name, metadata in (("stacked", {}), ("singleton", {"singleton_local_shards": True})):
        target = folder / f"megatron_{name}"
        target.mkdir(parents=True, exist_ok=True)
        sd = model.sharded_state_dict(metadata=metadata)
        kwargs = {"content_metadata": metadata} if "content_metadata" in inspect.signature(dist_checkpointing.save).parameters else {}
        dist_checkpointing.save(sd, str(target), **kwargs)
        made[name] = sorted(p.name for p in target.iterdir())
    torch.save({"ids": ids.cpu(), "logits": logits.float().cpu()}, folder / "megatron_logits.pt")
    return made


def hf_reference(hf_dir: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=dtype, attn_implementation="sdpa")
    latent_norm_eps(model)
    return model.cuda().eval()


def latent_norm_eps(model) -> None:
    """With --latent-norm-eps megatron: the q_a/kv_a norms use the model's rms_norm_eps, as megatron-core does."""
    if LATENT_EPS[0] != "megatron":
        return
    for layer in model.model.layers:
        for name in ("q_a_layernorm", "kv_a_layernorm"):
            norm = getattr(layer.self_attn, name, None)
            if norm is not None:
                norm.variance_epsilon = model.config.rms_norm_eps


def hf_mtp_reference(hf_model, hf_dir: Path, ids: torch.Tensor, h_in: torch.Tensor, dtype) -> torch.Tensor:
    """GLM's MTP layer from transformers' own GLM-4-MoE modules and the HF tensors `model.layers.{N}`.

    transformers drops the MTP layer, so load the checkpoint once more with one more decoder
    layer (transformers' loader maps `model.layers.{N}.*` into it, experts included) and read
    enorm/hnorm/eh_proj/shared_head.norm from the safetensors files.
    """
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    cfg = hf_model.config
    n, h, eps = cfg.num_hidden_layers, cfg.hidden_size, cfg.rms_norm_eps
    extra = {"mlp_layer_types": list(cfg.mlp_layer_types) + ["sparse"]} if getattr(cfg, "mlp_layer_types", None) else {}
    longer = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=dtype, attn_implementation="sdpa",
                                                  num_hidden_layers=n + 1, **extra)
    latent_norm_eps(longer)
    RMSNorm = type(hf_model.model.norm)  # the architecture's own norm class
    layer = longer.model.layers[n].cuda().eval()
    index = json.loads((hf_dir / "model.safetensors.index.json").read_text())["weight_map"]

    def hf(name: str) -> torch.Tensor:
        key = f"model.layers.{n}.{name}"
        with safe_open(str(hf_dir / index[key]), "pt") as f:
            return f.get_tensor(key)

    enorm, hnorm, fnorm = (RMSNorm(h, eps) for _ in range(3))
    enorm.weight.data.copy_(hf("enorm.weight"))
    hnorm.weight.data.copy_(hf("hnorm.weight"))
    fnorm.weight.data.copy_(hf("shared_head.norm.weight"))
    eh = torch.nn.Linear(2 * h, h, bias=False)
    eh.weight.data.copy_(hf("eh_proj.weight"))
    enorm, hnorm, fnorm, eh = (m.to(device="cuda", dtype=dtype).eval() for m in (enorm, hnorm, fnorm, eh))
    with torch.no_grad():
        rolled = torch.roll(ids, shifts=-1, dims=-1)
        emb = hf_model.model.embed_tokens(rolled)
        hid = h_in.transpose(0, 1).to(dtype)
        x = eh(torch.cat((enorm(emb), hnorm(hid)), dim=-1))
        pos = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0).expand_as(ids)
        pe = hf_model.model.rotary_emb(x, pos)
        out = layer(x, attention_mask=None, position_ids=pos, position_embeddings=pe)
        x = out[0] if isinstance(out, tuple) else out
        return hf_model.lm_head(fnorm(x))


def errors(ours: torch.Tensor, ref: torch.Tensor) -> dict:
    a, b = ours.float(), ref.float()
    return {"max_abs": float((a - b).abs().max()), "rel": float((a - b).norm() / b.norm()),
            "ref_max_abs": float(b.abs().max())}


def check_dtype(args, dname, hf, hf_dir, ids, rank, out, report) -> None:
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dname]
    tol = args.rel_tol_fp32 if dtype == torch.float32 else args.rel_tol_bf16
    model = build_model(hf, dtype, args.tp, args.ep, args.sp)
    if "manifest_matches_fixture" not in report:
        manifest = gather_manifest(key_manifest(model))
        if rank == 0:
            (out / args.manifest_name).write_text(json.dumps(manifest, indent=1) + "\n")
            same = None
            if args.fixture:
                fixture = json.loads(Path(args.fixture).read_text())
                same = fixture.get("tensors") == manifest["tensors"] and fixture.get("objects") == manifest["objects"]
                report["ok"] &= same
            report["manifest_matches_fixture"] = same
    ref = hf_reference(hf_dir, dtype) if rank == 0 else None
    with torch.no_grad():
        ref_logits = ref(ids).logits if rank == 0 else None
        if rank == 0 and dtype != torch.float32:
            # bf16 noise floor: transformers in bf16 against transformers in fp32.
            fp32 = hf_reference(hf_dir, torch.float32)
            floor = errors(ref_logits, fp32(ids).logits)
            report.setdefault("bf16_floor", floor)
            tol = max(tol, 3 * floor["rel"])
            del fp32
    for item in args.ckpt:
        name, path = item.split("=", 1)
        load = load_checkpoint(model, Path(path))
        logits, h_in, mtp_logits = megatron_forward(model, ids, args.sp)
        if rank != 0:
            continue
        run = {"checkpoint": name, "dtype": dname, **load, "logits": errors(logits, ref_logits)}
        if args.save_variants and dtype == torch.float32 and "saved_variants" not in report:
            torch.distributed.barrier()
            report["saved_variants"] = save_variants(model, Path(args.save_variants), ids, logits)
        if mtp_logits is not None:
            try:
                mtp_ref = hf_mtp_reference(ref, hf_dir, ids, h_in, dtype)
                # The last position has no next token (Megatron rolls a 0 in): compare the others.
                run["mtp_logits"] = errors(mtp_logits[:, :-1], mtp_ref[:, :-1])
            except Exception:
                import traceback

                run["mtp_error"] = traceback.format_exc()
        run["ok"] = (not load["missing"] and not load["unexpected"] and not load["torch_missing"]
                     and not load["torch_unexpected"] and run["logits"]["rel"] <= tol
                     and "mtp_error" not in run
                     and ("mtp_logits" not in run or run["mtp_logits"]["rel"] <= tol))
        report["ok"] &= run["ok"]
        report["runs"].append(run)
        print(json.dumps(run), flush=True)


def main() -> int:
    args = parse()
    MLA_ROPE[0] = args.mla_rope
    LATENT_EPS[0] = args.latent_norm_eps
    init_dist(args.tp, args.ep)
    rank = torch.distributed.get_rank()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    hf_dir = Path(args.hf)
    hf = json.loads((hf_dir / "config.json").read_text())
    gen = torch.Generator().manual_seed(SEED)
    ids = torch.randint(0, hf["vocab_size"], (BATCH, SEQ), generator=gen).cuda()
    report = {"layout": {"tp": args.tp, "ep": args.ep, "sp": args.sp, "world": torch.distributed.get_world_size()},
              "versions": _versions(), "runs": [], "ok": True}
    for dname in args.dtypes.split(","):
        try:
            check_dtype(args, dname, hf, hf_dir, ids, rank, out, report)
        except Exception:  # keep going: one device run should report every failure
            import traceback

            report["ok"] = False
            report.setdefault("errors", []).append({"dtype": dname, "traceback": traceback.format_exc()})
            print(traceback.format_exc(), file=sys.stderr, flush=True)
        torch.cuda.empty_cache()
    if rank == 0:
        (out / "gpu_results.json").write_text(json.dumps(report, indent=1) + "\n")
        print(json.dumps({k: v for k, v in report.items() if k != "runs"}), flush=True)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    return 0 if report["ok"] else 1


def _versions() -> dict:
    import megatron.core
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "megatron_core": getattr(megatron.core, "__version__", "?"), "gpu": torch.cuda.get_device_name()}


if __name__ == "__main__":
    sys.exit(main())
