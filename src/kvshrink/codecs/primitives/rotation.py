"""Seeded random rotations: exact Haar orthogonal matrices and randomized Hadamard transforms.

Rotation codecs (TurboQuant, FibQuant) rely on one fact: after a Haar-random rotation Π, the
normalized vector Πx/‖x‖ is uniform on the sphere whatever x was, so a fixed codebook matched to
that law fits every input. Π must be the same on every machine for a given spec, otherwise a
cache written on one machine decodes to garbage on another: it is built in float64 on the CPU
from :func:`kvshrink.core.seed.generator` and only then cast to float32 and moved.

Two kinds:

- ``haar``: Q of the QR of a float64 Gaussian matrix, columns multiplied by sign(diag R). Without
  that sign fix, Q is not Haar-distributed (LAPACK's sign convention biases it).
- ``hadamard``: Π = H·D/√d, D random ±1, H the Sylvester Hadamard matrix; applied in
  O(d log d) by a fast Walsh–Hadamard transform. Cheaper, but only approximately Haar, so the
  block law the codebooks assume holds only approximately. Power-of-two d only.

A :class:`Rotation` also lets decoding stay in the rotated basis: ⟨q, Πᵀŷ⟩ = ⟨Πq, ŷ⟩, so an
attention kernel rotates the query once instead of un-rotating every cached key.
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import torch

from ...core.errors import InputError
from ...core.seed import generator

__all__ = ["ROTATIONS", "Rotation", "RotationKind", "fwht", "make_rotation"]

RotationKind = Literal["haar", "hadamard"]
ROTATIONS: tuple[str, ...] = ("haar", "hadamard")


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalized fast Walsh–Hadamard transform along the last dim (a power of two): H·x."""
    d = x.shape[-1]
    lead = x.shape[:-1]
    h = 1
    y = x.reshape(-1, d)
    while h < d:
        y = y.view(-1, d // (2 * h), 2, h)
        a, b = y[:, :, 0, :], y[:, :, 1, :]
        y = torch.stack((a + b, a - b), dim=2)
        h *= 2
    return y.reshape(*lead, d)


def _is_pow2(d: int) -> bool:
    return d >= 1 and d & (d - 1) == 0


class Rotation:
    """A fixed orthogonal Π of size ``d``: ``apply(x) = Πx`` and ``apply_t(y) = Πᵀy`` on the last dim.

    ``matrix`` is Π as float32 ``[d, d]`` (rows = output coordinates). Computation is float32 on
    the input's device; the float64 matrix is kept so that derived state stays reproducible.
    """

    def __init__(
        self, kind: RotationKind, d: int, seed: int, matrix64: torch.Tensor, signs: torch.Tensor | None
    ):
        self.kind = kind
        self.d = d
        self.seed = seed
        self.matrix64 = matrix64
        self._signs = signs
        self._dev: dict[torch.device, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._dev64: dict[str, torch.Tensor] = {}

    def __repr__(self) -> str:
        return f"Rotation({self.kind!r}, d={self.d}, seed={self.seed})"

    @property
    def matrix(self) -> torch.Tensor:
        """Π as float32 ``[d, d]`` on the CPU."""
        return self._on(torch.device("cpu"))[0]

    @property
    def nbytes(self) -> int:
        """Bytes a decoder must hold: the fp32 matrix (haar) or the fp32 signs (hadamard)."""
        return 4 * self.d * self.d if self._signs is None else 4 * self.d

    def _on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        if device not in self._dev:
            m = self.matrix64.to(torch.float32).to(device)
            s = None if self._signs is None else self._signs.to(torch.float32).to(device)
            self._dev[device] = (m, s)
        return self._dev[device]

    def _m64(self, device: torch.device) -> torch.Tensor:
        if device.type == "cpu":
            return self.matrix64
        if str(device) not in self._dev64:
            self._dev64[str(device)] = self.matrix64.to(device)
        return self._dev64[str(device)]

    def _check(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.d:
            raise InputError(f"rotation of size {self.d} applied to vectors of size {x.shape[-1]}")

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """y = Πx along the last dim (float32)."""
        self._check(x)
        m, s = self._on(x.device)
        x = x.to(torch.float32)
        if s is None:
            return x @ m.T
        return fwht(x * s) * (1.0 / math.sqrt(self.d))

    def apply_t(self, y: torch.Tensor, exact: bool = False) -> torch.Tensor:
        """x = Πᵀy along the last dim (float32).

        ``exact=True`` accumulates a Haar product in float64 before rounding, so that a row's
        result does not depend on how many rows are multiplied with it (BLAS picks different
        kernels, with different summation orders, for different shapes): decoding a few tokens
        then gives bit-for-bit the rows of decoding all of them. The Hadamard path is always so.
        """
        self._check(y)
        m, s = self._on(y.device)
        if s is None and exact:
            return (y.to(torch.float64) @ self._m64(y.device)).to(torch.float32)
        y = y.to(torch.float32)
        if s is None:
            return y @ m
        return fwht(y) * (s * (1.0 / math.sqrt(self.d)))


@functools.lru_cache(maxsize=64)
def make_rotation(kind: str, d: int, seed: int = 0) -> Rotation:
    """The rotation of ``kind`` (``haar`` or ``hadamard``) for dimension ``d`` and ``seed`` (cached)."""
    if d < 1:
        raise InputError(f"rotation size must be >= 1, got {d}")
    if kind == "haar":
        g = torch.randn(d, d, generator=generator("rotation", "haar", d, seed), dtype=torch.float64)
        q, r = torch.linalg.qr(g)
        sign = torch.where(torch.diagonal(r) < 0, -1.0, 1.0).to(torch.float64)
        return Rotation("haar", d, seed, (q * sign).contiguous(), None)
    if kind == "hadamard":
        if not _is_pow2(d):
            lo = 1 << (d.bit_length() - 1)
            raise InputError(
                f"rot=hadamard needs a power-of-two head dim, got {d} (nearest: {lo}, {2 * lo}); use rot=haar"
            )
        bits = torch.randint(0, 2, (d,), generator=generator("rotation", "hadamard", d, seed))
        signs = (1 - 2 * bits).to(torch.float64)
        h = fwht(torch.eye(d, dtype=torch.float64))  # symmetric: row i of H
        return Rotation("hadamard", d, seed, (h * signs / math.sqrt(d)).contiguous(), signs)
    raise InputError(f"unknown rotation {kind!r}; valid: {', '.join(ROTATIONS)}")
