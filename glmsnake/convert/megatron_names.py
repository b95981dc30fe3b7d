"""The mechanics of HF names <-> Megatron-Core torch_dist keys, both directions, in every key layout.

Which keys a model has is each architecture's business (glmsnake/architectures/); this module
holds what they share. One `MegatronTensor` describes a Megatron key, the HF tensors it is made
of and how (checked against megatron-core 0.19.2's GPTModel and slime's converters):

- `copy`      one HF tensor as is (norms, router, expert bias, o_proj, down_proj, ...);
- `qkv`       q/k/v concatenated per query group: [q heads of the group x head_dim, k, v];
- `gate_up`   linear_fc1 = cat(gate, up) on the output axis;
- `experts_gate_up` / `experts_down`: the routed experts stacked on a leading expert axis.

Megatron keys are grouped into `Unit`s (embedding, one per decoder layer, one per MTP
layer, the head) so converters stream one layer at a time. Each unit also lists the
`_extra_state` ShardedObjects that the layer spec's modules ask for (readers ignore them).

`Layout` names the key variants a checkpoint can be in (docs/architecture.md lists them with
the megatron-core source that defines each); each architecture's `detect_layout` tells them apart.
"""

from __future__ import annotations

from dataclasses import dataclass, field
import re
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

if TYPE_CHECKING:
    import torch  # the names are read by every Snakefile parse; torch's import costs seconds there


# HF keys of a GLM MTP layer that Megatron does not store: its MTP block shares the
# main model's embedding and output layer. Dropped on the way in, restored on export.
MTP_SHARED_SUFFIXES = ("embed_tokens.weight", "shared_head.head.weight")


@dataclass(frozen=True)
class Layout:
    """The key variant of a torch_dist checkpoint.

    norms: `local` (megatron-core's local layer spec) or `te` (the Transformer Engine spec,
      slime's: MoE layers keep a separate `pre_mlp_layernorm.weight`, dense layers fuse it into
      linear_fc1, TE norms add `_extra_state` objects). Where each norm lands is the architecture's.
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


def fc1_tensors(u: Unit, layout: Layout, module: str, gate: str, up: str) -> None:
    """A SwiGLU fc1: [gate; up] in one tensor, or split into weight_w and weight_v (singleton)."""
    if layout.experts == "singleton":
        u.tensors += [MegatronTensor(f"{module}.weight_w", "copy", (gate,)), MegatronTensor(f"{module}.weight_v", "copy", (up,))]
    else:
        u.tensors.append(MegatronTensor(f"{module}.weight", "gate_up", (gate, up)))


def routed_experts(u: Unit, layout: Layout, ex: str, hex_: str, num_experts: int) -> None:
    """The routed experts (Megatron prefix `ex`, HF prefix `hex_`): stacked on an expert axis, or one key each."""
    E = num_experts
    if layout.experts == "singleton":
        for e in range(E):
            he = f"{hex_}{e}."
            fc1_tensors(u, layout, f"{ex}{e}.linear_fc1", f"{he}gate_proj.weight", f"{he}up_proj.weight")
            u.tensors.append(MegatronTensor(f"{ex}{e}.linear_fc2.weight", "copy", (f"{he}down_proj.weight",)))
        return
    gate_up = tuple(s for e in range(E) for s in (f"{hex_}{e}.gate_proj.weight", f"{hex_}{e}.up_proj.weight"))
    u.tensors.append(MegatronTensor(f"{ex}linear_fc1.weight", "experts_gate_up", gate_up))
    u.tensors.append(MegatronTensor(f"{ex}linear_fc2.weight", "experts_down", tuple(f"{hex_}{e}.down_proj.weight" for e in range(E))))
    # SequentialMLP puts each expert's extra state at its offset on the expert axis.
    u.extra_states += [extra_state_key(f"{ex}linear_fc{i}", (e, E)) for i in (1, 2) for e in range(E)]


def singleton_in(keys: Iterable[str]) -> str:
    """`singleton` when the keys hold one entry per expert, else `stacked`."""
    return "singleton" if any(_SINGLETON_EXPERT.search(k) for k in keys) else "stacked"


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
    import torch

    shape = megatron_shape(t, lambda k: tuple(hf[k].shape))
    dest = torch.empty(shape, dtype=hf[t.sources[0]].dtype)

    def read_into(key, view, start, stop):
        src = hf[key]
        view.copy_(src[start:stop] if src.dim() else src)

    fill(t, dest, read_into, lambda k: tuple(hf[k].shape))
    return dest


# --------------------------------------------------------------------------- Megatron -> HF


def split(t: MegatronTensor, value: torch.Tensor, arch: Any) -> dict[str, torch.Tensor]:
    """The HF tensors that one Megatron tensor holds (each a fresh contiguous tensor); `arch` is an
    architectures.GlmArch (head_dim and heads_per_group split a qkv tensor)."""
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
