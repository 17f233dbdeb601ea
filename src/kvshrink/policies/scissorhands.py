"""Scissorhands (Liu et al., NeurIPS 2023): tokens that mattered keep mattering.

Persistence of importance: a token that drew attention at one step is likely to draw it later,
so each KV head ranks its tokens by how often they were *important* over a recent history of
queries, important meaning a probability of at least ``1/t`` for a query that sees ``t``
tokens (above uniform; the group's query heads averaged first). When a head holds more than its
budget it keeps the first ``sinks`` tokens and the ``recent`` newest ones and evicts the
lowest-ranked others (``drop`` > 0 evicts a block, ``drop`` x budget below the budget, as the
paper's ``m``, so ranking runs once per block). The same rule compresses a prompt, ranked by the
prompt's last ``window`` queries.

History window: the paper counts over the last ``w`` steps, which needs ``w`` bits per slot
(400 bits, more than an int4 key and value of a 64-d head). Here each slot carries two floats,
the importance count and the observation count, both decayed by ``1 - 1/w`` per query: an
exponential window of mean length ``w``. The rank is their ratio, the share of the (recent)
queries that found the token important, so young tokens are not penalised for having been
seen fewer times (cold-compress divides by the recorded steps in the same way). Defaults
``window=400, recent=10, sinks=1`` are the paper's as read by AnswerDotAI/cold-compress (no
official code); ``drop`` is unverified and off by default.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..core.errors import SpecError
from .base import (
    UNIFORM,
    Decision,
    LayerView,
    Observation,
    Policy,
    PolicyConfig,
    live_rank,
    register_policy,
    select,
)

__all__ = ["Scissorhands", "ScissorhandsConfig"]


@dataclass(frozen=True)
class ScissorhandsConfig(PolicyConfig):
    name: ClassVar[str] = "scissorhands"
    window: int = 400  # history window w, in queries
    recent: int = 10  # newest tokens never evicted (r)
    sinks: int = 1  # first tokens never evicted
    drop: float = 0.0  # share of the budget evicted at once when a head overflows (m / budget)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.window < 1:
            raise SpecError(f"scissorhands: window must be >= 1 query, got {self.window}")
        if self.recent < 0 or self.sinks < 0:
            raise SpecError(
                f"scissorhands: recent and sinks must be >= 0 tokens, got recent={self.recent}, sinks={self.sinks}"
            )
        if not 0.0 <= self.drop < 1.0:
            raise SpecError(f"scissorhands: drop is a share of the budget in [0, 1), got {self.drop}")
        if self.budget is not None and self.budget <= self.sinks + self.recent:
            raise SpecError(
                f"scissorhands: budget={self.budget} must exceed sinks + recent = {self.sinks + self.recent}, "
                "which are always kept"
            )


@register_policy(ScissorhandsConfig)
class Scissorhands(Policy):
    config: ScissorhandsConfig
    state_size: ClassVar[int] = 2  # decayed importance count, decayed observation count

    def observed_queries(self, n_new: int) -> int:
        return min(self.config.window, n_new)

    def query_decay(self) -> float:
        return 1.0 - 1.0 / self.config.window

    def hit_threshold(self) -> str:
        return UNIFORM

    def update_state(self, view: LayerView, obs: Observation | None) -> torch.Tensor:
        assert view.state is not None
        state = view.state * self.query_decay() ** view.n_new
        if obs is None:
            return state
        assert obs.hits is not None and obs.seen is not None
        return state + torch.stack([obs.hits, obs.seen])

    def rate(self, state: torch.Tensor) -> torch.Tensor:
        """``[B, Hkv, N]``: share of the observing queries (decayed) that found each slot important."""
        return state[0] / state[1].clamp_min(torch.finfo(torch.float32).tiny)

    def _decide(self, view: LayerView) -> Decision | None:
        keep = self.kept_per_row(view)
        if not self.over_budget(view, keep):
            return None
        assert view.state is not None
        c = self.config
        target = keep - torch.floor(keep.double() * c.drop).long()
        live = view.live
        from_old, from_new = live_rank(live)
        forced = (from_old < c.sinks) | (from_new < c.recent)
        return Decision(select(self.rate(view.state), live, target, forced))

    def on_prefill(self, view: LayerView) -> Decision | None:
        return self._decide(view)

    def on_decode(self, view: LayerView) -> Decision | None:
        return self._decide(view)
