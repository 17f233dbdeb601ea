"""ZipCache (He et al., NeurIPS 2024, arXiv 2405.14256): salient tokens high bits, others low.

Saliency is *normalized* attention: the attention a token received from the probe queries that
saw it, divided by how many probes could see it. The plain sum (H2O) favours early tokens,
which simply had more queries; the mean does not. Probes are the last ``probe`` share of each
forward's queries (5% in the paper, at least one), so a prompt ending in a question ranks
tokens by what the question attends to, and a decode step by its own query. A probe at column
``c`` sees the tokens at columns ``<= c``: a token at column ``p`` is seen by
``min(probes, seen - p)`` of them. K and V share the selection, per KV head (masses averaged
over the group's query heads; the paper's code sums them: the same ranking).

Deviations: the paper adds 5% random earlier probes, which the cache cannot observe (it
records the last queries of a forward). It decides each block of ``streaming_gap`` = 100 new
tokens alone; here a decode decision, once ``lag`` tokens are over the budget, ranks the
held full-precision tokens by the latest probe. The paper's layout (channel-separable
token-wise values, 4/2 bits) is the codecs' job: pick them as the main and ``low`` codecs,
e.g. ``zipcache:ratio=0.4,low=kivi:b=2+kivi:b=4``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..core.errors import SpecError
from .base import LayerView, register_policy
from .precision import ImportancePrecision, PrecisionConfig

__all__ = ["ZipCache", "ZipCacheConfig"]


@dataclass(frozen=True)
class ZipCacheConfig(PrecisionConfig):
    name: ClassVar[str] = "zipcache"
    probe: float = 0.05  # share of a forward's last queries whose attention is observed

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.probe <= 1.0:
            raise SpecError(f"zipcache: probe is a share of the queries in (0, 1], got {self.probe}")


@register_policy(ZipCacheConfig)
class ZipCache(ImportancePrecision):
    config: ZipCacheConfig
    accumulate: ClassVar[bool] = False

    def observed_queries(self, n_new: int) -> int:
        return max(1, math.ceil(self.config.probe * n_new))

    def importance(self, view: LayerView) -> torch.Tensor:
        assert view.scores is not None
        probes = self.observed_queries(view.n_new)
        seen = view.positions.amax(dim=(-1, -2), keepdim=True) + 1  # [B, 1, 1]
        seers = (seen - view.positions).clamp(1, probes)
        return view.scores / seers.to(view.scores.dtype)
