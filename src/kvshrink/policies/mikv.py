"""MiKV (Yang et al., "No Token Left Behind", arXiv 2402.18096): H2O's choice, nothing evicted.

H2O keeps a recent window plus the heavy hitters (highest accumulated attention) and evicts
the rest; MiKV keeps the tokens H2O would evict, at low precision (the paper: per-token 2-4 bit
RTN, 43% -> 99.8% line retrieval on Llama-2-7B at 50% "evicted"). Importance is exactly
:mod:`.h2o`'s: attention summed over every query that saw the token (prompt, then each decode
query), averaged over the query heads of a KV group; ``recent`` is the share of the
full-precision budget reserved for the newest tokens, ranked by position.

Not reproduced: the paper's outlier balancer (keys scaled per channel by sqrt(max|q|/max|k|),
queries by the inverse). It exists to make per-token RTN of keys viable; here the low codec
brings its own outlier handling (rotation in fibquant/turboquant, per-channel keys in kivi).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..core.errors import SpecError
from .base import LayerView, register_policy
from .precision import ImportancePrecision, PrecisionConfig, newest_rank

__all__ = ["MiKV", "MiKVConfig"]


@dataclass(frozen=True)
class MiKVConfig(PrecisionConfig):
    name: ClassVar[str] = "mikv"
    recent: float = 0.5  # share of the full-precision budget reserved for the newest tokens

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.recent < 1.0:
            raise SpecError(f"mikv: recent is a share of the kept tokens in [0, 1), got {self.recent}")


@register_policy(MiKVConfig)
class MiKV(ImportancePrecision):
    config: MiKVConfig

    def importance(self, view: LayerView) -> torch.Tensor:
        assert view.scores is not None
        return view.scores

    def protected(self, view: LayerView, keep: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        recent = torch.floor(keep.double() * self.config.recent).long()[:, None, None]
        return high & (newest_rank(view.positions, view.live) < recent)
