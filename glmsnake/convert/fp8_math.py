"""The FP8 quantization math, on one chunk of rows at a time, with torch ops.

Every strategy is the same computation over rectangular *groups* of the weight
that share one scale: 128x128 blocks (block), whole rows (channel) or the whole
tensor (tensor). For each group: amax = max|w| (zero padding never changes it),
scale = float32(max(amax, 1e-12)) / 448 with the max taken in the weight's own
dtype (as slime's tool does), q = clamp(w / scale, -448, 448) in float32, then
cast to float8_e4m3fn (round to nearest even; the clamp matters because the
cast does not saturate). Division, not multiplication by a reciprocal, so the
result is the correctly rounded quotient whatever the vectorization or device.

Scale tensors, by strategy (what SGLang reads; transformers reads block only):
- block:   `<m>.weight_scale_inv` float32 [ceil(out/bs0), ceil(in/bs1)]  (fp8 quant_method)
- channel: `<m>.weight_scale`     float32 [out, 1]  (compressed-tensors, strategy "channel")
- tensor:  `<m>.weight_scale`     float32 [1]       (fp8 quant_method without weight_block_size)

This module is the definition: the converter's torch path runs it on any device, and
the C kernel of fp8_kernel.py (bf16 on a CPU, faster) is checked against it before use.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from glmsnake.errors import GlmsnakeError

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
AMAX_FLOOR = 1e-12
STRATEGIES = ("block", "channel", "tensor")


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def parse_block_size(value) -> tuple[int, int]:
    """Two positive integers, or a GlmsnakeError that says so."""
    try:
        items = list(value)
        ok = len(items) == 2 and all(int(str(v)) == float(str(v)) and int(str(v)) > 0 for v in items)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise GlmsnakeError(
            f"block size must be two positive integers, got {value!r}",
            "pass e.g. --block-size 128 128 (rows, columns of one scale block)",
        )
    return int(str(items[0])), int(str(items[1]))


@dataclass(frozen=True)
class Scheme:
    strategy: str = "block"
    block_size: tuple[int, int] = (128, 128)

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise GlmsnakeError(f"unknown FP8 strategy {self.strategy!r}", f"use one of {', '.join(STRATEGIES)}")
        object.__setattr__(self, "block_size", parse_block_size(self.block_size))

    def scale_key(self, weight_key: str) -> str:
        suffix = "weight_scale_inv" if self.strategy == "block" else "weight_scale"
        return weight_key.removesuffix("weight") + suffix

    def scale_shape(self, rows: int, cols: int) -> tuple[int, ...]:
        if self.strategy == "block":
            return (ceil_div(rows, self.block_size[0]), ceil_div(cols, self.block_size[1]))
        if self.strategy == "channel":
            return (rows, 1)
        return (1,)

    def row_multiple(self) -> int:
        """Chunks of rows must be a multiple of this (except the last), so groups never straddle chunks."""
        return self.block_size[0] if self.strategy == "block" else 1

    def padded_cols(self, cols: int) -> int:
        return ceil_div(cols, self.block_size[1]) * self.block_size[1] if self.strategy == "block" else cols

    def quantization_config(self, modules_to_not_convert: list[str]) -> dict:
        """config.json's quantization_config, as SGLang reads it for this strategy."""
        if self.strategy == "channel":
            return _compressed_tensors_channel_config(modules_to_not_convert)
        cfg = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic"}
        if self.strategy == "block":
            cfg["weight_block_size"] = list(self.block_size)
        cfg["modules_to_not_convert"] = modules_to_not_convert
        return cfg


def _compressed_tensors_channel_config(ignore: list[str]) -> dict:
    def quant_args(strategy: str, dynamic: bool, observer) -> dict:
        return {
            "num_bits": 8, "type": "float", "symmetric": True, "strategy": strategy, "dynamic": dynamic,
            "group_size": None, "block_structure": None, "actorder": None, "observer": observer,
            "observer_kwargs": {},
        }  # fmt: skip

    return {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "quantization_status": "compressed",
        "ignore": ignore,
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": quant_args("channel", False, "minmax"),
                "input_activations": quant_args("token", True, None),
                "output_activations": None,
            }
        },
    }


