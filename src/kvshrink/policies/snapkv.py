"""SnapKV (Li et al., 2024): the prompt's last queries vote for the prefix tokens to keep.

After a prompt forward, the attention of the last ``window`` queries over every held token is
summed, averaged over the query heads of each KV group (kvpress; the official code selects per
query head and stores repeated KV), smoothed with a 1-D pooling (kernel 7, max-pool as in the
LongBench configs) so the neighbours of a selected token come along, and each KV head keeps
the observation window plus its top-scored others. Decode steps append without eviction, as
in the paper. Keys stay post-RoPE at their original positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..core.errors import SpecError
from .base import Decision, LayerView, Policy, PolicyConfig, live_rank, register_policy, select

__all__ = ["SnapKV", "SnapKVConfig"]


@dataclass(frozen=True)
class SnapKVConfig(PolicyConfig):
    name: ClassVar[str] = "snapkv"
    window: int = 32
    kernel: int = 7
    pool: str = "max"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.window < 1:
            raise SpecError(f"snapkv: window must be >= 1 query, got {self.window}")
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise SpecError(f"snapkv: kernel must be an odd integer >= 1, got {self.kernel}")
        if self.pool not in ("max", "avg"):
            raise SpecError(f"snapkv: pool must be 'max' or 'avg', got {self.pool!r}")
        if self.budget is not None and self.budget <= self.window:
            raise SpecError(
                f"snapkv: budget={self.budget} must exceed the observation window={self.window}, "
                "which is always kept"
            )


@register_policy(SnapKVConfig)
class SnapKV(Policy):
    config: SnapKVConfig

    def observed_queries(self, n_new: int) -> int:
        return min(self.config.window, n_new) if n_new > 1 else 0

    def on_prefill(self, view: LayerView) -> Decision | None:
        c = self.config
        keep = self.kept_per_row(view)
        live = view.live
        if c.budget is not None and not bool((live.sum(-1) > c.budget).any()):
            n = int(live.sum(-1).max())
            raise SpecError(
                f"snapkv: budget={c.budget} is not smaller than the {n} tokens held after the prompt, so "
                "nothing would be evicted; use a smaller budget or ratio="
            )
        if not self.over_budget(view, keep):
            return None
        assert view.scores is not None  # observed_queries() > 0 for a prompt
        scores = self._pool(view.scores, live)
        _, from_new = live_rank(live)
        return Decision(select(scores, live, keep, from_new < c.window))

    def _pool(self, scores: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
        """Smooth ``[B, Hkv, N]`` scores along the slots; empty slots neither give nor take."""
        b, h, n = scores.shape
        k = self.config.kernel
        flat = scores.reshape(b * h, 1, n)
        if self.config.pool == "max":
            flat = flat.masked_fill(~live.reshape(b * h, 1, n), float("-inf"))
            out = F.max_pool1d(flat, k, stride=1, padding=k // 2)
        else:
            out = F.avg_pool1d(flat, k, stride=1, padding=k // 2, count_include_pad=False)
        return out.reshape(b, h, n).masked_fill(~live, float("-inf"))
