"""H2O (Zhang et al., NeurIPS 2023): heavy hitters plus a recent window.

A few tokens receive most of the attention mass across steps. Each KV head keeps its
``recent`` share of the budget as the most recent tokens and fills the rest with the tokens of
highest accumulated attention: the sum over every query that saw the token (prompt queries and
then each decode query) of its softmax probability, averaged over the query heads of the KV
group (the paper targets MHA; GQA averages, as the notes advise). Not normalised by the number
of queries that could see a token, as in the paper (A2SF fixes that bias). Evicts after every
forward once a row holds more than it may keep, so decode evicts one token per step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..core.errors import SpecError
from .base import Decision, LayerView, Policy, PolicyConfig, live_rank, register_policy, select

__all__ = ["H2O", "H2OConfig"]


@dataclass(frozen=True)
class H2OConfig(PolicyConfig):
    name: ClassVar[str] = "h2o"
    recent: float = 0.5  # share of the kept tokens reserved for the most recent ones

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.recent < 1.0:
            raise SpecError(f"h2o: recent is a share of the kept tokens in [0, 1), got {self.recent}")


@register_policy(H2OConfig)
class H2O(Policy):
    config: H2OConfig
    accumulate: ClassVar[bool] = True

    def observed_queries(self, n_new: int) -> int:
        return n_new

    def _decide(self, view: LayerView) -> Decision | None:
        keep = self.kept_per_row(view)
        if not self.over_budget(view, keep):
            return None
        assert view.scores is not None
        live = view.live
        _, from_new = live_rank(live)
        recent = torch.floor(keep.double() * self.config.recent).long()[:, None, None]
        return Decision(select(view.scores, live, keep, from_new < recent))

    def on_prefill(self, view: LayerView) -> Decision | None:
        return self._decide(view)

    def on_decode(self, view: LayerView) -> Decision | None:
        return self._decide(view)
