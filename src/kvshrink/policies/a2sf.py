"""A2SF (Jo & Shin, 2024): accumulated attention with a forgetting factor.

H2O's accumulated attention is unfair under causal masking: an old token is summed over more
queries than a young one, so it wins by age. A2SF discounts each query's contribution by
``alpha`` per later query, ``S(j) = sum_q alpha^(n-1-q) A[q, j]``, so tokens of different ages
compete on recent use (``alpha = 1`` is H2O). Each KV head keeps its ``recent`` newest tokens
plus the top-scored others (the group's query heads averaged; the code sums them, which ranks
the same).

The prompt is scored by all its queries, row ``q`` weighted ``alpha^(T-1-q)``; the cache
computes this in row tiles, never a ``T x T`` matrix. Decode steps then apply the paper's
recursion ``S <- alpha * S + a_t`` (new tokens start at 0) and evict whenever a head holds more
than its budget. Defaults follow the code (Dirac-Notation/A2SF): ``alpha=0.95``, 16 recent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..core.errors import SpecError
from .base import Decision, LayerView, Observation, Policy, PolicyConfig, live_rank, register_policy, select

__all__ = ["A2SF", "A2SFConfig"]


@dataclass(frozen=True)
class A2SFConfig(PolicyConfig):
    name: ClassVar[str] = "a2sf"
    alpha: float = 0.95  # forgetting factor per query
    recent: int = 16  # newest tokens always kept

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.alpha <= 1.0:
            raise SpecError(f"a2sf: alpha is a forgetting factor in (0, 1], got {self.alpha}")
        if self.recent < 0:
            raise SpecError(f"a2sf: recent must be >= 0 tokens, got {self.recent}")
        if self.budget is not None and self.budget <= self.recent:
            raise SpecError(
                f"a2sf: budget={self.budget} must exceed recent={self.recent}, which are always kept"
            )


@register_policy(A2SFConfig)
class A2SF(Policy):
    config: A2SFConfig
    state_size: ClassVar[int] = 1  # the forgetting-factor score

    def observed_queries(self, n_new: int) -> int:
        return n_new

    def query_decay(self) -> float:
        return self.config.alpha

    def update_state(self, view: LayerView, obs: Observation | None) -> torch.Tensor:
        assert view.state is not None
        state = view.state * self.config.alpha**view.n_new
        return state if obs is None else state + obs.mass

    def _decide(self, view: LayerView) -> Decision | None:
        keep = self.kept_per_row(view)
        if not self.over_budget(view, keep):
            return None
        assert view.state is not None
        live = view.live
        _, from_new = live_rank(live)
        return Decision(select(view.state[0], live, keep, from_new < self.config.recent))

    def on_prefill(self, view: LayerView) -> Decision | None:
        return self._decide(view)

    def on_decode(self, view: LayerView) -> Decision | None:
        return self._decide(view)