def scale_from_amax(amax: torch.Tensor, weight_dtype: torch.dtype) -> torch.Tensor:
    """float32(max(amax, 1e-12)) / 448; `amax` holds values exact in `weight_dtype`.

    The divisor is a tensor on amax's device: given a Python number, CUDA multiplies by its
    reciprocal (1/448 is inexact), which differs from the division in the last bit of some
    scales; the CPU divides. A tensor divisor makes both devices divide.
    """
    clamped = amax.to(weight_dtype).clamp(min=AMAX_FLOOR).to(torch.float32)
    return clamped / torch.full((), FP8_MAX, dtype=torch.float32, device=clamped.device)


def group_amax(f: torch.Tensor, g0: int, g1: int) -> torch.Tensor:
    """max|f| over each g0 x g1 group of the float32 matrix f (its shape a multiple of the group)."""
    rows, cols = f.shape
    v = f.view(rows // g0, g0, cols // g1, g1)
    # max(amax, -amin) equals max|x| exactly and skips writing an |x| copy.
    return torch.maximum(v.amax(dim=(1, 3)), v.amin(dim=(1, 3)).neg_())


def quantize_groups_(f: torch.Tensor, scale: torch.Tensor, g0: int, g1: int, q_out: torch.Tensor) -> None:
    """q_out = fp8(clamp(f / scale, -448, 448)) per group; f is overwritten (it is scratch)."""
    rows, cols = f.shape
    v = f.view(rows // g0, g0, cols // g1, g1)
    v.div_(scale.view(rows // g0, 1, cols // g1, 1)).clamp_(-FP8_MAX, FP8_MAX)
    q_out.copy_(f)


class ChunkQuantizer:
    """Reusable float32 / fp8 scratch for one worker, so chunks allocate nothing.

    A chunk is some rows of a weight; `load` pads it with zeros to whole groups
    (exactly the reference's zero padding), `amax` gives its groups' max|w|,
    `quantize` its fp8 values, cropped back to the chunk's shape. For the tensor
    strategy a chunk is one group, and the caller combines the chunks' amax.
    """

    def __init__(self, scheme: Scheme, device: torch.device | str = "cpu"):
        self.scheme = scheme
        self.device = torch.device(device)
        self._f = torch.empty(0, dtype=torch.float32, device=self.device)
        self._q = torch.empty(0, dtype=FP8, device=self.device)

    def _scratch(self, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._f.numel() < rows * cols:
            self._f = torch.empty(rows * cols, dtype=torch.float32, device=self.device)
            self._q = torch.empty(rows * cols, dtype=FP8, device=self.device)
        return self._f[: rows * cols].view(rows, cols), self._q[: rows * cols].view(rows, cols)

    def _group(self, f: torch.Tensor) -> tuple[int, int]:
        if self.scheme.strategy == "block":
            return self.scheme.block_size
        if self.scheme.strategy == "channel":
            return 1, f.shape[1]
        return f.shape

    def load(self, x: torch.Tensor) -> torch.Tensor:
        r, c = x.shape
        m = self.scheme.row_multiple()
        f, _ = self._scratch(ceil_div(r, m) * m, self.scheme.padded_cols(c))
        f[:r, :c].copy_(x)
        if f.shape[1] > c:
            f[:, c:].zero_()
        if f.shape[0] > r:
            f[r:, :].zero_()
        return f

    def amax(self, f: torch.Tensor) -> torch.Tensor:
        return group_amax(f, *self._group(f))

    def quantize(self, f: torch.Tensor, scale: torch.Tensor, r: int, c: int) -> torch.Tensor:
        """The fp8 chunk (r x c; a strided view of the scratch when the columns were padded)."""
        _, q = self._scratch(*f.shape)
        quantize_groups_(f, scale, *self._group(f), q)
        return q[:r, :c]


def nonfinite_error(name: str) -> GlmsnakeError:
    return GlmsnakeError(
        f"tensor {name} holds NaN or Inf values; it cannot be quantized",
        "check the source checkpoint (a corrupt download or a diverged training run)",
    )


def check_finite(scale: torch.Tensor, name: str) -> None:
    if not bool(torch.isfinite(scale).all()):
        raise nonfinite_error(name)
