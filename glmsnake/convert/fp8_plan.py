"""What the FP8 conversion will write, and whether it may: every check and plan made before a byte is written.

Which tensors are quantized (an allow-list of projection weights; everything else is kept as
it is), each output shard's header and tensor offsets (laid out as save_file would, by
safetensors_io), and the modules left unquantized for quantization_config. The source must be
a complete HF checkpoint that is not quantized yet and whose shards agree with its index; the
destination must be new, empty, or an earlier conversion of this same source (its
`glmsnake.fp8.json` marker says which). Kept apart from the conversion engine (fp8_shard.py)
so that every refusal happens before any file is opened for writing.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from glmsnake import atomic
from glmsnake.convert.fp8_math import Scheme
from glmsnake.convert.safetensors_io import (
    INDEX_NAME,
    SINGLE_NAME,
    Header,
    OutEntry,
    TensorInfo,
    plan_layout,
    read_header,
)
from glmsnake.errors import GlmsnakeError

MARKER_NAME = "glmsnake.fp8.json"  # our provenance record inside the output folder

# Which projections are quantized is the architecture's allow-list (`quantized_weight` of
# glmsnake/architectures): the attention's and the dense, shared-expert and routed-expert
# gate/up/down, in every decoder layer including the MTP layer. Everything else (embeddings,
# lm_head, norms, router gate, expert bias, biases, eh_proj, shared_head) stays as it is.
FLOAT_DTYPES = {"BF16", "F16", "F32"}
FP8_SCALE_KEY = re.compile(r"\.(weight_scale(_inv)?|input_scale|activation_scale)$")


# ---------------------------------------------------------------- planning the output


def is_quantized(info: TensorInfo, quantized: re.Pattern) -> bool:
    return bool(quantized.search(info.name)) and len(info.shape) == 2 and info.dtype in FLOAT_DTYPES


@dataclass
class ShardPlan:
    name: str
    src: Header
    header: bytes  # the output file's header
    out: dict[str, TensorInfo]  # output tensors, offsets in the output data section
    quantized: list[str]

    @property
    def in_bytes(self) -> int:
        return self.src.file_size

    @property
    def out_size(self) -> int:
        return len(self.header) + max((t.end for t in self.out.values()), default=0)


def plan_shard(name: str, header: Header, scheme: Scheme, pattern: re.Pattern) -> ShardPlan:
    """The output shard: `pattern` (the architecture's allow-list) picks the tensors to quantize."""
    entries, quantized = [], []
    for info in header.tensors.values():
        if is_quantized(info, pattern):
            quantized.append(info.name)
            entries.append(OutEntry(info.name, "F8_E4M3", info.shape))
            entries.append(OutEntry(scheme.scale_key(info.name), "F32", scheme.scale_shape(*info.shape)))
        else:
            entries.append(OutEntry(info.name, info.dtype, info.shape))
    head, out = plan_layout(entries, header.metadata if header.metadata is not None else {"format": "pt"})
    return ShardPlan(name, header, head, out, sorted(quantized))


def modules_to_not_convert(plans: list[ShardPlan]) -> list[str]:
    """Module names (key minus its last part) of the kept weights, for quantization_config."""
    quantized = {k.rsplit(".", 1)[0] for p in plans for k in p.quantized}
    kept = {k.rsplit(".", 1)[0] for p in plans for k in p.src.tensors if "." in k}
    return sorted(kept - quantized)


# ---------------------------------------------------------------- checks of the source and the destination


@dataclass
class Source:
    dir: Path
    config: dict
    shards: list[str]
    headers: dict[str, Header]

    @property
    def quantized_weight(self) -> re.Pattern:
        from glmsnake import architectures

        return architectures.of_hf_config(self.config, str(self.dir / "config.json")).quantized_weight


def inspect_source(model_dir: Path) -> Source:
    """Read config, index and every shard header; refuse anything incomplete or already FP8."""
    model_dir = Path(model_dir)
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        what = "has no config.json" if model_dir.is_dir() else "does not exist" if not model_dir.exists() else "is a file"
        raise GlmsnakeError(f"{model_dir} {what}", "point --model-dir at a Hugging Face checkpoint folder")
    config = json.loads(config_path.read_text())
    if config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method", "?")
        raise GlmsnakeError(
            f"{model_dir} is already quantized (config.json has a {method} quantization_config)",
            "convert the bf16 checkpoint instead (the download_hf output), not an FP8 one",
        )
    from glmsnake import architectures

    architectures.of_hf_config(config, str(config_path))  # a model whose projections we know
    weight_map = _weight_map(model_dir)
    shards = sorted(set(weight_map.values()))
    missing = [s for s in shards if not (model_dir / s).is_file()]
    if missing:
        raise GlmsnakeError(
            f"{model_dir} lacks {len(missing)} shard(s) its index names: {', '.join(missing)}",
            "re-run the download (snakemake download_hf, or huggingface-cli download) to complete it",
        )
    headers = {s: read_header(model_dir / s) for s in shards}
    for s, h in headers.items():
        _check_shard(model_dir, s, h, {k for k, v in weight_map.items() if v == s})
    return Source(model_dir, config, shards, headers)


def _weight_map(model_dir: Path) -> dict[str, str]:
    index = model_dir / INDEX_NAME
    if index.is_file():
        return json.loads(index.read_text())["weight_map"]
    single = model_dir / SINGLE_NAME
    if single.is_file():
        return {k: single.name for k in read_header(single).tensors}
    raise GlmsnakeError(
        f"{model_dir} has neither {INDEX_NAME} nor {SINGLE_NAME}",
        "point --model-dir at a Hugging Face safetensors checkpoint folder",
    )


def _check_shard(model_dir: Path, shard: str, header: Header, indexed: set[str]) -> None:
    fp8 = sorted(n for n, t in header.tensors.items() if t.dtype.startswith("F8") or FP8_SCALE_KEY.search(n))
    if fp8:
        raise GlmsnakeError(
            f"{model_dir / shard} already holds FP8 tensors or scales (e.g. {fp8[0]})",
            "convert the bf16 checkpoint instead, not an FP8 one",
        )
    if set(header.tensors) != indexed:
        lost = sorted(indexed - set(header.tensors))[:3]
        extra = sorted(set(header.tensors) - indexed)[:3]
        raise GlmsnakeError(
            f"{model_dir / shard} does not match {INDEX_NAME} (missing {lost}, unexpected {extra})",
            "re-download the checkpoint; its shards and index come from different versions",
        )


def _check_writable(folder: Path) -> None:
    """The folder that gets the staging folder and the result, probed (root ignores mode bits)."""
    existing = next((p for p in [folder, *folder.parents] if p.exists()), folder)
    probe = existing / f".glmsnake-probe-{os.getpid()}"
    try:
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise GlmsnakeError(f"cannot write in {existing} ({e.strerror}): the FP8 folder is staged and published there",
                            "choose a --save-dir on a writable file system") from None


def check_destination(save_dir: Path, model_dir: Path) -> None:
    """Refuse a destination that holds anything but an earlier conversion of this same model."""
    save_dir, model_dir = Path(save_dir).absolute(), Path(model_dir).absolute()
    if save_dir == model_dir or model_dir in save_dir.parents or save_dir in model_dir.parents:
        raise GlmsnakeError(
            f"--save-dir {save_dir} overlaps --model-dir {model_dir}", "write the FP8 checkpoint to its own folder"
        )
    if os.path.ismount(save_dir):
        raise GlmsnakeError(
            f"--save-dir {save_dir} is a mount point: the finished folder is renamed onto it, which a mount refuses",
            f"write into a folder inside it, e.g. --save-dir {save_dir / (model_dir.name + '-FP8')}",
        )
    _check_writable(save_dir.parent)
    if not save_dir.exists():
        return
    if not save_dir.is_dir():
        raise GlmsnakeError(f"{save_dir} exists and is not a folder", "choose another --save-dir")
    contents = [p for p in save_dir.iterdir() if p.name != atomic.SENTINEL_NAME]
    if not contents:
        return
    marker = save_dir / MARKER_NAME
    source = None
    if marker.is_file():
        try:
            source = json.loads(marker.read_text()).get("source")
        except json.JSONDecodeError:
            source = None
    if source != str(model_dir):
        raise GlmsnakeError(
            f"{save_dir} already holds files that are not an FP8 conversion of {model_dir} "
            f"({len(contents)} entries, e.g. {min(p.name for p in contents)})",
            "choose an empty or new --save-dir, or remove that folder yourself if it is disposable",
        )
