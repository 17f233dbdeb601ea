"""Mixed-radix packing of block indices when the codebook size N is not a power of two.

Packing each index in ceil(log2 N) bits wastes up to one bit per block: N=7 would cost 3 bits
instead of 2.81, and the sub-1-bit FibQuant rates (k=6, N=7) exist only if that waste goes away.
So a row's n indices are split into ``groups`` groups of ``group`` digits (the last one padded
with zero digits); each group becomes one integer Σ_j i_j·N^j (digit j least significant) below
N^group ≤ 2^62, and the integers are written with :func:`pack_rows` in
``width = bit_length(N^group - 1)`` bits. ``group`` is chosen to minimize groups·width, which is
within a few bits of n·log2 N (e.g. 11 indices below 7: 31 bits for 30.9). Every row has the
same byte length, so token t is at byte t·row_bytes and random access survives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ...core.errors import InputError
from .bitpack import pack_rows, row_bytes, unpack_rows

__all__ = [
    "RadixLayout",
    "index_row_bytes",
    "pack_indices",
    "pack_radix",
    "radix_layout",
    "unpack_indices",
    "unpack_radix",
]

_MAX_BITS = 62  # pack_rows' widest code; int64 arithmetic stays exact below 2^63
_CHUNK = 1 << 14  # rows per call: pack_rows expands odd widths to one int64 per bit


@dataclass(frozen=True)
class RadixLayout:
    """How ``n`` base-``radix`` digits per row are grouped into integers."""

    n: int
    radix: int
    group: int  # digits per integer (the last group may hold fewer, padded with zero digits)
    groups: int  # integers per row
    width: int  # bits per integer

    @property
    def row_bits(self) -> int:
        return self.groups * self.width

    @property
    def row_bytes(self) -> int:
        return row_bytes(self.groups, self.width)


def radix_layout(n: int, radix: int) -> RadixLayout:
    """The layout for rows of ``n`` digits in base ``radix`` (2 ≤ radix ≤ 2^31)."""
    if n < 1:
        raise InputError(f"mixed radix: need at least one digit per row, got {n}")
    if not 2 <= radix <= 1 << 31:
        raise InputError(f"mixed radix: base must be in 2..2^31, got {radix}")
    most = 1
    while radix ** (most + 1) <= 1 << _MAX_BITS:
        most += 1
    # fewest bits over group sizes: a padded last group wastes its empty digits, so e.g. 33
    # digits of base 5 pack best as 11 groups of 3 (77 bits), not 2 of 17 (80) or 26 + 7.
    cost = {m: -(-n // m) * (radix**m - 1).bit_length() for m in range(1, min(most, n) + 1)}
    group = min(cost, key=lambda m: (cost[m], -m))
    return RadixLayout(n, radix, group, -(-n // group), (radix**group - 1).bit_length())


def pack_radix(digits: torch.Tensor, radix: int) -> torch.Tensor:
    """Pack integer digits ``[..., n]`` (each in ``[0, radix)``) into uint8 ``[..., row_bytes]``."""
    lay = radix_layout(digits.shape[-1], radix)
    lead = digits.shape[:-1]
    d = digits.reshape(-1, lay.n).to(torch.int64)
    pad = lay.groups * lay.group - lay.n
    if pad:
        d = torch.nn.functional.pad(d, (0, pad))
    d = d.view(d.shape[0], lay.groups, lay.group)
    value = torch.zeros(d.shape[:2], dtype=torch.int64, device=d.device)
    for j in range(lay.group - 1, -1, -1):  # Horner: digit 0 is least significant
        value = value * radix + d[..., j]
    return pack_rows(value, lay.width).reshape(*lead, lay.row_bytes)


def unpack_radix(packed: torch.Tensor, radix: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_radix`: uint8 ``[..., row_bytes]`` to int64 digits ``[..., n]``."""
    lay = radix_layout(n, radix)
    lead = packed.shape[:-1]
    value = unpack_rows(packed.reshape(-1, packed.shape[-1]), lay.width, lay.groups)
    digits = []
    for _ in range(lay.group):
        digits.append(torch.remainder(value, radix))
        value = torch.div(value, radix, rounding_mode="floor")
    out = torch.stack(digits, dim=-1).reshape(value.shape[0], lay.groups * lay.group)
    return out[:, :n].reshape(*lead, n)


