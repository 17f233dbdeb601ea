"""Runs of cache slots: packed blocks and the full-precision window share one bookkeeping.

Every layer holds the same number of slots for every batch row and KV head, so all tensors stay
rectangular; per-head eviction and left padding leave *empty* slots (position ``-1``) instead
of ragged rows. Each slot records the sequence position (column of the 2-D attention mask) of
its token, which is what attention masks are computed from, never the global mask's shape.

A packed segment keeps one :class:`~kvshrink.codecs.Packed` per batch row (``[Hkv, T, D]``):
no codec ever groups tokens of two sequences (no cross-request contamination), and beam
reordering is a permutation of the row list, never a lossy re-encode.
"""

from __future__ import annotations

import copy
import itertools
import sys
from dataclasses import dataclass, fields, replace
from typing import Any

import torch

from ..codecs import Codec, Packed

__all__ = [
    "Segment",
    "bounds",
    "cat_dense",
    "column_bytes",
    "columns",
    "decode_packed_group",
    "encode_segment",
    "held_pos",
    "shares_columns",
]

_NONE = sys.maxsize  # lower bound of a segment without live slots: "in the future", never attended


def bounds(pos: torch.Tensor) -> tuple[int, int, bool]:
    """``(lo, hi, full)``: min and max live column and whether no slot is empty."""
    live = pos >= 0
    if not bool(live.any()):
        return _NONE, -1, False
    hi = int(pos.max())
    lo = int(pos.masked_fill(~live, torch.iinfo(pos.dtype).max).min())
    return lo, hi, bool(live.all())


# One int32 arange per device that every contiguous packed segment views for its positions.
# Without it each layer holds 4 bytes per token of positions that are just c0..c0+T-1: at 8x
# that was 3.8% of a SmolLM2 cache's bytes (88 bytes of codes per token and layer). Buffers only grow
# (doubling); older ones stay listed so their views are still recognised as shared.
_COLUMNS: dict[torch.device, list[torch.Tensor]] = {}


def columns(c0: int, t: int, device: torch.device) -> torch.Tensor:
    """``[1, 1, t]`` int32 view of columns ``c0 .. c0+t-1`` into the device's shared arange.

    Views must never be written (every writer of ``pos`` builds a new tensor)."""
    bufs = _COLUMNS.setdefault(torch.device(device), [])
    if not bufs or bufs[-1].numel() < c0 + t:
        n = max(c0 + t, 2 * bufs[-1].numel() if bufs else 4096)
        bufs.append(torch.arange(n, dtype=torch.int32, device=device))
    return bufs[-1][c0 : c0 + t].view(1, 1, t)


def shares_columns(pos: torch.Tensor) -> bool:
    """Whether ``pos`` is a view of a shared column buffer (its bytes counted once per cache)."""
    ptr = pos.untyped_storage().data_ptr()
    return any(ptr == b.untyped_storage().data_ptr() for b in _COLUMNS.get(pos.device, ()))


def column_bytes(n: int) -> int:
    """Bytes a cache whose rows have seen ``n`` columns accounts for the shared buffer."""
    return 4 * n


def held_pos(seg: Segment) -> torch.Tensor:
    """The positions a segment keeps once packed: a shared view when they are ``c0 + i`` for
    every slot (no eviction, no padding), else an own compact copy."""
    if seg.c0 is not None and seg.full and seg.pos.shape[:2] == (1, 1):
        return columns(seg.c0, seg.size, seg.pos.device)
    return seg.pos.contiguous().clone()


