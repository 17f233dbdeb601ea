"""Compensation entries: one averaged key/value per KV head standing for the tokens it dropped.

RazorAttention replaces the tokens a non-retrieval head drops (set ``D``) by ``k̂ = mean k``,
``v̂ = mean v`` and attends to that entry as if it were ``|D|`` identical tokens:

    out = (Σ_kept e^{q·k_j} v_j + |D| e^{q·k̂} v̂) / (Σ_kept e^{q·k_j} + |D| e^{q·k̂})

which is one more key with a ``log|D|`` logit bias (:meth:`OnlineSoftmax.update`). Tokens
dropped later join the running mean, ``k̂ <- (|D| k̂ + Σ k_new) / (|D| + n_new)``, so the
entry is exactly the mean of every dropped key (post-RoPE, as attention sees them; a packed
token contributes its decoded value). Means and counts are float32, per batch row and head.

The entry is no slot of the layer: policies never see it, compaction never moves it, and it
is visible to every query after the newest token it absorbed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .attention import OnlineSoftmax
from .segment import Segment

__all__ = ["Compensation"]


@dataclass
class Compensation:
    """``k``/``v``: ``[B, Hkv, 1, D]`` float32 means; ``count``: ``[B, Hkv]`` float32 ``|D|``;
    ``last``: ``[B, Hkv]`` int64 newest column absorbed (-1 while empty)."""

    k: torch.Tensor
    v: torch.Tensor
    count: torch.Tensor
    last: torch.Tensor

    @classmethod
    def empty(cls, b: int, h: int, dk: int, dv: int, device: torch.device) -> Compensation:
        return cls(
            torch.zeros(b, h, 1, dk, device=device),
            torch.zeros(b, h, 1, dv, device=device),
            torch.zeros(b, h, device=device),
            torch.full((b, h), -1, dtype=torch.long, device=device),
        )

    def fold(self, segments: list[Segment], dropped: torch.Tensor, codec, b: int, h: int) -> None:
        """Absorb the slots ``dropped`` ``[B, Hkv, N]`` marks over ``segments`` (in order)."""
        k_sum, v_sum = torch.zeros_like(self.k), torch.zeros_like(self.v)
        n = torch.zeros_like(self.count)
        start = 0
        for seg in segments:
            pos = seg.full_pos(b, h)
            mark = dropped[..., start : start + seg.size] & (pos >= 0)
            start += seg.size
            if not bool(mark.any()):
                continue
            k, v = seg.dense(codec)
            w = mark.float()[..., None]  # [B, Hkv, T, 1]
            k_sum += (k * w).sum(2, keepdim=True)
            v_sum += (v * w).sum(2, keepdim=True)
            n += mark.sum(-1)
            self.last = torch.maximum(self.last, pos.long().masked_fill(~mark, -1).amax(-1))
        total = self.count + n
        safe = total.clamp_min(1.0)[..., None, None]
        self.k = (self.k * self.count[..., None, None] + k_sum) / safe
        self.v = (self.v * self.count[..., None, None] + v_sum) / safe
        self.count = total

    def attend(self, state: OnlineSoftmax, qcols: torch.Tensor) -> None:
        """Fold the entries into every query row of ``state`` (query columns ``qcols``)."""
        if not bool((self.count > 0).any()):
            return
        allowed = (self.count > 0)[..., None, None] & (self.last[..., None, None] <= qcols[:, None])
        bias = self.count.clamp_min(1.0).log()[..., None]  # [B, Hkv, 1]
        state.update(self.k, self.v, allowed, 0, len(qcols), bias=bias, observed=False)

    def index_rows(self, idx: torch.Tensor) -> None:
        self.k, self.v = self.k.index_select(0, idx), self.v.index_select(0, idx)
        self.count, self.last = self.count.index_select(0, idx), self.last.index_select(0, idx)

    def nbytes(self) -> tuple[int, int]:
        """``(dense, bookkeeping)`` bytes: the means, then counts and columns."""
        dense = sum(t.numel() * t.element_size() for t in (self.k, self.v))
        return dense, sum(t.numel() * t.element_size() for t in (self.count, self.last))
