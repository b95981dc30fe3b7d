"""HF GLM-4-MoE names <-> Megatron-Core torch_dist keys, both directions, in every key layout.

One `MegatronTensor` describes a Megatron key, the HF tensors it is made of and how
(checked against megatron-core 0.19.2's GPTModel and slime's GLM-4-MoE converter):

- `copy`      one HF tensor as is (norms, router, expert bias, o_proj, down_proj, ...);
- `qkv`       q/k/v concatenated per query group: [q heads of the group x head_dim, k, v];
- `gate_up`   linear_fc1 = cat(gate, up) on the output axis;
- `experts_gate_up` / `experts_down`: the routed experts stacked on a leading expert axis.

Megatron keys are grouped into `Unit`s (embedding, one per decoder layer, one per MTP
layer, the head) so converters stream one layer at a time. Each unit also lists the
`_extra_state` ShardedObjects that the layer spec's modules ask for (readers ignore them).

`Layout` names the key variants a checkpoint can be in (docs/architecture.md lists them with
the megatron-core source that defines each); `detect_layout` tells them apart by their keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import re

import torch

from glmsnake.errors import GlmsnakeError

# HF keys of a GLM MTP layer that Megatron does not store: its MTP block shares the
# main model's embedding and output layer. Dropped on the way in, restored on export.
MTP_SHARED_SUFFIXES = ("embed_tokens.weight", "shared_head.head.weight")


@dataclass(frozen=True)
class GlmArch:
    """What the name mapping needs to know about a GLM-4-MoE checkpoint (from config.json)."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_groups: int
    head_dim: int
    num_experts: int
    first_dense: int  # first_k_dense_replace: layers [0, first_dense) are dense
    mtp_layers: int
    qkv_bias: bool
    qk_norm: bool
    tied_embeddings: bool
    shared_experts: bool

    @classmethod
    def from_hf_config(cls, cfg: Mapping[str, Any] | Any) -> "GlmArch":
        get = (lambda k, d=None: cfg.get(k, d)) if isinstance(cfg, Mapping) else (lambda k, d=None: getattr(cfg, k, d))
        heads = int(get("num_attention_heads"))
        hidden = int(get("hidden_size"))
        return cls(
            num_layers=int(get("num_hidden_layers")),
            hidden_size=hidden,
            num_heads=heads,
            num_groups=int(get("num_key_value_heads") or heads),
            head_dim=int(get("head_dim") or hidden // heads),
            num_experts=int(get("n_routed_experts") or 0),
            first_dense=int(get("first_k_dense_replace") or 0),
            mtp_layers=int(get("num_nextn_predict_layers") or 0),
            qkv_bias=bool(get("attention_bias", False)),
            qk_norm=bool(get("use_qk_norm", False)),
            tied_embeddings=bool(get("tie_word_embeddings", False)),
            shared_experts=int(get("n_shared_experts") or 0) > 0,
        )

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_groups

    def is_moe(self, hf_layer: int) -> bool:
        return self.num_experts > 0 and hf_layer >= self.first_dense


@dataclass(frozen=True)
class Layout:
    """The key variant of a torch_dist checkpoint.

    norms: `local` (megatron-core's local layer spec renames pre_mlp_layernorm to
      `mlp.linear_fc1.layer_norm_weight` on every layer) or `te` (the Transformer Engine spec,
      slime's: MoE layers keep a separate `pre_mlp_layernorm.weight`; dense layers fuse it into
      linear_fc1 as in `local`; TE norms add `_extra_state` objects).
    experts: `stacked` (one key per layer, a leading expert axis; the default) or `singleton`
      (`singleton_local_shards`: one key per expert, and every fc1 split into `weight_w` (gate)
      and `weight_v` (up), dense and shared experts too).
    """

    norms: str = "local"
    experts: str = "stacked"

    def describe(self) -> dict[str, str]:
        return {"norms": self.norms, "experts": self.experts}


LOCAL = Layout()
TE = Layout("te")
LAYOUTS = {"local": LOCAL, "te": TE}  # what our writer offers (convert.torch_dist.layout)
_SINGLETON_EXPERT = re.compile(r"\.mlp\.experts\.experts\.\d+\.linear_fc")


def detect_layout(keys: Iterable[str]) -> Layout:
    """Which variant a checkpoint's keys are in (every GLM-4-MoE has MoE layers to tell by)."""
    keys = list(keys)
    norms = "te" if any(k.endswith(".pre_mlp_layernorm.weight") for k in keys) else "local"
    experts = "singleton" if any(_SINGLETON_EXPERT.search(k) for k in keys) else "stacked"
    return Layout(norms, experts)


@dataclass(frozen=True)
class MegatronTensor:
    key: str
    kind: str  # copy | qkv | gate_up | experts_gate_up | experts_down
    sources: tuple[str, ...]
    groups: int = 1  # query groups, for qkv


@dataclass
class Unit:
    """What one streaming step converts: a layer, the embedding or the head."""

    name: str
    tensors: list[MegatronTensor] = field(default_factory=list)
    extra_states: list[str] = field(default_factory=list)  # ShardedObject unique keys
    dropped: list[str] = field(default_factory=list)  # HF keys Megatron does not keep

    @property
    def hf_keys(self) -> list[str]:
        return [s for t in self.tensors for s in t.sources]


def extra_state_key(module: str, shard: tuple[int, int] = (0, 1)) -> str:
    """ShardedObject unique key of a linear's `_extra_state`: `<module>._extra_state/shard_<off>_<shape>`."""
    return f"{module}._extra_state/shard_{shard[0]}_{shard[1]}"


# --------------------------------------------------------------------------- units


def _fc1(u: Unit, layout: Layout, module: str, gate: str, up: str) -> None:
    """A SwiGLU fc1: [gate; up] in one tensor, or split into weight_w and weight_v (singleton)."""
    if layout.experts == "singleton":
        u.tensors += [MegatronTensor(f"{module}.weight_w", "copy", (gate,)), MegatronTensor(f"{module}.weight_v", "copy", (up,))]
    else:
        u.tensors.append(MegatronTensor(f"{module}.weight", "gate_up", (gate, up)))


def _layer_unit(arch: GlmArch, name: str, mp: str, hp: str, moe: bool, layout: Layout = LOCAL) -> Unit:
    """A transformer layer: Megatron prefix `mp` (ends with '.'), HF prefix `hp`."""
    u = Unit(name)
    t = u.tensors.append
    att = f"{mp}self_attention."
    t(MegatronTensor(f"{att}linear_qkv.layer_norm_weight", "copy", (f"{hp}input_layernorm.weight",)))
    qkv = tuple(f"{hp}self_attn.{p}_proj.weight" for p in "qkv")
    t(MegatronTensor(f"{att}linear_qkv.weight", "qkv", qkv, arch.num_groups))
    if arch.qkv_bias:
        t(MegatronTensor(f"{att}linear_qkv.bias", "qkv", tuple(f"{hp}self_attn.{p}_proj.bias" for p in "qkv"), arch.num_groups))
    te = layout.norms == "te"
    if arch.qk_norm:
        t(MegatronTensor(f"{att}q_layernorm.weight", "copy", (f"{hp}self_attn.q_norm.weight",)))
        t(MegatronTensor(f"{att}k_layernorm.weight", "copy", (f"{hp}self_attn.k_norm.weight",)))
        u.extra_states += [extra_state_key(f"{att}{n}_layernorm") for n in "qk"] if te else []
    t(MegatronTensor(f"{att}linear_proj.weight", "copy", (f"{hp}self_attn.o_proj.weight",)))
    u.extra_states += [extra_state_key(f"{att}linear_qkv"), extra_state_key(f"{att}linear_proj")]
    post = (f"{hp}post_attention_layernorm.weight",)
    if te and moe:  # the TE spec: a separate TENorm before the MoE block
        t(MegatronTensor(f"{mp}pre_mlp_layernorm.weight", "copy", post))
        u.extra_states.append(extra_state_key(f"{mp}pre_mlp_layernorm"))
    else:  # fused into (or, in the local spec, renamed onto) linear_fc1
        t(MegatronTensor(f"{mp}mlp.linear_fc1.layer_norm_weight", "copy", post))
    if not moe:
        _fc1(u, layout, f"{mp}mlp.linear_fc1", f"{hp}mlp.gate_proj.weight", f"{hp}mlp.up_proj.weight")
        t(MegatronTensor(f"{mp}mlp.linear_fc2.weight", "copy", (f"{hp}mlp.down_proj.weight",)))
        u.extra_states += [extra_state_key(f"{mp}mlp.linear_fc1"), extra_state_key(f"{mp}mlp.linear_fc2")]
        return u
    t(MegatronTensor(f"{mp}mlp.router.weight", "copy", (f"{hp}mlp.gate.weight",)))
    t(MegatronTensor(f"{mp}mlp.router.expert_bias", "copy", (f"{hp}mlp.gate.e_score_correction_bias",)))
    if arch.shared_experts:
        se, hse = f"{mp}mlp.shared_experts.", f"{hp}mlp.shared_experts."
        _fc1(u, layout, f"{se}linear_fc1", f"{hse}gate_proj.weight", f"{hse}up_proj.weight")
        t(MegatronTensor(f"{se}linear_fc2.weight", "copy", (f"{hse}down_proj.weight",)))
        u.extra_states += [extra_state_key(f"{se}linear_fc1"), extra_state_key(f"{se}linear_fc2")]
    ex, E = f"{mp}mlp.experts.experts.", arch.num_experts
    if layout.experts == "singleton":  # one key per expert
        for e in range(E):
            he = f"{hp}mlp.experts.{e}."
            _fc1(u, layout, f"{ex}{e}.linear_fc1", f"{he}gate_proj.weight", f"{he}up_proj.weight")
            t(MegatronTensor(f"{ex}{e}.linear_fc2.weight", "copy", (f"{he}down_proj.weight",)))
        return u
    gate_up = tuple(s for e in range(E) for s in (f"{hp}mlp.experts.{e}.gate_proj.weight", f"{hp}mlp.experts.{e}.up_proj.weight"))
    t(MegatronTensor(f"{ex}linear_fc1.weight", "experts_gate_up", gate_up))
    t(MegatronTensor(f"{ex}linear_fc2.weight", "experts_down", tuple(f"{hp}mlp.experts.{e}.down_proj.weight" for e in range(E))))
    # SequentialMLP puts each expert's extra state at its offset on the expert axis.
    u.extra_states += [extra_state_key(f"{ex}linear_fc{i}", (e, E)) for i in (1, 2) for e in range(E)]
    return u


def units(arch: GlmArch, layout: Layout = LOCAL) -> list[Unit]:
    """Every Megatron tensor of the model, grouped into streaming units, in model order."""
    out = [Unit("embedding", [MegatronTensor("embedding.word_embeddings.weight", "copy", ("model.embed_tokens.weight",))])]
    for i in range(arch.num_layers):
        out.append(_layer_unit(arch, f"layer {i}", f"decoder.layers.{i}.", f"model.layers.{i}.", arch.is_moe(i), layout))
    for j in range(arch.mtp_layers):
        hf_i = arch.num_layers + j
        hp, mp = f"model.layers.{hf_i}.", f"mtp.layers.{j}."
        u = _layer_unit(arch, f"mtp {j}", f"{mp}transformer_layer.", hp, arch.is_moe(hf_i), layout)
        u.tensors[:0] = [
            MegatronTensor(f"{mp}enorm.weight", "copy", (f"{hp}enorm.weight",)),
            MegatronTensor(f"{mp}hnorm.weight", "copy", (f"{hp}hnorm.weight",)),
            MegatronTensor(f"{mp}eh_proj.weight", "copy", (f"{hp}eh_proj.weight",)),
            MegatronTensor(f"{mp}final_layernorm.weight", "copy", (f"{hp}shared_head.norm.weight",)),
        ]
        u.extra_states.insert(0, extra_state_key(f"{mp}eh_proj"))
        if layout.norms == "te":
            u.extra_states += [extra_state_key(f"{mp}{n}") for n in ("enorm", "hnorm", "final_layernorm")]
        u.dropped = [hp + s for s in MTP_SHARED_SUFFIXES]
        out.append(u)
    head = Unit("head", [MegatronTensor("decoder.final_layernorm.weight", "copy", ("model.norm.weight",))])
    if layout.norms == "te":
        head.extra_states.append(extra_state_key("decoder.final_layernorm"))
    if not arch.tied_embeddings:
        head.tensors.append(MegatronTensor("output_layer.weight", "copy", ("lm_head.weight",)))
    # No output_layer._extra_state: GPTModel drops it from its sharded state dict (old checkpoints lack it).
    out.append(head)
    return out


def check_hf_keys(arch: GlmArch, hf_keys: Iterable[str], where: str) -> None:
    """Refuse a checkpoint whose tensors are not exactly the GLM-4-MoE set (missing or unknown)."""
    have = set(hf_keys)
    us = units(arch)
    want = {k for u in us for k in u.hf_keys}
    optional = {k for u in us for k in u.dropped}
    missing, unknown = sorted(want - have), sorted(have - want - optional)
    if missing or unknown:
        lines = [f"missing {k}" for k in missing[:10]] + [f"unknown {k}" for k in unknown[:10]]
        more = len(missing) + len(unknown) - len(lines)
        raise GlmsnakeError(
            f"{where}: the checkpoint's tensors are not the GLM-4-MoE set its config.json describes:\n    "
            + "\n    ".join(lines) + (f"\n    ... and {more} more" if more > 0 else ""),
            "check that config.json belongs to these weights (layers, experts, MTP layers, qkv bias, qk norm)",
        )


# --------------------------------------------------------------------------- shapes


def megatron_shape(t: MegatronTensor, hf_shape: Callable[[str], tuple[int, ...]]) -> tuple[int, ...]:
    first = tuple(hf_shape(t.sources[0]))
    if t.kind == "copy":
        return first
    if t.kind == "qkv":
        return (sum(hf_shape(s)[0] for s in t.sources), *first[1:])
    if t.kind == "gate_up":
        return (first[0] + hf_shape(t.sources[1])[0], *first[1:])
    if t.kind == "experts_gate_up":
        return (len(t.sources) // 2, first[0] + hf_shape(t.sources[1])[0], *first[1:])
    if t.kind == "experts_down":
        return (len(t.sources), *first)
    raise ValueError(t.kind)


# --------------------------------------------------------------------------- HF -> Megatron


def fill(t: MegatronTensor, dest: torch.Tensor, read_into: Callable[[str, torch.Tensor, int, int], None],
         hf_shape: Callable[[str], tuple[int, ...]]) -> None:
    """Fill `dest` (the Megatron tensor, preallocated) by reading HF row ranges straight into it.

    `read_into(hf_key, dest_view, row_start, row_stop)` copies rows [start, stop) of an HF
    tensor into a contiguous view; every piece below is a contiguous row range on both sides,
    so no intermediate copies are made.
    """
    if t.kind == "copy":
        read_into(t.sources[0], dest, 0, hf_shape(t.sources[0])[0] if dest.dim() else 1)
    elif t.kind == "qkv":
        q, k, v = t.sources
        qg, kg, vg = (hf_shape(s)[0] // t.groups for s in (q, k, v))
        step = qg + kg + vg
        for g in range(t.groups):
            base = g * step
            read_into(q, dest[base : base + qg], g * qg, (g + 1) * qg)
            read_into(k, dest[base + qg : base + qg + kg], g * kg, (g + 1) * kg)
            read_into(v, dest[base + qg + kg : base + step], g * vg, (g + 1) * vg)
    elif t.kind == "gate_up":
        _fill_gate_up(t.sources[0], t.sources[1], dest, read_into, hf_shape)
    elif t.kind == "experts_gate_up":
        for e in range(dest.shape[0]):
            _fill_gate_up(t.sources[2 * e], t.sources[2 * e + 1], dest[e], read_into, hf_shape)
    elif t.kind == "experts_down":
        for e, s in enumerate(t.sources):
            read_into(s, dest[e], 0, hf_shape(s)[0])
    else:
        raise ValueError(t.kind)


def _fill_gate_up(gate, up, dest, read_into, hf_shape) -> None:
    rows = hf_shape(gate)[0]
    read_into(gate, dest[:rows], 0, rows)
    read_into(up, dest[rows:], 0, hf_shape(up)[0])


def to_megatron(t: MegatronTensor, hf: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """In-memory variant of `fill` (tensors already loaded), for small models and tests."""
    shape = megatron_shape(t, lambda k: tuple(hf[k].shape))
    dest = torch.empty(shape, dtype=hf[t.sources[0]].dtype)

    def read_into(key, view, start, stop):
        src = hf[key]
        view.copy_(src[start:stop] if src.dim() else src)

    fill(t, dest, read_into, lambda k: tuple(hf[k].shape))
    return dest


# --------------------------------------------------------------------------- Megatron -> HF


def split(t: MegatronTensor, value: torch.Tensor, arch: GlmArch) -> dict[str, torch.Tensor]:
    """The HF tensors that one Megatron tensor holds (each a fresh contiguous tensor)."""
    if t.kind == "copy":
        return {t.sources[0]: value.clone()}
    if t.kind == "qkv":
        q, k, v = t.sources
        d, qpg = arch.head_dim, arch.heads_per_group
        trail = tuple(value.shape[1:])
        grouped = value.reshape(t.groups, (qpg + 2) * d, *trail)
        return {
            q: grouped[:, : qpg * d].reshape(-1, *trail).contiguous(),
            k: grouped[:, qpg * d : (qpg + 1) * d].reshape(-1, *trail).contiguous(),
            v: grouped[:, (qpg + 1) * d :].reshape(-1, *trail).contiguous(),
        }
    if t.kind == "gate_up":
        gate, up = value.chunk(2, dim=0)
        return {t.sources[0]: gate.contiguous(), t.sources[1]: up.contiguous()}
    if t.kind == "experts_gate_up":
        out = {}
        for e in range(value.shape[0]):
            gate, up = value[e].chunk(2, dim=0)
            out[t.sources[2 * e]], out[t.sources[2 * e + 1]] = gate.contiguous(), up.contiguous()
        return out
    if t.kind == "experts_down":
        return {s: value[e].contiguous() for e, s in enumerate(t.sources)}
    raise ValueError(t.kind)
