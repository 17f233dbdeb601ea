"""Low-precision runs: where the tokens a precision policy demotes go.

A layer's main storage (packed blocks with the main codec, then the full-precision window) is
left as it is; a demoted token is *moved*: its slot there is emptied (compaction gives the
room back, as after an eviction) and the token joins a new run packed with the low codec.
Each segment holds one codec, so a layer simply holds segments of two codecs, and attention,
beam reordering and byte counting treat both alike.

Where the low codec encodes from: whatever the layer holds for the token. A token still in
the full-precision window (every token of a prompt: the decision comes before the prompt is
packed) is encoded from its exact values, once. A token already packed (a decode-time
demotion) is encoded from the main codec's decoded values, so it carries both errors. Holding
full-precision copies until the last possible demotion would avoid that but cost far more than
the demotion saves; decode-time demotions are the old, least-attended tokens, where the extra
error matters least.

Runs are rectangular like every segment: per row and KV head the demoted tokens are gathered
in order; heads with fewer are padded with empty slots (position -1) filled with a copy of a
demoted token, so no codec sees a zero vector it cannot normalise. Low runs carry no
accumulated attention: a demotion is final, so their scores would never be read again.
"""

from __future__ import annotations

import torch

from ..codecs import Codec
from .segment import Segment, bounds, encode_segment

__all__ = ["demote", "low_slots"]


def demote(
    segments: list[Segment], low: torch.Tensor, main: Codec, codec: Codec, size: int, b: int, h: int
) -> list[Segment]:
    """Move the live slots marked in ``low`` ``[B, Hkv, N]`` into runs packed with ``codec``.

    ``segments``: the layer's main segments, in the order ``low`` covers them (low runs
    excluded); marked slots are emptied there. Source values come from ``seg.dense(main)``,
    one touched segment at a time. Returns the new runs, ``size`` slots each at most: the
    cache's read chunk, since attention decodes a packed run whole (one encode per run, not
    per block: a prompt's demotions are one run).
    """
    if not segments:
        return []
    marks, start = [], 0
    for seg in segments:
        marks.append(low[..., start : start + seg.size] & (seg.full_pos(b, h) >= 0))
        start += seg.size
    count = torch.stack([m.sum(-1) for m in marks]).sum(0)  # [B, Hkv]
    total = int(count.max())
    if total == 0:
        return []
    dev = low.device
    pos = torch.full((b, h, total), -1, dtype=torch.int32, device=dev)
    k_out = v_out = None
    done = torch.zeros(b, h, dtype=torch.long, device=dev)  # tokens gathered per row-head
    for seg, mark in zip(segments, marks):
        if not bool(mark.any()):
            continue
        k, v = seg.dense(main)  # [B, Hkv, T, D] float32
        if k_out is None or v_out is None:
            k_out = k.new_zeros(b, h, total, k.shape[-1])
            v_out = v.new_zeros(b, h, total, v.shape[-1])
        bi, hi, ti = mark.nonzero(as_tuple=True)
        slot = done[bi, hi] + (mark.long().cumsum(-1) - 1)[bi, hi, ti]
        k_out[bi, hi, slot] = k.expand(b, h, -1, -1)[bi, hi, ti]
        v_out[bi, hi, slot] = v.expand(b, h, -1, -1)[bi, hi, ti]
        pos[bi, hi, slot] = seg.full_pos(b, h)[bi, hi, ti].to(torch.int32)
        done += mark.sum(-1)
        seg.tombstone(~mark)
    assert k_out is not None and v_out is not None
    filler = (pos < 0)[..., None]  # padding slots copy the head's first demoted token
    k_out = torch.where(filler, k_out[:, :, :1], k_out)
    v_out = torch.where(filler, v_out[:, :, :1], v_out)
    none = (count == 0)[..., None, None]  # a head with nothing demoted copies another head's
    if bool(none.any()):
        donor = int(count.flatten().argmax())
        k_out = torch.where(none, k_out.flatten(0, 1)[donor, 0], k_out)
        v_out = torch.where(none, v_out.flatten(0, 1)[donor, 0], v_out)
    runs = []
    for a in range(0, total, size):
        z = min(total, a + size)
        p = pos[..., a:z].contiguous()
        lo, hi, full = bounds(p)
        dense = Segment(pos=p, lo=lo, hi=hi, full=full, k=k_out[:, :, a:z], v=v_out[:, :, a:z])
        run = encode_segment(codec, dense)
        run.codec = codec
        runs.append(run)
    return runs


def low_slots(runs: list[Segment], n: int, b: int, h: int) -> torch.Tensor | None:
    """``[B, Hkv, n]`` bool over a layer's slots (low runs first): the live low-precision ones."""
    if not runs:
        return None
    low = torch.cat([s.full_pos(b, h) >= 0 for s in runs], dim=-1)
    return torch.cat([low, low.new_zeros(b, h, n - low.shape[-1])], dim=-1)
