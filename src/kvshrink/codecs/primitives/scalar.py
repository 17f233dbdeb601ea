"""Uniform scalar quantization primitives shared by the integer codecs.

Scales and zero-points are stored in fp16, so quantization uses the fp16-rounded values: what
is decoded is exactly what was stored, and nothing is measured with higher-precision metadata
than the representation holds.
"""

from __future__ import annotations

import torch

__all__ = ["asymmetric_dequantize", "asymmetric_quantize", "symmetric_dequantize", "symmetric_quantize"]

_TINY = 2.0**-24  # smallest positive fp16 subnormal: a scale never rounds to zero


def symmetric_quantize(x: torch.Tensor, bits: int, dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """Absmax quantization along ``dim``: unsigned codes in ``[0, 2**bits - 2]`` and fp16 scales."""
    qmax = (1 << (bits - 1)) - 1
    x = x.float()
    scale = (x.abs().amax(dim=dim, keepdim=True) / qmax).clamp_min(_TINY).half()
    q = torch.round(x / scale.float()).clamp(-qmax, qmax) + qmax
    return q.to(torch.int64), scale


def symmetric_dequantize(codes: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    qmax = (1 << (bits - 1)) - 1
    return (codes.float() - qmax) * scale.float()


def asymmetric_quantize(
    x: torch.Tensor, bits: int, dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Min/max (KIVI) quantization along ``dim``: codes in ``[0, 2**bits-1]``, fp16 scale and min."""
    levels = (1 << bits) - 1
    x = x.float()
    mn = x.amin(dim=dim, keepdim=True).half()
    mx = x.amax(dim=dim, keepdim=True)
    scale = ((mx - mn.float()) / levels).clamp_min(_TINY).half()
    q = torch.round((x - mn.float()) / scale.float()).clamp(0, levels)
    return q.to(torch.int64), scale, mn


def asymmetric_dequantize(codes: torch.Tensor, scale: torch.Tensor, mn: torch.Tensor) -> torch.Tensor:
    return codes.float() * scale.float() + mn.float()
