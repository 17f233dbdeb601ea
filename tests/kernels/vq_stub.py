"""A stand-in rotation + codebook codec with the TurboQuant/FibQuant packed layout.

Used until ``codecs/turboquant.py`` and ``codecs/fibquant.py`` land, and kept afterwards for
layouts those codecs do not expose (3- and 6-bit indices, N=256 blocks): ``Packed.tensors`` =
``{"codes": pack_rows(indices, log2 N), "norm": fp16}``, ``rotation(d).matrix`` (y = Π x) and
``codebook(d, role)`` [N, vec]. Its encode is the fp32 reference encode.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from kvshrink.codecs.base import Codec, CodecConfig, Packed, Role
from kvshrink.kernels.encode import encode_vq_ref


@dataclass(frozen=True)
class StubVQConfig(CodecConfig):
    name: ClassVar[str] = "stubvq"
    bits: int = 4  # bits per index, N = 2**bits
    vec: int = 1
    seed: int = 0


@dataclass
class _Rotation:
    matrix: torch.Tensor


class StubVQ(Codec):
    """Haar rotation and random codebooks (distinct for keys and values), fixed by ``seed``."""

    config: StubVQConfig

    def __init__(self, bits: int, vec: int = 1, seed: int = 0) -> None:
        super().__init__(StubVQConfig(bits, vec, seed))

    def rotation(self, d: int) -> _Rotation:
        g = torch.Generator().manual_seed(1000 + self.config.seed + d)
        a = torch.randn(d, d, generator=g, dtype=torch.float64)
        q, r = torch.linalg.qr(a)
        return _Rotation((q * torch.sign(torch.diagonal(r))).float())

    def codebook(self, d: int, role: Role) -> torch.Tensor:
        g = torch.Generator().manual_seed(2000 + self.config.seed + d + (role == "value"))
        n, vec = 1 << self.config.bits, self.config.vec
        return torch.randn(n, vec, generator=g) * math.sqrt(1.0 / d)

    def _encode(self, x: torch.Tensor, role: Role) -> Packed:
        d = x.shape[-1]
        rot, cb = self.rotation(d).matrix.to(x.device), self.codebook(d, role).to(x.device)
        codes, norm = encode_vq_ref(x, rot, cb)
        return Packed(self.spec, role, tuple(x.shape), x.dtype, {"codes": codes, "norm": norm})

    def _decode(self, packed: Packed) -> torch.Tensor:
        from kvshrink.kernels.layout import dequantize, layout_of

        d = packed.shape[-1]
        return dequantize(packed, layout_of(self, packed.role, d), d, self, packed.role)
