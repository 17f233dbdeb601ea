"""Compaction: give back the empty slots that per-head eviction leaves behind.

Eviction only empties slots (position ``-1``) so that tensors stay rectangular. Once enough
slots are empty in *every* row-head, compaction moves each row-head's live slots to the front,
in order, and rewrites the segments: ``L = max live count`` slots remain, rows with fewer live
tokens keep empty filler. It streams output block by output block, decoding source segments
on demand (a small LRU), so it never holds the layer in full precision at once.

Re-encoding decoded values is exact for ``fp16`` and idempotent for per-token absmax integers
(``int4``/``int8``); codecs that group along tokens (KIVI keys) regroup and add a little error.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from ..codecs import Codec
from .segment import Segment, bounds, encode_segment

__all__ = ["compact", "reclaimable"]

_LRU = 3


def reclaimable(segments: list[Segment], b: int, h: int) -> int:
    """How many slots compaction would free (empty in every row-head)."""
    n = sum(s.size for s in segments)
    if n == 0:
        return 0
    live = sum((s.full_pos(b, h) >= 0).sum(-1) for s in segments)
    return n - int(live.max())  # type: ignore[union-attr]


def compact(
    segments: list[Segment], codec: Codec, block: int, window: int, b: int, h: int, dtype: torch.dtype
) -> tuple[list[Segment], Segment]:
    """Rewrite ``segments`` (packed blocks then the dense window) without shared empty slots.

    Returns the new packed blocks (``block`` slots each) and the new dense window (the last
    ``window`` to ``window + block - 1`` slots). Leading full packed blocks are kept untouched.
    """
    keep = 0
    while (
        keep < len(segments)
        and segments[keep].packed
        and segments[keep].full
        and segments[keep].size == block
    ):
        keep += 1
    head, rest = segments[:keep], segments[keep:]
    sizes = [s.size for s in rest]
    starts = [0]
    for s in sizes[:-1]:
        starts.append(starts[-1] + s)
    pos = torch.cat([s.full_pos(b, h) for s in rest], dim=-1)  # [B, Hkv, N]
    live = pos >= 0
    n_live = live.sum(-1)
    total = int(n_live.max())
    order = torch.sort((~live).to(torch.int8), dim=-1, stable=True).indices[..., :total]  # live first
    new_pos = pos.gather(-1, order).masked_fill(
        torch.arange(total, device=pos.device) >= n_live[..., None], -1
    )
    accs = [s.acc for s in rest]
    new_acc = None
    if all(a is not None for a in accs):  # per-slot policy state [K, B, Hkv, N] follows its slot
        acc = torch.cat(accs, -1)  # type: ignore[arg-type]
        new_acc = acc.gather(-1, order.expand(acc.shape[0], *order.shape))
    seg_of = torch.bucketize(
        order.contiguous(), torch.tensor(starts[1:], device=pos.device, dtype=order.dtype), right=True
    )

    n_blocks = max(0, total - window) // block
    ranges = [(i * block, (i + 1) * block) for i in range(n_blocks)] + [(n_blocks * block, total)]
    cache: OrderedDict[int, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    def dense(i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if i in cache:
            cache.move_to_end(i)
            return cache[i]
        if len(cache) >= _LRU:
            cache.popitem(last=False)
        cache[i] = rest[i].dense(codec)
        return cache[i]

    blocks: list[Segment] = list(head)
    out_window: Segment | None = None
    for a, z in ranges:
        src, sid = order[..., a:z], seg_of[..., a:z]
        k_out = v_out = None
        for i in sid.unique().tolist():
            k_i, v_i = dense(i)
            local = (src - starts[i]).clamp(0, sizes[i] - 1)[..., None]
            gk = k_i.gather(2, local.expand(-1, -1, -1, k_i.shape[-1]))
            gv = v_i.gather(2, local.expand(-1, -1, -1, v_i.shape[-1]))
            if k_out is None or v_out is None:
                k_out, v_out = gk, gv
            else:
                sel = (sid == i)[..., None]
                k_out, v_out = torch.where(sel, gk, k_out), torch.where(sel, gv, v_out)
        p = new_pos[..., a:z].to(torch.int32).contiguous()
        lo, hi, full = bounds(p)
        if k_out is None or v_out is None:  # an empty range: no live token left at all
            d = rest[0].dense(codec)
            k_out, v_out = d[0][:, :, :0], d[1][:, :, :0]
        seg = Segment(
            pos=p,
            lo=lo,
            hi=hi,
            full=full,
            acc=None if new_acc is None else new_acc[..., a:z].contiguous(),
            k=k_out.to(dtype),
            v=v_out.to(dtype),
        )
        if (a, z) == ranges[-1]:
            out_window = seg
        else:
            blocks.append(encode_segment(codec, seg))
    assert out_window is not None
    return blocks, out_window
