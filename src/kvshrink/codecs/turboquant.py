"""TurboQuant (Zandieh et al., ICLR 2026): rotate, then one Lloyd–Max scalar table per bit width.

After a Haar rotation every coordinate of a unit vector follows the same Beta-shaped law
(density ∝ (1-t²)^((d-3)/2)), so one exact Lloyd–Max table of 2^b levels per (d, b) serves every
layer, head, key and value: no calibration, fixed rate, random access per token. Measured
E‖u-û‖² at d=64: 0.358 / 0.115 / 0.0334 / 0.0091 for b=1..4 (paper: ≤ 0.36 / 0.117 / 0.03 / 0.009).

``qjl=1`` is TurboQuant-prod: the MSE table at b-1 bits plus a 1-bit QJL sketch sign(S·r) of the
residual r = y - ŷ (S a seeded Gaussian d×d, ‖r‖ in fp16), decoded as
ŷ + √(π/2)/d·‖r‖·Sᵀsign(S·r). Inner products become unbiased (an MSE quantizer shrinks them by
1-D), at the price of more variance; ports report it hurts keys end to end, so it is opt-in.

Spec: ``turboquant:b=2`` with options ``seed``, ``rot=haar|hadamard``, ``qjl``, ``kb``/``vb``
(key/value bits overriding b), ``center``, ``sinks``, ``window``, ``white``, ``normbits`` (see :mod:`.rotated`).
Extra tensors with ``qjl=1``: ``qjl`` uint8 ``[..., Tc, ceil(d/8)]`` (sign bits, pack_rows at
1 bit, bit set = +1) and ``rnorm`` fp16 ``[..., Tc]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..core.errors import SpecError
from ..core.seed import generator
from .base import CodecConfig, Role, register_codec
from .primitives.codebooks import scalar_levels
from .primitives.mixed_radix import pack_indices, unpack_indices
from .rotated import RotatedCodec, check_common

__all__ = ["TurboQuantCodec", "TurboQuantConfig"]

_BITS = (1, 2, 3, 4)


@dataclass(frozen=True)
class TurboQuantConfig(CodecConfig):
    name: ClassVar[str] = "turboquant"
    always: ClassVar[tuple[str, ...]] = ("b",)
    b: int = 2  # bits per coordinate (qjl=1: b-1 for the table + 1 for the sketch)
    seed: int = 0
    rot: str = "haar"
    qjl: bool = False
    kb: int | None = None  # key bits (default b)
    vb: int | None = None  # value bits (default b)
    center: bool = False
    sinks: int = 0
    window: int = 0
    # keys coded before RoPE (KVQuant): the codec maths is unchanged; whoever holds the cache
    # encodes pre-RoPE keys and re-applies RoPE after decoding (eval.methods, cache)
    prerope: bool = False
    white: int = 0  # rank of the query-aware key transform (0: off; see primitives.whiten)
    wshrink: float = 0.1
    pca: int = 0  # key directions whose coefficients are coded apart (0: off; see primitives.principal)
    pcabits: int = 8  # bits per such coefficient (4 or 8)
    normbits: int = 16  # stored vector norm: 16 (fp16) or 8 (log2 code, 1/8 octave; see rotated)

    def __post_init__(self) -> None:
        for opt in ("b", "kb", "vb"):
            v = getattr(self, opt)
            if v is None:
                continue
            if v not in _BITS:
                raise SpecError(f"turboquant: {opt} must be one of 1, 2, 3, 4, got {v}")
            if self.qjl and v < 2:
                raise SpecError(
                    f"turboquant: qjl=1 spends one bit on the sketch, so {opt} must be 2, 3 or 4, got {v}"
                )
        check_common(self)
        for opt in ("kb", "vb"):  # canonical: an override equal to b is no override
            if getattr(self, opt) == self.b:
                object.__setattr__(self, opt, None)

    def bits(self, role: Role) -> int:
        v = self.kb if role == "key" else self.vb
        return self.b if v is None else v


@register_codec(TurboQuantConfig)
class TurboQuantCodec(RotatedCodec):
    """TurboQuant-mse (``qjl=0``) or TurboQuant-prod (``qjl=1``); layout in :mod:`.rotated`."""

    config: TurboQuantConfig

    @property
    def k(self) -> int:
        return 1

    @property
    def extra_bits(self) -> int:
        return int(self.config.qjl)

    def levels(self, role: Role) -> int:
        return 1 << (self.config.bits(role) - int(self.config.qjl))

    def _build_codebook(self, d: int, role: Role) -> torch.Tensor:
        return torch.from_numpy(scalar_levels(d, self.levels(role))).to(torch.float32)[:, None]

    # -- QJL residual sketch ---------------------------------------------------------------------
    def sketch(
        self, d: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """The seeded Gaussian S ``[d, d]`` of the QJL sketch (built in float64, then cast)."""

        def make() -> torch.Tensor:
            g = generator("qjl", d, self.config.seed)
            return torch.randn(d, d, generator=g, dtype=torch.float64).to(dtype)

        return self._on(("qjl", d, str(dtype)), torch.device(device), make)

    def _extra_shared_nbytes(self, d: int) -> int:
        return 4 * d * d if self.config.qjl else 0

    def _extra_encode(self, y: torch.Tensor, yhat: torch.Tensor, role: Role) -> dict[str, torch.Tensor]:
        if not self.config.qjl:
            return {}
        r = y - yhat
        signs = (r @ self.sketch(y.shape[-1], y.device).T) >= 0
        return {"qjl": pack_indices(signs.to(torch.int64), 2), "rnorm": r.norm(dim=-1).to(torch.float16)}

    def _extra_decode(self, tz: dict[str, torch.Tensor], yhat: torch.Tensor, role: Role) -> torch.Tensor:
        if not self.config.qjl:
            return yhat
        d = yhat.shape[-1]
        sign = unpack_indices(tz["qjl"], 2, d).to(torch.float32) * 2 - 1
        scale = math.sqrt(math.pi / 2) / d * tz["rnorm"].to(torch.float32).unsqueeze(-1)
        # float64 so that a row's correction does not depend on how many rows are decoded
        # with it (BLAS kernels differ by shape): decode_tokens stays bitwise equal to decode
        corr = (sign.to(torch.float64) @ self.sketch(d, yhat.device, torch.float64)).to(torch.float32)
        return yhat + scale * corr
