"""The policy interface: which cached tokens a layer keeps, per KV head.

A policy never sees keys or values. The cache shows it one layer's bookkeeping (the sequence
position of every slot, and an attention statistic the cache computes in its own attention
function, so no eager attention is needed) and the policy answers with a :class:`Decision`.
Policies hold no tensors: state that must survive between steps, like H2O's accumulated
attention, lives in the cache beside each slot and is reordered, copied and evicted with it.

Budgets follow kvpress: ``ratio`` is the fraction *removed*, ``budget`` the number of tokens
*kept* per KV head and layer. With ``ratio`` the number kept is ``ceil((1 - ratio) * n)``
where ``n`` counts the non-padding tokens the sequence has seen (evicted ones included), so a
prompt alone and the same prompt inside a left-padded batch keep the same tokens.

Hooks: :meth:`Policy.on_prefill` runs after a forward that wrote several tokens (a prompt or a
prompt chunk), :meth:`Policy.on_decode` after each single-token step. Precision policies
(MiKV, ZipCache) keep a token but mark it ``Decision.low_precision``: the cache re-stores it
with a second, lower-rate codec (:mod:`kvshrink.cache.precision`), and a demotion is final.
Merging policies (RazorAttention) set ``Decision.compensate``: the slots they drop are folded
into one averaged entry per KV head that attention counts with its multiplicity.
Query-aware page selection with recall (Quest, ArkVale) needs a read-time hook that picks
blocks per query, which the cache would call before attention.
"""

from __future__ import annotations

import math
from abc import ABC
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..core.errors import SpecError
from ..core.registry import Registry
from ..core.spec import Configured, SpecConfig, format_config

__all__ = [
    "POLICIES",
    "Decision",
    "LayerView",
    "Policy",
    "PolicyConfig",
    "live_rank",
    "make_policy",
    "register_policy",
    "select",
]


@dataclass(frozen=True)
class PolicyConfig(SpecConfig):
    """Base of policy configs: exactly one of ``ratio`` (fraction removed) or ``budget`` (kept)."""

    name: ClassVar[str] = ""
    ratio: float | None = None
    budget: int | None = None

    def __post_init__(self) -> None:
        if (self.ratio is None) == (self.budget is None):
            raise SpecError(
                f"{self.name}: give exactly one of ratio= (fraction of tokens removed, e.g. 0.75) "
                "or budget= (tokens kept per head and layer, e.g. 256)"
            )
        if self.ratio is not None and not 0.0 < self.ratio < 1.0:
            raise SpecError(
                f"{self.name}: ratio is the fraction removed and must be in (0, 1), got {self.ratio}"
            )
        if self.budget is not None and self.budget < 1:
            raise SpecError(f"{self.name}: budget must be >= 1 token, got {self.budget}")

    def __str__(self) -> str:
        return format_config(self)


@dataclass(frozen=True)
class LayerView:
    """One layer's bookkeeping as a policy sees it (N slots, oldest first).

    ``positions``: ``[B, Hkv, N]`` int64 sequence position (column of the 2-D attention mask)
    of each slot, ``-1`` for an empty slot (padding or already evicted).
    ``scores``: ``[B, Hkv, N]`` float32 attention statistic requested by the policy (see
    :attr:`Policy.accumulate` and :meth:`Policy.observed_queries`), averaged over the query
    heads of each KV group; 0 at empty slots; ``None`` when the policy asked for none.
    ``seen_valid``: ``[B]`` int64, non-padding tokens the sequence has seen, evicted included.
    ``n_new``: how many trailing slots this forward wrote.
    ``low``: ``[B, Hkv, N]`` bool, slots already held at low precision (final: precision is
    never raised back); ``None`` when the layer holds none. Low slots may come before older
    full-precision ones, so rank tokens by ``positions`` where age matters.
    """

    layer_idx: int
    positions: torch.Tensor
    scores: torch.Tensor | None
    seen_valid: torch.Tensor
    n_new: int
    low: torch.Tensor | None = None

    @property
    def live(self) -> torch.Tensor:
        """``[B, Hkv, N]`` bool: slots holding a token."""
        return self.positions >= 0


@dataclass(frozen=True)
class Decision:
    """What a layer keeps: ``keep`` is a ``[B, Hkv, N]`` bool mask over the view's slots.

    ``low_precision`` (same shape): kept slots to hold with the cache's low-precision codec
    (MiKV, ZipCache); slots already low stay low whatever it says. ``compensate``: fold the
    dropped slots of each KV head into its compensation entry, a running mean of their keys
    and values attended with multiplicity ``|D|`` (RazorAttention), instead of losing them.
    """

    keep: torch.Tensor
    low_precision: torch.Tensor | None = None
    compensate: bool = False


class Policy(Configured, ABC):
    """Base policy. Subclasses override the hooks they need; both default to keeping all."""

    config: PolicyConfig
    #: the cache keeps a running sum of ``scores`` per slot across forwards (H2O)
    accumulate: ClassVar[bool] = False

    def observed_queries(self, n_new: int) -> int:
        """How many of this forward's last queries' attention the cache must put in ``scores``."""
        return 0

    def on_prefill(self, view: LayerView) -> Decision | None:
        """After a forward that wrote ``view.n_new > 1`` tokens."""
        return None

    def on_decode(self, view: LayerView) -> Decision | None:
        """After a single-token forward."""
        return None

    # -- helpers shared by the policies ------------------------------------------------------
    def kept_per_row(self, view: LayerView) -> torch.Tensor:
        """``[B]`` int64: tokens each row keeps per head under this policy's ratio or budget."""
        c = self.config
        if c.budget is not None:
            return torch.full_like(view.seen_valid, c.budget)
        return torch.ceil(view.seen_valid.double() * (1.0 - c.ratio)).long().clamp_min(1)  # type: ignore[operator]

    def over_budget(self, view: LayerView, keep: torch.Tensor) -> bool:
        """Whether any row-head holds more live tokens than ``keep`` ``[B]`` allows."""
        return bool((view.live.sum(-1) > keep[:, None]).any())


def live_rank(live: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank of each live slot from the oldest (0, 1, ...) and from the newest, ``[B, Hkv, N]``.

    Ranks count live slots only, so sinks and recent windows skip left padding and holes.
    """
    n = live.long()
    from_old = n.cumsum(-1) - 1
    from_new = n.sum(-1, keepdim=True) - 1 - from_old
    return from_old, from_new


def select(
    scores: torch.Tensor, live: torch.Tensor, keep: torch.Tensor, forced: torch.Tensor
) -> torch.Tensor:
    """Keep-mask with the ``forced`` live slots plus the best-scored others, ``keep[b]`` per row-head.

    ``scores``/``live``/``forced``: ``[B, Hkv, N]``; ``keep``: ``[B]``. Ties go to the older slot
    (stable sort), so selection is deterministic. Returns ``[B, Hkv, N]`` bool.
    """
    s = scores.float().masked_fill(~live, -math.inf).masked_fill(forced & live, math.inf)
    order = torch.sort(s, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(
        -1, order, torch.arange(s.shape[-1], device=s.device).expand_as(order)
    )
    return (rank < keep[:, None, None]) & live


POLICIES: Registry[Policy] = Registry("policy")
register_policy = POLICIES.register


def make_policy(spec: str) -> Policy:
    """Build a policy from its spec string, e.g. ``make_policy("snapkv:ratio=0.75")``."""
    return POLICIES.build(spec)
