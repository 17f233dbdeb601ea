"""The policy interface: which cached tokens a layer keeps, per KV head.

A policy never sees keys or values. The cache shows it one layer's bookkeeping (the sequence
position of every slot, and an attention statistic the cache computes in its own attention
function, so no eager attention is needed) and the policy answers with a :class:`Decision`.
Policies hold no tensors: state that must survive between steps, like H2O's accumulated
attention, lives in the cache beside each slot and is reordered, copied and evicted with it.
A policy asks for ``state_size`` floats per slot and folds each forward's :class:`Observation`
into them with :meth:`Policy.update_state` (a pure function of tensors), so a new statistic
(a decayed sum, an importance count, a last-seen step) needs no change in the cache.

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
Query-aware page selection with recall (Quest, ArkVale) is a different kind of policy, served
by a read-time hook: see :mod:`.paged` and :mod:`kvshrink.cache.pages`.
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
    "UNIFORM",
    "Decision",
    "LayerView",
    "Observation",
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
    ``n_layers``: decoder layers of the model (per-layer budgets, PyramidKV).
    ``state``: ``[K, B, Hkv, N]`` float32 per-slot policy state (``K = state_size``), already
    updated with this forward's observation; ``None`` for a policy without state.
    ``step``: single-token forwards since the last multi-token one (1 at the first decode step),
    for policies that act every ``W`` steps.
    ``low``: ``[B, Hkv, N]`` bool, slots already held at low precision (final: precision is
    never raised back); ``None`` when the layer holds none. Low slots may come before older
    full-precision ones, so rank tokens by ``positions`` where age matters.
    """

    layer_idx: int
    positions: torch.Tensor
    scores: torch.Tensor | None
    seen_valid: torch.Tensor
    n_new: int
    n_layers: int = 1
    state: torch.Tensor | None = None
    step: int = 0
    low: torch.Tensor | None = None

    @property
    def live(self) -> torch.Tensor:
        """``[B, Hkv, N]`` bool: slots holding a token."""
        return self.positions >= 0


#: :attr:`Policy.hit_threshold` value meaning "above uniform": probability >= 1 / (keys the query sees)
UNIFORM = "uniform"


@dataclass(frozen=True)
class Observation:
    """What this forward's observed queries did to every slot (old ones and the new), ``[B, Hkv, N]``.

    Query ``r`` of ``n`` observed ones (oldest first) weighs ``w_r = decay ** (n - 1 - r)``
    (:meth:`Policy.query_decay`); probabilities are averaged over the query heads of each KV
    group first. ``mass``: ``sum_r w_r A_r[j]``. ``hits``: ``sum_r w_r [A_r[j] >= theta_r]``
    (:meth:`Policy.hit_threshold`; None when the policy sets none). ``seen``:
    ``sum_r w_r [query r may attend slot j]``, the denominator of a hit rate (with ``hits``).
    """

    mass: torch.Tensor
    hits: torch.Tensor | None = None
    seen: torch.Tensor | None = None


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
    #: the cache keeps a running sum of ``scores`` per slot across forwards (H2O); shorthand for
    #: a one-float state summed by :meth:`update_state` and shown as ``view.scores``
    accumulate: ClassVar[bool] = False
    #: floats of per-slot state the cache keeps beside each slot (0: none)
    state_size: ClassVar[int] = 0

    @property
    def slot_floats(self) -> int:
        """Floats the cache keeps per slot for this policy."""
        return max(self.state_size, 1 if self.accumulate else 0)

    def observed_queries(self, n_new: int) -> int:
        """How many of this forward's last queries' attention the cache must put in ``scores``."""
        return 0

    def query_decay(self) -> float:
        """Weight ratio between consecutive observed queries (1: plain sums; A2SF's forgetting factor)."""
        return 1.0

    def hit_threshold(self) -> float | str | None:
        """Probability from which an observed query counts a slot as important (``Observation.hits``):
        a number, :data:`UNIFORM` (``1/t`` for a query seeing ``t`` keys), or None for no hits."""
        return None

    def update_state(self, view: LayerView, obs: Observation | None) -> torch.Tensor:
        """Fold this forward's observation into the per-slot state; returns ``[K, B, Hkv, N]``.

        ``view.state`` holds the previous state, zeros at the ``view.n_new`` new slots; ``obs`` is
        None when no query was observed. Runs before :meth:`on_prefill`/:meth:`on_decode`, which
        then see the result as ``view.state``. The default sums ``mass`` (``accumulate``).
        """
        assert view.state is not None
        return view.state if obs is None else view.state + obs.mass

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
