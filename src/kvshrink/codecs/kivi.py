"""KIVI (Liu et al., ICML 2024): asymmetric 2/4-bit, keys per channel, values per token.

Keys have fixed outlier channels, so each channel gets its own min/scale over a group of
``group`` consecutive tokens; value errors should stay local to a token, so values get a
min/scale per token per group of ``group`` channels. The newest tokens stay in fp16, as in the
paper's code: keys quantize whole chunks of ``residual`` tokens (the remainder stays fp16),
values keep exactly the last ``residual`` tokens in fp16. Scales and mins are fp16 and counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..core.errors import InputError, SpecError
from .base import Codec, CodecConfig, Packed, Role, register_codec
from .primitives.bitpack import pack_rows, unpack_rows
from .primitives.scalar import asymmetric_dequantize, asymmetric_quantize

__all__ = ["KiviCodec", "KiviConfig"]


@dataclass(frozen=True)
class KiviConfig(CodecConfig):
    name: ClassVar[str] = "kivi"
    always: ClassVar[tuple[str, ...]] = ("b",)
    b: int = 2
    group: int = 32
    residual: int = 128

    def __post_init__(self) -> None:
        if self.b not in (2, 4):
            raise SpecError(f"kivi: b must be 2 or 4, got {self.b}")
        if self.group < 1:
            raise SpecError(f"kivi: group must be >= 1, got {self.group}")
        if self.residual < 0 or self.residual % self.group:
            raise SpecError(
                f"kivi: residual must be a non-negative multiple of group={self.group}, got {self.residual}"
            )


@register_codec(KiviConfig)
class KiviCodec(Codec):
    config: KiviConfig

    def check_dim(self, d: int) -> None:
        if d % self.config.group:
            valid = [g for g in (8, 16, 32, 64, 128) if d % g == 0]
            raise InputError(
                f"{self.spec}: group={self.config.group} does not divide head dim {d} (value groups "
                f"split channels); valid groups for d={d}: {valid}"
            )

    def quantized_tokens(self, t: int, role: Role) -> int:
        """How many of ``t`` tokens are quantized (the rest stay fp16)."""
        r = self.config.residual
        if role == "key":
            return t - t % r if r else t - t % self.config.group
        return max(t - r, 0)

    def _encode(self, x: torch.Tensor, role: Role) -> Packed:
        c = self.config
        *lead, t, d = x.shape
        tq = self.quantized_tokens(t, role)
        xq, xr = x[..., :tq, :].float(), x[..., tq:, :]
        if role == "key":  # per channel, groups of `group` tokens
            g = xq.reshape(*lead, tq // c.group, c.group, d)
            codes, scale, mn = asymmetric_quantize(g, c.b, dim=-2)
            codes, scale, mn = codes.reshape(*lead, tq, d), scale.squeeze(-2), mn.squeeze(-2)
        else:  # per token, groups of `group` channels
            g = xq.reshape(*lead, tq, d // c.group, c.group)
            codes, scale, mn = asymmetric_quantize(g, c.b, dim=-1)
            codes, scale, mn = codes.reshape(*lead, tq, d), scale.squeeze(-1), mn.squeeze(-1)
        tensors = {
            "codes": pack_rows(codes, c.b),
            "scale": scale.contiguous(),
            "min": mn.contiguous(),
            "residual": xr.to(torch.float16).contiguous(),
        }
        return Packed(self.spec, role, tuple(x.shape), x.dtype, tensors, {"tq": tq})

    def _dequant(self, packed: Packed, rows: torch.Tensor | None) -> torch.Tensor:
        """Dequantize quantized rows ``rows`` (all when None)."""
        c, d, role = self.config, packed.shape[-1], packed.role
        tz = packed.tensors
        codes_p = tz["codes"] if rows is None else tz["codes"].index_select(-2, rows)
        codes = unpack_rows(codes_p, c.b, d).float()
        nrows = codes.shape[-2]
        if role == "key":
            grp = torch.arange(nrows, device=codes.device) // c.group if rows is None else rows // c.group
            scale, mn = tz["scale"].index_select(-2, grp), tz["min"].index_select(-2, grp)
            return asymmetric_dequantize(codes, scale, mn)
        scale, mn = tz["scale"], tz["min"]
        if rows is not None:
            scale, mn = scale.index_select(-2, rows), mn.index_select(-2, rows)
        lead = codes.shape[:-1]
        g = codes.reshape(*lead, d // c.group, c.group)
        return asymmetric_dequantize(g, scale.unsqueeze(-1), mn.unsqueeze(-1)).reshape(*lead, d)

    def _decode(self, packed: Packed) -> torch.Tensor:
        q = self._dequant(packed, None)
        return torch.cat([q, packed.tensors["residual"].float()], dim=-2)

    def _decode_tokens(self, packed: Packed, index: torch.Tensor) -> torch.Tensor:
        tq = packed.meta["tq"]
        *lead, _, d = packed.shape
        out = torch.empty(*lead, index.numel(), d, device=index.device)
        inq = index < tq
        if bool(inq.any()):
            out[..., inq, :] = self._dequant(packed, index[inq])
        if bool((~inq).any()):
            out[..., ~inq, :] = packed.tensors["residual"].index_select(-2, index[~inq] - tq).float()
        return out
