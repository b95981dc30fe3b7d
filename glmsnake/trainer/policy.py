"""The policy model: transformers' class of the checkpoint's architecture, weights from torch_dist.

Checkpoints (HF names, as the torch_dist reader returns them) keep one tensor per expert
(`experts.{e}.gate_proj.weight` ...) and the MTP layer `model.layers.{N}.*`; transformers'
module fuses the experts (`experts.gate_up_proj[e] = cat(gate, up)`, `experts.down_proj`)
and has no MTP layer. `to_module_state` / `to_checkpoint_state` translate between the two;
tensors the module lacks (MTP) are carried through unchanged, so every checkpoint the
trainer writes has the full key set the torch_dist writer and export expect.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping

import torch

_EXPERT = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def build_model(hf_config: Mapping[str, Any], dtype: torch.dtype = torch.float32):
    """An empty (randomly initialised) model of the checkpoint's architecture, in `dtype`."""
    import transformers

    from glmsnake import architectures

    arch = architectures.of_hf_config(hf_config)
    cfg = getattr(transformers, arch.config_class).from_dict(dict(hf_config))
    cfg.use_cache = False
    torch.manual_seed(0)  # the init is overwritten; a fixed seed keeps it cheap to reason about
    model = arch.transformers_model(cfg).to(dtype)
    return model


def to_module_state(ckpt: Mapping[str, torch.Tensor], module_keys: set[str]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Checkpoint tensors -> (the module's state dict, tensors the module doesn't have)."""
    experts: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    module: dict[str, torch.Tensor] = {}
    extra: dict[str, torch.Tensor] = {}
    for k, v in ckpt.items():
        m = _EXPERT.match(k)
        if m and f"{m.group(1)}.gate_up_proj" in module_keys:
            experts.setdefault(m.group(1), {}).setdefault(int(m.group(2)), {})[m.group(3)] = v
        elif k in module_keys:
            module[k] = v
        else:
            extra[k] = v
    for prefix, per in experts.items():
        ids = sorted(per)
        module[f"{prefix}.gate_up_proj"] = torch.stack([torch.cat([per[e]["gate_proj"], per[e]["up_proj"]], 0) for e in ids])
        module[f"{prefix}.down_proj"] = torch.stack([per[e]["down_proj"] for e in ids])
    missing = module_keys - set(module)
    if missing:
        raise KeyError(f"checkpoint lacks tensors the model needs: {sorted(missing)[:8]}")
    return module, extra


def to_checkpoint_state(module: Mapping[str, torch.Tensor], extra: Mapping[str, torch.Tensor],
                        dtypes: Mapping[str, torch.dtype]) -> dict[str, torch.Tensor]:
    """The module's state (+ carried tensors) in checkpoint names and the checkpoint's dtypes."""
    out: dict[str, torch.Tensor] = {}
    for k, v in module.items():
        if k.endswith(".experts.gate_up_proj"):
            prefix = k.removesuffix(".gate_up_proj")
            half = v.shape[1] // 2
            for e in range(v.shape[0]):
                out[f"{prefix}.{e}.gate_proj.weight"] = v[e, :half]
                out[f"{prefix}.{e}.up_proj.weight"] = v[e, half:]
        elif k.endswith(".experts.down_proj"):
            prefix = k.removesuffix(".down_proj")
            for e in range(v.shape[0]):
                out[f"{prefix}.{e}.down_proj.weight"] = v[e]
        elif k in dtypes:
            out[k] = v
    out.update(extra)
    return {k: v.detach().to(dtypes.get(k, v.dtype)).contiguous() for k, v in out.items()}


def module_keys(model) -> set[str]:
    # Buffers such as rotary inv_freq are computed, not stored; the router bias is stored.
    return {k for k in model.state_dict() if "rotary_emb" not in k}


def load_policy(hf_config: Mapping[str, Any], ckpt: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.float32):
    """(model with the checkpoint's weights, carried tensors, checkpoint dtypes)."""
    model = build_model(hf_config, dtype)
    keys = module_keys(model)
    state, extra = to_module_state(ckpt, keys)
    own = model.state_dict()
    # Parameters compute in `dtype`; the fp32 router bias stays fp32.
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=False)
    return model, extra, {k: v.dtype for k, v in ckpt.items()}


def read_tokenizer(hf_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(hf_dir))
