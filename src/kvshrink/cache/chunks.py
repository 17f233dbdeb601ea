"""Reading a layer's slots in chunks: the PyTorch path's unit of work.

Attention never rebuilds a layer in full precision: it walks the slots (packed blocks, low
precision runs, the dense window, the new tokens) about ``chunk`` at a time, each chunk all
packed or all dense and of one codec, so one decode call covers many small blocks and a chunk's
mask is built once. Kept apart from :mod:`.layer` because the walk is the same for attention,
for a policy's observation pass and for counting visible slots.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..codecs import Codec
from .attention import allowed_mask
from .lut import lut_group
from .segment import Segment, decode_packed_group

__all__ = ["chunk_mask", "chunk_meta", "read_chunks"]

Chunk = tuple[torch.Tensor, torch.Tensor, Segment, bool]


def read_chunks(
    codec: Codec, sources: list[Segment], limit: int, rotated: bool = False, lut: bool = False
) -> Iterator[Chunk]:
    """Yield ``(k, v, seg, rotated)``: float32 keys/values of consecutive slots, about ``limit``
    at a time; a chunk is all packed or all dense, and packed chunks come in the codec's rotated
    basis when ``rotated``; with ``lut`` (few query rows) packed chunks come as codes for table
    lookup (:mod:`.lut`) where the codec allows."""
    pieces: list[Segment] = []
    for seg in sources:
        if seg.packed or seg.size <= limit:
            pieces.append(seg)
        else:
            pieces.extend(seg.slice(a, min(a + limit, seg.size)) for a in range(0, seg.size, limit))
    group: list[Segment] = []
    size = 0
    for seg in [*pieces, None]:
        if group and (
            seg is None
            or size + seg.size > limit
            or seg.packed != group[0].packed
            or seg.codec is not group[0].codec  # low-precision runs: another codec
        ):
            main = group[0].packed and group[0].codec is None  # low runs decode plainly
            codes = lut_group(codec, group) if lut and main else None
            if codes is not None:
                yield codes[0], codes[1], chunk_meta(group), True
            else:
                yield _merge(codec, group, rotated and main)
            group, size = [], 0
        if seg is not None:
            group.append(seg)
            size += seg.size


def _merge(codec: Codec, group: list[Segment], rotated: bool) -> Chunk:
    if group[0].packed:
        k, v = decode_packed_group(group[0].codec or codec, group, rotated)
    else:
        dense = [s.dense(codec) for s in group]
        k = dense[0][0] if len(dense) == 1 else torch.cat([d[0] for d in dense], dim=2)
        v = dense[0][1] if len(dense) == 1 else torch.cat([d[1] for d in dense], dim=2)
    return k, v, chunk_meta(group), rotated


def chunk_meta(group: list[Segment]) -> Segment:
    """Bookkeeping of consecutive segments read as one chunk."""
    if len(group) == 1:
        return group[0]
    b = max(s.pos.shape[0] for s in group)
    h = max(s.pos.shape[1] for s in group)
    pos = torch.cat([s.pos.expand(b, h, s.size) for s in group], dim=-1)
    live = [s for s in group if s.hi >= 0]
    return Segment(
        pos=pos,
        lo=min((s.lo for s in live), default=group[0].lo),
        hi=max((s.hi for s in live), default=-1),
        full=all(s.full for s in group),
    )


def chunk_mask(
    seg: Segment, qcols: torch.Tensor, pad2d: torch.Tensor | None, sliding_window: int | None
) -> tuple[torch.Tensor | None, bool]:
    """``(allowed, skip)`` for chunk ``seg`` and query columns ``qcols``: skip when no query may
    see any slot of it, ``allowed`` None when every query sees every slot (no mask to build)."""
    qa, qb = int(qcols[0]), int(qcols[-1])
    w = sliding_window
    if seg.lo > qb or seg.hi < 0 or (w is not None and seg.hi <= qa - w):
        return None, True
    if pad2d is None and seg.full and seg.hi <= qa and (w is None or seg.lo > qb - w):
        return None, False
    return allowed_mask(seg.pos, qcols, w, pad2d), False
