"""Baselines: fp16 storage and per-token absmax integers (int8, int4).

int8/int4 are what most engines ship: symmetric codes with one fp16 absmax scale per group of
``group`` channels of each token (default 32, the q8_0/q4_0 block of llama.cpp; ``group=0`` is
one scale per whole vector). They anchor the frontier: int8 must be near-lossless. Measured on
SmolLM2 (1024 context, 3 windows): whole-vector int8 adds +0.026 perplexity because the keys'
outlier channels set the scale; groups of 32 add -0.003 at 8.5 instead of 8.25 bits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..core.errors import InputError, SpecError
from .base import Codec, CodecConfig, Packed, Role, register_codec
from .primitives.bitpack import pack_rows, unpack_rows
from .primitives.scalar import symmetric_dequantize, symmetric_quantize

__all__ = ["Fp16Codec", "Fp16Config", "Int4Config", "Int8Config", "PerTokenIntCodec"]


@dataclass(frozen=True)
class Fp16Config(CodecConfig):
    name: ClassVar[str] = "fp16"


@register_codec(Fp16Config)
class Fp16Codec(Codec):
    """Identity at 16 bits: the uncompressed reference, through the same code path."""

    per_token = frozenset({"data"})

    def _encode(self, x: torch.Tensor, role: Role) -> Packed:
        return Packed(self.spec, role, tuple(x.shape), x.dtype, {"data": x.to(torch.float16).contiguous()})

    def _decode(self, packed: Packed) -> torch.Tensor:
        return packed.tensors["data"].float()


@dataclass(frozen=True)
class _IntConfig(CodecConfig):
    group: int = 32  # channels per scale; 0 = the whole vector
    bits: ClassVar[int] = 8

    def __post_init__(self) -> None:
        if self.group < 0:
            raise SpecError(f"{self.name}: group must be >= 0 (0 = whole vector), got {self.group}")


@dataclass(frozen=True)
class Int8Config(_IntConfig):
    name: ClassVar[str] = "int8"
    bits: ClassVar[int] = 8


@dataclass(frozen=True)
class Int4Config(_IntConfig):
    name: ClassVar[str] = "int4"
    bits: ClassVar[int] = 4


class PerTokenIntCodec(Codec):
    """Symmetric absmax integers per token (per group of channels), fp16 scales."""

    config: _IntConfig
    per_token = frozenset({"codes", "scale"})

    def _group(self, d: int) -> int:
        return self.config.group or d

    def check_dim(self, d: int) -> None:
        g = self._group(d)
        if d % g:
            divisors = [k for k in range(1, d + 1) if d % k == 0]
            raise InputError(f"{self.spec}: group={g} does not divide head dim {d}; valid groups: {divisors}")

    def _encode(self, x: torch.Tensor, role: Role) -> Packed:
        d, g, bits = x.shape[-1], self._group(x.shape[-1]), self.config.bits
        xg = x.reshape(*x.shape[:-1], d // g, g)
        codes, scale = symmetric_quantize(xg, bits, dim=-1)
        packed = pack_rows(codes.reshape(*x.shape[:-1], d), bits)
        return Packed(self.spec, role, tuple(x.shape), x.dtype, {"codes": packed, "scale": scale.squeeze(-1)})

    def _decode(self, packed: Packed) -> torch.Tensor:
        d, bits = packed.shape[-1], self.config.bits
        g = self._group(d)
        lead = packed.tensors["codes"].shape[:-1]
        codes = unpack_rows(packed.tensors["codes"], bits, d).reshape(*lead, d // g, g)
        out = symmetric_dequantize(codes, packed.tensors["scale"].unsqueeze(-1), bits)
        return out.reshape(*lead, d)


register_codec(Int8Config)(PerTokenIntCodec)
register_codec(Int4Config)(PerTokenIntCodec)