@dataclass
class Segment:
    """A run of ``T`` slots, packed (``keys``/``values``) or dense (``k``/``v``).

    ``pos``: ``[B|1, Hkv|1, T]`` int32 columns, ``-1`` = empty. ``acc``: ``[K, B, Hkv, T]``
    float32 per-slot policy state (H2O's accumulated attention, A2SF's decayed sum, ...; policies
    with state only), kept here so it moves, is copied and is evicted with its slot. ``lo``/``hi``: bounds of the live
    columns, used to skip or leave unmasked whole chunks. ``full``: no empty slot. ``c0``: when
    slot ``i`` holds column ``c0 + i`` (no eviction happened), else None. ``codec``: set when
    the segment is packed with another codec than its layer's (low-precision runs).
    """

    pos: torch.Tensor
    lo: int
    hi: int
    full: bool
    c0: int | None = None
    acc: torch.Tensor | None = None
    keys: list[Packed] | None = None
    values: list[Packed] | None = None
    k: torch.Tensor | None = None  # [B, Hkv, T, D] model dtype
    v: torch.Tensor | None = None
    codec: Codec | None = None

    @property
    def size(self) -> int:
        return self.pos.shape[-1]

    @property
    def packed(self) -> bool:
        return self.keys is not None

    def dense(self, codec: Codec) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values as float32 ``[B, Hkv, T, D]`` (a packed segment is decoded)."""
        if self.k is not None and self.v is not None:
            return self.k.float(), self.v.float()
        assert self.keys is not None and self.values is not None
        codec = self.codec if self.codec is not None else codec
        return _decode_rows(codec, self.keys), _decode_rows(codec, self.values)

    def full_pos(self, b: int, h: int) -> torch.Tensor:
        """``[B, Hkv, T]`` positions (expanded view)."""
        return self.pos.expand(b, h, self.size)

    def slice(self, a: int, z: int) -> Segment:
        """Slots ``[a, z)`` of a dense segment, as views."""
        assert not self.packed
        pos = self.pos[..., a:z]
        if self.c0 is not None:
            lo, hi, full = max(self.lo, self.c0 + a), min(self.hi, self.c0 + z - 1), self.full
            if not full:
                lo, hi, full = bounds(pos)
        else:
            lo, hi, full = bounds(pos)
        return replace(
            self,
            pos=pos,
            lo=lo,
            hi=hi,
            full=full,
            c0=None if self.c0 is None else self.c0 + a,
            acc=None if self.acc is None else self.acc[..., a:z],
            k=self.k[:, :, a:z] if self.k is not None else None,
            v=self.v[:, :, a:z] if self.v is not None else None,
        )

    def owned(self) -> Segment:
        """A dense segment with its own copies of its tensors: a slice of the window must not
        keep the whole old window alive once the window moves on."""
        assert not self.packed
        return replace(
            self,
            pos=self.pos.clone(),
            acc=None if self.acc is None else self.acc.clone(),
            k=self.k.clone() if self.k is not None else None,
            v=self.v.clone() if self.v is not None else None,
        )

    def tombstone(self, keep: torch.Tensor) -> bool:
        """Empty the slots where ``keep`` ``[B, Hkv, T]`` is False; True if any changed."""
        b, h, _t = keep.shape
        pos = self.full_pos(b, h)
        drop = (pos >= 0) & ~keep
        if not bool(drop.any()):
            return False
        self.pos = pos.masked_fill(drop, -1).contiguous()
        self.lo, self.hi, self.full = bounds(self.pos)
        return True

    def nbytes(self, seen: set[int]) -> tuple[int, int, int]:
        """``(packed, dense, bookkeeping)`` bytes; ``seen`` dedupes rows shared by beams."""
        packed = 0
        for p in (self.keys or []) + (self.values or []):
            if id(p) not in seen:
                seen.add(id(p))
                packed += p.nbytes()
        dense = sum(t.numel() * t.element_size() for t in (self.k, self.v) if t is not None)
        held = [self.acc] if shares_columns(self.pos) else [self.pos, self.acc]
        meta = sum(t.numel() * t.element_size() for t in held if t is not None)
        return packed, dense, meta

    def __deepcopy__(self, memo: dict[int, Any]) -> Segment:
        # a shared column view stays shared (deepcopy would copy the whole buffer per cache)
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for f in fields(self):
            v = getattr(self, f.name)
            keep = f.name == "pos" and shares_columns(v)
            setattr(new, f.name, v if keep else copy.deepcopy(v, memo))
        return new

    def index_rows(self, idx: torch.Tensor) -> None:
        """Keep batch rows ``idx`` (beam reorder, selection, repetition)."""
        rows = idx.tolist()
        if self.keys is not None and self.values is not None:
            self.keys = [self.keys[i] for i in rows]
            self.values = [self.values[i] for i in rows]
        if self.pos.shape[0] != 1:
            self.pos = self.pos.index_select(0, idx.to(self.pos.device))
        if self.acc is not None:
            self.acc = self.acc.index_select(1, idx.to(self.acc.device))
        if self.k is not None and self.v is not None:
            self.k = self.k.index_select(0, idx.to(self.k.device))
            self.v = self.v.index_select(0, idx.to(self.v.device))


def _decode_rows(codec: Codec, rows: list[Packed]) -> torch.Tensor:
    if len(rows) == 1:
        return codec.decode(rows[0], torch.float32).unsqueeze(0)
    done: dict[int, torch.Tensor] = {}
    out = []
    for p in rows:  # beams share rows: decode each Packed once
        if id(p) not in done:
            done[id(p)] = codec.decode(p, torch.float32)
        out.append(done[id(p)])
    return torch.stack(out)


def decode_packed_group(
    codec: Codec, group: list[Segment], rotated: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of consecutive packed segments, float32 ``[B, Hkv, T, D]``.

    Each batch row's Packeds are joined along the tokens first where the codec allows it, so
    one decode call serves the whole group: at 8k tokens a layer holds 64 blocks, and
    per-block Python overhead cost more than the arithmetic. ``rotated``: decode in the
    rotation codec's basis (``decode_rotated``, no per-token Πᵀ), for :class:`OnlineSoftmax`'s
    rotated accumulator.
    """
    rows = len(group[0].keys or [])
    out = []
    for role in ("keys", "values"):
        per_row: list[torch.Tensor] = []
        done: dict[tuple[int, ...], torch.Tensor] = {}
        for r in range(rows):
            packs = [getattr(s, role)[r] for s in group]
            key = tuple(id(p) for p in packs)
            if key not in done:  # beams share rows: decode each once
                joined = codec.concat_tokens(packs)
                parts = [joined] if joined is not None else packs
                dec = [
                    codec.decode_rotated(p) if rotated else codec.decode(p, torch.float32)  # type: ignore[attr-defined]
                    for p in parts
                ]
                done[key] = dec[0] if len(dec) == 1 else torch.cat(dec, dim=-2)
            per_row.append(done[key])
        out.append(torch.stack(per_row) if len(per_row) > 1 else per_row[0].unsqueeze(0))
    return out[0], out[1]


