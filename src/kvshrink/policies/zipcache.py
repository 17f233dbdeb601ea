"""ZipCache (He et al., NeurIPS 2024, arXiv 2405.14256): salient tokens high bits, others low.

Saliency is *normalized* attention: the attention a token received, summed over the queries
that saw it, divided by how many queries could see it. The plain sum (H2O) favours early
tokens, which simply had more queries; the mean does not. Here every query is observed (the
paper samples probe queries, the last 5% plus 5% random others, to stay compatible with
FlashAttention; our cache computes the masses itself, so the exact mean costs one extra pass
over the prompt). A query at column ``c`` sees the tokens at columns ``<= c``, so a token at
column ``p`` has been seen by ``seen - p`` queries (left padding holds no queries after ``p``).
K and V share the selection, per KV head (masses summed over the group's query heads, as in
the paper's code, averaged here: the same ranking).

Deviation: the paper decides each block of ``streaming_gap`` = 100 new tokens alone, at the
prompt's ratio. Here decode decisions rank the new tokens against every full-precision token
held, once ``lag`` tokens are over the budget, so the budget holds exactly like MiKV's. The
paper's own layout (channel-separable token-wise values, 4/2 bits) is the codecs' job: pick
them as the main and ``low`` codecs, e.g. ``zipcache:ratio=0.4,low=kivi:b=2+kivi:b=4``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import LayerView, register_policy
from .precision import ImportancePrecision, PrecisionConfig

__all__ = ["ZipCache", "ZipCacheConfig"]


@dataclass(frozen=True)
class ZipCacheConfig(PrecisionConfig):
    name: ClassVar[str] = "zipcache"


@register_policy(ZipCacheConfig)
class ZipCache(ImportancePrecision):
    config: ZipCacheConfig

    def importance(self, view: LayerView) -> torch.Tensor:
        assert view.scores is not None
        seen = view.positions.amax(dim=(-1, -2), keepdim=True) + 1  # [B, 1, 1]
        seers = (seen - view.positions).clamp_min(1)
        return view.scores / seers.to(view.scores.dtype)
