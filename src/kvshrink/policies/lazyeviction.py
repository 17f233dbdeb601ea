"""LazyEviction (Zhang et al., 2025): lagged eviction that spares tokens whose importance recurs.

In long reasoning traces a token often regains attention after a long quiet gap; greedy
per-step eviction (H2O, TOVA) drops it during the gap. LazyEviction observes every decode step
and tracks, per slot, the step it was last important (attention >= ``alpha``) and its maximum
recurrence interval MRI, the longest gap seen between two important steps. Only every
``window`` (W) decode steps, and only once a head holds more than its budget, it evicts: the W
newest tokens stay, and the others are ranked by

    2 / (1 + exp(1 + idle / (MRI + 1e-5))) + (0 if MRI == 0 else 2 / (1 + exp(MRI - 1)))

(``idle``: steps since the token was last important), so a token idle for less than its usual
gap survives, and one never important since it was written scores about 0. The head then
keeps ``budget - W`` of them plus the W newest: between evictions it grows by up to W tokens.

Verified against the official code (Halo-949/LazyEviction, ``Window_LAZYKVCluster`` and
``TempCache.record_recurrence``, read from the copy in WeianMao/triattention): the prompt is
never compressed (tracking starts at the first decode step, prompt tokens counting as last
important at the prompt's end, a decoded token at the step before its own), W is both the
eviction interval and the recent window, and defaults here are its Llama script's
(``decoding_recent_size=52``, ``alpha=0.0005``). The code repeats KV and tracks per query
head; here a KV head tracks the attention averaged over its query heads, like every policy of
this package, which keeps the GQA memory saving.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..core.errors import SpecError
from .base import Decision, LayerView, Observation, Policy, PolicyConfig, live_rank, register_policy, select

__all__ = ["LazyEviction", "LazyEvictionConfig"]

_EPS = 1e-5  # the code's guard against MRI = 0 in idle / MRI


@dataclass(frozen=True)
class LazyEvictionConfig(PolicyConfig):
    name: ClassVar[str] = "lazyeviction"
    window: int = 52  # W: decode steps between evictions, and newest tokens always kept
    alpha: float = 5e-4  # attention probability from which a token counts as important

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.window < 1:
            raise SpecError(f"lazyeviction: window must be >= 1 decode step, got {self.window}")
        if not 0.0 < self.alpha < 1.0:
            raise SpecError(f"lazyeviction: alpha is an attention probability in (0, 1), got {self.alpha}")
        if self.budget is not None and self.budget <= self.window:
            raise SpecError(
                f"lazyeviction: budget={self.budget} must exceed window={self.window}, the newest tokens "
                "always kept"
            )


@register_policy(LazyEvictionConfig)
class LazyEviction(Policy):
    config: LazyEvictionConfig
    state_size: ClassVar[int] = 2  # column at which last important, maximum recurrence interval

    def observed_queries(self, n_new: int) -> int:
        return 1 if n_new == 1 else 0  # decode steps only, as in the code

    def hit_threshold(self) -> float:
        return self.config.alpha

    def update_state(self, view: LayerView, obs: Observation | None) -> torch.Tensor:
        assert view.state is not None
        last, mri = view.state.clone().unbind(0)
        now = float(view.positions.max())  # column of the newest query: the step clock
        new = slice(last.shape[-1] - view.n_new, None)
        last[..., new] = now - 1 if view.n_new == 1 else now
        mri[..., new] = 0.0
        if obs is not None:
            assert obs.hits is not None
            important = (obs.hits > 0) & view.live
            mri = torch.where(important, torch.maximum(mri, now - last), mri)
            last = torch.where(important, torch.full_like(last, now), last)
        return torch.stack([last, mri])

    def scores(self, view: LayerView) -> torch.Tensor:
        """``[B, Hkv, N]`` recurrence-aware importance (the code's formula)."""
        assert view.state is not None
        last, mri = view.state
        idle = float(view.positions.max()) - last
        recur = torch.where(mri == 0, torch.zeros_like(mri), 2.0 / (1.0 + torch.exp(mri - 1.0)))
        return 2.0 / (1.0 + torch.exp(1.0 + idle / (mri + _EPS))) + recur

    def on_decode(self, view: LayerView) -> Decision | None:
        if view.step % self.config.window != 0:
            return None
        keep = self.kept_per_row(view)
        if not self.over_budget(view, keep):
            return None
        live = view.live
        _, from_new = live_rank(live)
        return Decision(select(self.scores(view), live, keep, from_new < self.config.window))