def encode_segment(codec: Codec, seg: Segment) -> Segment:
    """Pack a dense segment row by row (quantize on write); bookkeeping is kept as is."""
    assert seg.k is not None and seg.v is not None
    keys = [codec.encode(x, "key") for x in seg.k.unbind(0)]
    values = [codec.encode(x, "value") for x in seg.v.unbind(0)]
    pos = held_pos(seg)
    acc = None if seg.acc is None else seg.acc.contiguous().clone()
    return replace(seg, pos=pos, acc=acc, keys=keys, values=values, k=None, v=None)


def cat_dense(parts: list[Segment]) -> Segment:
    """Concatenate dense segments along the slots (the new tokens onto the window)."""
    parts = [p for p in parts if p.size]
    if len(parts) == 1:
        return parts[0]
    b = max(p.pos.shape[0] for p in parts)
    h = max(p.pos.shape[1] for p in parts)
    pos = torch.cat([p.pos.expand(b, h, p.size) for p in parts], dim=-1)
    c0 = parts[0].c0
    for prev, nxt in itertools.pairwise(parts):
        if c0 is None or prev.c0 is None or nxt.c0 != prev.c0 + prev.size:
            c0 = None
    accs = [p.acc for p in parts]
    acc = torch.cat(accs, dim=-1) if all(a is not None for a in accs) else None  # type: ignore[arg-type]
    live = [p for p in parts if p.hi >= 0]
    return Segment(
        pos=pos,
        lo=min((p.lo for p in live), default=_NONE),
        hi=max((p.hi for p in live), default=-1),
        full=all(p.full for p in parts),
        c0=c0,
        acc=acc,
        k=torch.cat([p.k for p in parts], dim=2),  # type: ignore[misc]
        v=torch.cat([p.v for p in parts], dim=2),  # type: ignore[misc]
    )
