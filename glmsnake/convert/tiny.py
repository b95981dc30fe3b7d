"""The embedded defaults: tiny GLM MoE HF checkpoints, generated locally and deterministically.

transformers' classes of the preset's architecture (glm4_moe, or glm4_moe_lite for
multi-latent attention) build the model, so its keys, shapes and init are the real ones;
transformers drops the MTP layer, so we build one more decoder layer and add the MTP-only
tensors (eh_proj, enorm, hnorm, shared_head.norm) as `model.layers.{num_hidden_layers}.*`,
as GLM-4.7's own checkpoints have them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from glmsnake import architectures
from glmsnake.convert.safetensors_io import INDEX_NAME
from glmsnake.recipe.args import ModelArgs

# Character-level vocabulary: specials, then printable ASCII.
SPECIAL_TOKENS = ["<pad>", "<eos>", "<unk>"]


def hf_config(m: ModelArgs, num_hidden_layers: int | None = None):
    arch = architectures.of_model_args(m)
    fields = arch.transformers_fields(m, m.num_layers if num_hidden_layers is None else num_hidden_layers)
    return arch.transformers_config(dict(
        **fields,
        rms_norm_eps=m.norm_epsilon or 1e-5,
        max_position_embeddings=512,
        n_group=1,
        topk_group=1,
        norm_topk_prob=True,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
        architectures=[arch.model_class],
        dtype="bfloat16",
    ))


def tiny_state_dict(m: ModelArgs, seed: int) -> dict[str, torch.Tensor]:
    """Every tensor of the tiny checkpoint, MTP layer included, in HF names and bf16."""
    n = m.num_layers
    mtp = m.mtp_num_layers or 0
    torch.manual_seed(seed)
    # One model with n + mtp layers: its last layers become the MTP decoder layers.
    model = architectures.of_model_args(m).transformers_model(hf_config(m, num_hidden_layers=n + mtp))
    # Untrained routers have a zero expert bias; give it values so conversions are really tested.
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.randn_like(buf) * 0.01)
    # bf16 like GLM-4.7's checkpoint, except the router's expert bias, which it keeps in fp32.
    state = {
        k: v if k.endswith("e_score_correction_bias") else v.to(torch.bfloat16)
        for k, v in _checkpoint_state(model).items()
    }
    gen = torch.Generator().manual_seed(seed + 1)
    h = m.hidden_size
    for i in range(n, n + mtp):
        p = f"model.layers.{i}."
        state[p + "eh_proj.weight"] = (torch.randn(h, 2 * h, generator=gen) * 0.02).to(torch.bfloat16)
        for norm in ("enorm", "hnorm", "shared_head.norm"):
            state[p + norm + ".weight"] = (1 + 0.1 * torch.randn(h, generator=gen)).to(torch.bfloat16)
    return dict(sorted(state.items(), key=lambda kv: _key_order(kv[0])))


def _checkpoint_state(model) -> dict[str, torch.Tensor]:
    """The state dict as save_pretrained writes it (per-expert keys), via a temporary save."""
    import tempfile

    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, safe_serialization=True, max_shard_size="10GB")
        state: dict[str, torch.Tensor] = {}
        for f in sorted(Path(tmp).glob("*.safetensors")):
            state.update(load_file(f))
    return {k: v.contiguous() for k, v in state.items()}


def _key_order(key: str) -> tuple:
    parts = key.split(".")
    layer = int(parts[2]) if key.startswith("model.layers.") else (-1 if "embed" in key else 10**9)
    return (layer, key)


def shard_plan(keys: list[str], num_layers_total: int, shards: int) -> dict[str, str]:
    """Map each key to a shard file: layers spread evenly, embeddings first, head last."""
    names = [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
    plan = {}
    for k in keys:
        if k.startswith("model.layers."):
            layer = int(k.split(".")[2])
            plan[k] = names[min(shards - 1, layer * shards // max(1, num_layers_total))]
        elif "embed_tokens" in k:
            plan[k] = names[0]
        else:
            plan[k] = names[-1]
    return plan


def write_checkpoint(state: dict[str, torch.Tensor], out: Path, config: dict, plan: dict[str, str]) -> None:
    """Write shards, index and config.json the way HF checkpoints are laid out."""
    out.mkdir(parents=True, exist_ok=True)
    by_file: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in state.items():
        by_file.setdefault(plan[k], {})[k] = v
    for fname, tensors in by_file.items():
        save_file(tensors, out / fname, metadata={"format": "pt"})
    total = sum(v.numel() * v.element_size() for v in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(plan.items()))}
    (out / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def write_tokenizer(out: Path, vocab_size: int) -> None:
    """A character-level tokenizer (the hub is out of reach; the tiny model needs no BPE)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 127)]
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + chars)}
    if len(vocab) > vocab_size:
        raise ValueError(f"tiny tokenizer needs vocab_size >= {len(vocab)}, preset has {vocab_size}")
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    fast.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    fast.save_pretrained(str(out))


def make_tiny(out: Path, m: ModelArgs, seed: int = 0, shards: int = 3) -> list[str]:
    """Write the tiny checkpoint to `out` (a staging folder); returns the files written."""
    out = Path(out)
    state = tiny_state_dict(m, seed)
    cfg = hf_config(m).to_dict()
    cfg.pop("transformers_version", None)
    plan = shard_plan(list(state), m.num_layers + (m.mtp_num_layers or 0), shards)
    write_checkpoint(state, out, cfg, plan)
    write_tokenizer(out, m.vocab_size)
    (out / "generation_config.json").write_text(
        json.dumps({"eos_token_id": 1, "pad_token_id": 0, "do_sample": True}, indent=2) + "\n"
    )
    return sorted(p.name for p in out.iterdir() if p.is_file())
