"""The GLM architectures glmsnake converts, quantizes and trains: one module each.

Each module holds one `GlmMoeArchitecture` (see base.py): its config.json <-> MODEL args
mapping, its HF <-> Megatron names in every key layout, its transformers classes (for the
tiny factory and the local trainer) and its FP8 allow-list. Adding a GLM model with a new
attention means adding one module and listing it here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable, Mapping

from glmsnake.architectures import glm4_moe, glm4_moe_lite
from glmsnake.architectures.base import GlmArch, GlmMoeArchitecture
from glmsnake.convert.megatron_names import LOCAL, Layout, Unit
from glmsnake.errors import GlmsnakeError

if TYPE_CHECKING:
    from glmsnake.recipe.args import ModelArgs

ARCHITECTURES: dict[str, GlmMoeArchitecture] = {a.model_type: a for a in (glm4_moe.ARCH, glm4_moe_lite.ARCH)}

__all__ = ["ARCHITECTURES", "GlmArch", "GlmMoeArchitecture", "of_model_args", "of_hf_config", "shape", "units"]


def of_model_args(m: "ModelArgs") -> GlmMoeArchitecture:
    return next(a for a in ARCHITECTURES.values() if a.matches(m))


def of_model_type(model_type: str | None, where: str = "config.json") -> GlmMoeArchitecture:
    arch = ARCHITECTURES.get(model_type or "")
    if arch is None:
        raise GlmsnakeError(
            f"{where} has model_type {model_type!r}, which glmsnake does not convert",
            f"use a checkpoint of a supported architecture: {', '.join(sorted(ARCHITECTURES))}",
        )
    return arch


def of_hf_config(cfg: Mapping[str, Any] | Any, where: str = "config.json") -> GlmMoeArchitecture:
    model_type = cfg.get("model_type") if isinstance(cfg, Mapping) else getattr(cfg, "model_type", None)
    return of_model_type(model_type, where)


def shape(cfg: Mapping[str, Any] | Any) -> GlmArch:
    """What the name mapping needs, from a config.json (dict) or a transformers config."""
    return of_hf_config(cfg).shape(cfg)


def units(arch: GlmArch, layout: Layout = LOCAL) -> list[Unit]:
    return ARCHITECTURES[arch.model_type].units(arch, layout)


def detect_layout(arch: GlmArch, keys: Iterable[str]) -> Layout:
    return ARCHITECTURES[arch.model_type].detect_layout(keys)


def check_hf_keys(arch: GlmArch, hf_keys: Iterable[str], where: str) -> None:
    ARCHITECTURES[arch.model_type].check_hf_keys(arch, hf_keys, where)


def hf_fields(m: "ModelArgs") -> dict[str, Any]:
    return of_model_args(m).hf_fields(m)


def check_hf_config(config: Mapping[str, Any], m: "ModelArgs", where: str) -> None:
    of_model_args(m).check_hf_config(config, m, where)
