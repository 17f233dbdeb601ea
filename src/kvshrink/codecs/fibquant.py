"""FibQuant (Lee & Kim, arXiv:2605.11478): vector quantization of rotated k-blocks, any rate.

TurboQuant's interface (fp16 norm, one shared rotation, a fixed table) but k rotated coordinates
are quantized jointly with one shared N-point codebook matched to the exact law of such a block
(codecs.md §1): radii at Beta quantiles, Fibonacci/Kronecker directions, Lloyd-refined on
synthetic samples. Joint coding beats the scalar table at equal rate (d=64, b=2: MSE 0.096 at
k=4 vs 0.115 scalar) and gives fractional and sub-1-bit rates: b = log2(N)/k for any N ≥ 2.

Spec: ``fibquant:b=2,k=4`` (N = 2^(k·b) must be an integer) or ``fibquant:k=6,n=7`` (N given
directly, N not a power of two packs with mixed radix). Options: ``seed``, ``rot=haar|hadamard``,
``lloyd=1|0`` (0: the unrefined radial–angular start, an ablation), ``dirs=fib|random``,
``pad=1`` (zero-pad the rotated vector when k does not divide d), and beyond the paper ``kb``/``vb``
(key/value rates, each with its own codebook), ``center``, ``sinks``, ``window``, ``white``,
``normbits`` (see :mod:`.rotated`, which also documents the packed layout).

Canonical spec: a power-of-two N whose rate has ≤ 6 decimals prints as ``b``, any other N as
``n``, so ``fibquant:k=4,n=256`` and ``fibquant:b=2,k=4`` are the same codec and print the same.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..core.errors import SpecError
from .base import CodecConfig, Role, register_codec
from .primitives.codebooks import DIRECTIONS, MAX_N, codebook
from .rotated import RotatedCodec, check_common

__all__ = ["BLOCK_SIZES", "FibQuantCodec", "FibQuantConfig", "levels_for_rate"]

BLOCK_SIZES = (1, 2, 3, 4, 6, 8)
_TOL = 1e-9  # |log2(N)/k - b| allowed when b names an integer N


def _rate_text(n: int, k: int) -> str:
    b = math.log2(n) / k
    return f"b={b:g} (n={n})" if _short(n, k) else f"n={n} (b≈{b:.6g})"


def _short(n: int, k: int) -> bool:
    """Whether N's rate prints exactly in a few decimals (then ``b`` is its canonical name)."""
    b = math.log2(n) / k
    return n & (n - 1) == 0 and round(b, 6) == b


def levels_for_rate(b: float, k: int, opt: str = "b") -> int:
    """The codebook size N = 2^(k·b), or a one-line SpecError naming the nearest valid rates."""
    if not 0 < b <= 8:
        raise SpecError(f"fibquant: {opt} must be in (0, 8] bits per coordinate, got {b:g}")
    target = 2.0 ** (k * b)
    if target > MAX_N * (1 + 1e-9):
        raise SpecError(
            f"fibquant: {opt}={b:g} with k={k} needs N = 2^(k·b) = {target:.4g} codewords, more than "
            f"{MAX_N}; for k={k} use {opt} <= {16 / k:g}"
        )
    n = round(target)
    if n >= 2 and abs(math.log2(n) / k - b) <= _TOL:
        return n
    lo = math.floor(target)
    cands = [m for m in (lo - 1, lo, lo + 1, lo + 2) if 2 <= m <= MAX_N]
    near = sorted(cands, key=lambda m: abs(math.log2(m) / k - b))[:3]
    pow2 = [1 << j for j in range(1, 17) if _short(1 << j, k)]
    p2 = min(pow2, key=lambda m: abs(math.log2(m) / k - b))
    listed = [_rate_text(m, k) for m in sorted({*near, p2})]
    raise SpecError(
        f"fibquant: {opt}={b:g} with k={k} gives N = 2^(k·b) = {target:.4g}, not an integer; "
        f"nearest valid: {', '.join(listed)}; give n= for N that is not a power of two"
    )


@dataclass(frozen=True)
class FibQuantConfig(CodecConfig):
    name: ClassVar[str] = "fibquant"
    always: ClassVar[tuple[str, ...]] = ("k",)
    b: float | None = None  # bits per coordinate; default 2 unless n is given
    k: int = 4  # block size
    n: int | None = None  # codebook size N (instead of b)
    seed: int = 0
    rot: str = "haar"
    lloyd: bool = True
    dirs: str = "fib"
    pad: bool = False
    kb: float | None = None  # key rate (default: b)
    vb: float | None = None  # value rate (default: b)
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
        if self.k not in BLOCK_SIZES:
            near = sorted(BLOCK_SIZES, key=lambda j: (abs(j - self.k), j))[:2]
            raise SpecError(
                f"fibquant: k must be one of {', '.join(map(str, BLOCK_SIZES))}, got {self.k} "
                f"(nearest: {', '.join(map(str, near))})"
            )
        if self.n is not None and not 2 <= self.n <= MAX_N:
            raise SpecError(f"fibquant: n (codebook size) must be in 2..{MAX_N}, got {self.n}")
        n = self.n
        if self.b is not None:
            nb = levels_for_rate(self.b, self.k)
            if n is not None and nb != n:
                raise SpecError(
                    f"fibquant: b={self.b:g} and n={n} disagree at k={self.k} (b gives n={nb}); give one"
                )
            n = nb
        if n is None:
            n = levels_for_rate(2.0, self.k)
        if self.dirs not in DIRECTIONS:
            raise SpecError(f"fibquant: dirs must be one of {', '.join(DIRECTIONS)}, got {self.dirs!r}")
        check_common(self)
        for opt in ("kb", "vb"):
            v = getattr(self, opt)
            if v is not None:  # canonical: same N as the main rate → no override
                m = levels_for_rate(v, self.k, opt)
                object.__setattr__(self, opt, None if m == n else math.log2(m) / self.k)
        short = _short(n, self.k)
        object.__setattr__(self, "b", math.log2(n) / self.k if short else None)
        object.__setattr__(self, "n", None if short else n)

    @property
    def levels(self) -> int:
        """N for the main rate."""
        return self.n if self.n is not None else round(2.0 ** (self.k * (self.b or 0.0)))

    def levels_of(self, role: Role) -> int:
        v = self.kb if role == "key" else self.vb
        return self.levels if v is None else round(2.0 ** (self.k * v))


@register_codec(FibQuantConfig)
class FibQuantCodec(RotatedCodec):
    """FibQuant; layout in :mod:`.rotated`."""

    config: FibQuantConfig

    @property
    def k(self) -> int:
        return self.config.k

    def levels(self, role: Role) -> int:
        return self.config.levels_of(role)

    def pads(self) -> bool:
        return self.config.pad

    def _build_codebook(self, d: int, role: Role) -> torch.Tensor:
        c = self.config
        return codebook(d, c.k, self.levels(role), c.seed, c.dirs, c.lloyd).clone()
