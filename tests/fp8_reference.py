"""A slow, obviously-correct FP8 quantizer: the FP8 block format's math, one scale group at a time.

Written from the FP8 block format's definition alone (docs/architecture.md), not from
glmsnake.convert.fp8_math, so the fast path is checked against an independent statement of the rule:
zero-pad to the group grid; per group amax = max|w|; scale = float32(max(amax,
1e-12)) / 448 (max taken in the weight's dtype); q = clamp(w / scale, -448, 448)
in float32, cast to float8_e4m3fn; crop the padding.
"""

from __future__ import annotations

import math

import torch


def reference_quantize(w: torch.Tensor, strategy: str, block_size=(128, 128)) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = w.shape
    if strategy == "block":
        g0, g1 = block_size
    elif strategy == "channel":
        g0, g1 = 1, cols
    else:
        g0, g1 = max(rows, 1), max(cols, 1)
    n0, n1 = math.ceil(rows / g0), math.ceil(cols / g1)
    padded = torch.zeros(n0 * g0, n1 * g1, dtype=w.dtype)
    padded[:rows, :cols] = w
    q = torch.empty(n0 * g0, n1 * g1, dtype=torch.float8_e4m3fn)
    scale = torch.empty(n0, n1, dtype=torch.float32)
    for i in range(n0):
        for j in range(n1):
            block = padded[i * g0 : (i + 1) * g0, j * g1 : (j + 1) * g1]
            amax = block.abs().max()
            s = amax.clamp(min=1e-12).to(torch.float32) / 448.0
            scale[i, j] = s
            q[i * g0 : (i + 1) * g0, j * g1 : (j + 1) * g1] = (
                (block.to(torch.float32) / s).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
            )
    q = q[:rows, :cols].contiguous()
    if strategy == "channel":
        scale = scale.reshape(rows, 1)
    elif strategy == "tensor":
        scale = scale.reshape(1)
    return q, scale


def dequant_error_ok(w: torch.Tensor, q: torch.Tensor, scale_full: torch.Tensor) -> torch.Tensor:
    """Elementwise |w - q*s| <= max(|w| * 2^-4, s * 2^-10), in float64."""
    w64, q64, s64 = w.to(torch.float64), q.to(torch.float64), scale_full.to(torch.float64)
    err = (w64 - q64 * s64).abs()
    return err <= torch.maximum(w64.abs() * 2.0**-4, s64 * 2.0**-10)


def expand_scale(scale: torch.Tensor, shape, strategy: str, block_size=(128, 128)) -> torch.Tensor:
    """The scale of every element, for any strategy."""
    rows, cols = shape
    if strategy == "block":
        s = scale.repeat_interleave(block_size[0], 0).repeat_interleave(block_size[1], 1)
        return s[:rows, :cols]
    return scale.reshape(-1, 1).expand(rows, cols) if strategy == "channel" else scale.reshape(1, 1).expand(rows, cols)