def _pow2_bits(radix: int) -> int:
    """log2(radix) if radix is a power of two, else 0."""
    return radix.bit_length() - 1 if radix & (radix - 1) == 0 else 0


def _group(bits: int) -> int:
    """Indices per byte-aligned group of a ``bits``-wide layout (0: no group fits in 56 bits)."""
    g = 8 // math.gcd(bits, 8)
    return g if g * bits <= 56 else 0


def _pack_grouped(idx: torch.Tensor, bits: int) -> torch.Tensor:
    """pack_rows' exact layout for widths like 3, 6 or 12 bits, without one int64 per bit.

    ``g`` indices fill exactly ``g·bits/8`` bytes, so each group is assembled as one integer and
    cut into bytes; rows are byte-identical to :func:`pack_rows` (tested).
    """
    rows, n = idx.shape
    g = _group(bits)
    gb = g * bits // 8
    v = torch.nn.functional.pad(idx.to(torch.int64), (0, (-n) % g)).view(rows, -1, g)
    word = (v << (torch.arange(g, device=idx.device) * bits)).sum(-1)  # disjoint bits: sum == or
    out = (word.unsqueeze(-1) >> (torch.arange(gb, device=idx.device) * 8)) & 0xFF
    return out.reshape(rows, -1)[:, : row_bytes(n, bits)].to(torch.uint8)


def _unpack_grouped(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    rows = packed.shape[0]
    g = _group(bits)
    gb = g * bits // 8
    groups = -(-n // g)
    p = torch.nn.functional.pad(packed.to(torch.int64), (0, groups * gb - packed.shape[1])).view(
        rows, groups, gb
    )
    word = (p << (torch.arange(gb, device=p.device) * 8)).sum(-1)
    v = (word.unsqueeze(-1) >> (torch.arange(g, device=p.device) * bits)) & ((1 << bits) - 1)
    return v.reshape(rows, -1)[:, :n]


def _pack_pow2(idx: torch.Tensor, bits: int) -> torch.Tensor:
    return pack_rows(idx, bits) if bits in (1, 2, 4, 8) or not _group(bits) else _pack_grouped(idx, bits)


def _unpack_pow2(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    if bits in (1, 2, 4, 8) or not _group(bits):
        return unpack_rows(packed, bits, n)
    if packed.shape[-1] != row_bytes(n, bits):
        raise InputError(f"packed rows hold {packed.shape[-1]} bytes, expected {row_bytes(n, bits)}")
    return _unpack_grouped(packed, bits, n)


def index_row_bytes(n: int, radix: int) -> int:
    """Bytes per row of ``n`` indices below ``radix``, as :func:`pack_indices` writes them."""
    bits = _pow2_bits(radix)
    return row_bytes(n, bits) if bits else radix_layout(n, radix).row_bytes


def pack_indices(idx: torch.Tensor, radix: int) -> torch.Tensor:
    """Rows of indices ``[..., n]`` below ``radix`` to uint8 ``[..., row_bytes]``.

    A power-of-two radix uses plain fixed-width :func:`pack_rows` (log2 radix bits per index),
    anything else the mixed-radix layout. Rows are processed in chunks to bound memory.
    """
    n = idx.shape[-1]
    bits = _pow2_bits(radix)
    flat = idx.reshape(-1, n)
    out = torch.empty(flat.shape[0], index_row_bytes(n, radix), dtype=torch.uint8, device=idx.device)
    for s in range(0, flat.shape[0], _CHUNK):
        part = flat[s : s + _CHUNK]
        out[s : s + _CHUNK] = _pack_pow2(part, bits) if bits else pack_radix(part, radix)
    return out.reshape(*idx.shape[:-1], out.shape[-1])


def unpack_indices(packed: torch.Tensor, radix: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_indices`: int64 ``[..., n]``."""
    bits = _pow2_bits(radix)
    flat = packed.reshape(-1, packed.shape[-1])
    out = torch.empty(flat.shape[0], n, dtype=torch.int64, device=packed.device)
    for s in range(0, flat.shape[0], _CHUNK):
        part = flat[s : s + _CHUNK]
        out[s : s + _CHUNK] = _unpack_pow2(part, bits, n) if bits else unpack_radix(part, radix, n)
    return out.reshape(*packed.shape[:-1], n)
