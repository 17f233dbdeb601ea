"""Precision policies: keep every token, hold the unimportant ones with a lower-rate codec.

Eviction loses a token for good; a needle the scorer misjudged is gone. MiKV (Yang et al.,
2024) keeps those tokens at low precision instead, ZipCache (He et al., NeurIPS 2024) gives
salient tokens high bits and the rest low bits. Both answer with ``Decision.low_precision``;
the cache re-stores the marked tokens with the ``low`` codec (:mod:`kvshrink.cache.precision`)
and never raises a token's precision back.

Budgets count *full-precision* tokens: ``ratio`` is the fraction held at low precision,
``budget`` the tokens per KV head and layer kept with the main codec; nothing is removed.
After a prompt the layer is brought to the budget at once. During decoding each new token
arrives at full precision, and demotion waits until a head holds ``lag`` tokens over its
budget: the cache then encodes them as one low-precision run, whereas demoting one token per
step would re-encode a block per layer and step and leave one-token runs that group-wise codecs
(KIVI's per-channel keys) cannot quantize at all.

``low`` is a codec spec of the codec registry, bracketed when it holds commas:
``mikv:ratio=0.75,low=[fibquant:b=1,k=8]+fibquant:b=2``. The policy checks only its grammar
(policies import no codecs); the cache resolves it and raises on an unknown codec.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..core.errors import SpecError
from ..core.spec import parse_stage
from .base import Decision, LayerView, Policy, PolicyConfig, select

__all__ = ["ImportancePrecision", "PrecisionConfig", "newest_rank"]


@dataclass(frozen=True)
class PrecisionConfig(PolicyConfig):
    """Options shared by precision policies: the ``low`` codec and the decode ``lag``."""

    always: ClassVar[tuple[str, ...]] = ("low",)
    low: str = "fibquant:b=1,k=8"
    lag: int = 32

    def __post_init__(self) -> None:
        super().__post_init__()
        if any(ch in self.low for ch in "+;[]"):
            raise SpecError(
                f"{self.name}: low={self.low!r} must be one codec stage, e.g. low=[fibquant:b=1,k=8]"
            )
        parse_stage(self.low)  # grammar only; the cache resolves the codec
        if self.lag < 1:
            raise SpecError(f"{self.name}: lag must be >= 1 token, got {self.lag}")


def newest_rank(positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[B, Hkv, N]`` rank of each ``mask`` slot by sequence position, 0 = newest.

    Ranks by position, not slot order: low-precision runs sit before older full-precision
    slots. Slots outside ``mask`` rank after every slot inside it.
    """
    p = positions.masked_fill(~mask, -1)
    order = torch.sort(p, dim=-1, descending=True, stable=True).indices
    return torch.empty_like(order).scatter_(
        -1, order, torch.arange(p.shape[-1], device=p.device).expand_as(order)
    )


class ImportancePrecision(Policy):
    """Keep the ``budget`` most important full-precision tokens per head, demote the rest.

    Subclasses give the importance (:meth:`importance`) and the slots that stay at full
    precision whatever their score (:meth:`protected`).
    """

    config: PrecisionConfig
    accumulate: ClassVar[bool] = True

    def observed_queries(self, n_new: int) -> int:
        return n_new

    @abstractmethod
    def importance(self, view: LayerView) -> torch.Tensor:
        """``[B, Hkv, N]`` float: higher = more important."""

    def protected(self, view: LayerView, keep: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        """``[B, Hkv, N]`` bool: full-precision slots that must stay so (none by default)."""
        return torch.zeros_like(high)

    def _decide(self, view: LayerView, slack: int) -> Decision | None:
        live = view.live
        high = live if view.low is None else live & ~view.low
        keep = self.kept_per_row(view)
        if not bool((high.sum(-1) > keep[:, None] + slack).any()):
            return None
        assert view.scores is not None  # observed_queries() >= 1: the cache provides them
        stay = select(self.importance(view), high, keep, self.protected(view, keep, high))
        return Decision(keep=live, low_precision=live & ~stay)

    def on_prefill(self, view: LayerView) -> Decision | None:
        return self._decide(view, 0)

    def on_decode(self, view: LayerView) -> Decision | None:
        return self._decide(view, self.config.lag - 1)
