"""Page policies: read-time selection of packed pages from per-page key digests (Quest, ArkVale).

Slot policies (:mod:`.base`) decide after a forward which tokens stay. A page policy decides at
*read* time: before a forward reads the packed blocks of a layer, the cache
(:mod:`kvshrink.cache.pages`) shows the policy one digest per page and KV head plus the
forward's queries, and the policy answers which pages each batch row and KV head reads.

A page is one packed block of the cache, so a page policy sets ``cache:block`` to its ``page``
(an explicit different block is a :class:`SpecError`) and the cache's full-precision window to
0 unless one is given: the window then holds only the partial page being filled (up to
``page - 1`` tokens), which every query reads, like the current page in both papers. The
``budget`` counts every token a KV head may read (Quest) or keep resident (ArkVale): the
selected pages, the partial page and any explicit dense window, so ``(budget - window) // page
- 1`` packed pages are selected per row and KV head; the first ``sinks`` and last ``window``
live pages are always among them. ``ratio`` scales that budget with the tokens each row has seen.

Digests are two vectors per page and KV head, an upper and a lower corner ``hi``/``lo`` of a box
around the page's keys; a query ``q`` scores a page ``sum_j max(q_j hi_j, q_j lo_j)`` =
``relu(q) . hi + min(q, 0) . lo`` (two matmuls). Quest's min/max box makes that a true upper
bound of ``q . k`` over the page; ArkVale's cuboid-mean box is tighter and ranks better. Under
GQA each query head scores its own KV head's digest and the scores are averaged over the query
heads of the group, so one selection serves each KV head (per-KV-head selection, as the notes
prefer over a layer-wide one). The first ``dense_layers`` layers are never paged (both papers:
early layers are not sparse).
"""

from __future__ import annotations

import math
from abc import abstractmethod
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch

from ..core.errors import SpecError
from .base import Policy, PolicyConfig, live_rank, select

__all__ = ["PagePolicy", "PagePolicyConfig", "PageView", "masked_extremes", "page_scores"]


@dataclass(frozen=True)
class PagePolicyConfig(PolicyConfig):
    """Options shared by page policies (``page``, ``sinks``, ``window`` in pages)."""

    page: int = 32
    sinks: int = 1
    window: int = 2
    dense_layers: int = 2
    group: str = "mean"  # how a KV head combines its query heads' page scores: mean or max
    dbits: int = 16  # digest storage: 16 (float16) or 8 (int8 + a float32 scale per page and head)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.group not in ("mean", "max"):
            raise SpecError(f"{self.name}: group must be 'mean' or 'max', got {self.group!r}")
        if self.dbits not in (8, 16):
            raise SpecError(f"{self.name}: dbits must be 8 or 16, got {self.dbits}")
        for key, low in (("page", 1), ("sinks", 0), ("window", 0), ("dense_layers", 0)):
            if getattr(self, key) < low:
                raise SpecError(f"{self.name}: {key} must be >= {low}, got {getattr(self, key)}")
        least = (self.sinks + self.window + 2) * self.page
        if self.budget is not None and self.budget < least:
            raise SpecError(
                f"{self.name}: budget={self.budget} leaves no page to select; with page={self.page}, "
                f"sinks={self.sinks}, window={self.window} and the partial page it must be >= {least}"
            )

    def align_cache(self, cache: Any, explicit: set[str]) -> Any:
        """The cache config this policy runs with: ``block = page``, ``window = 0`` unless given."""
        if "block" in explicit and cache.block != self.page:
            raise SpecError(
                f"{self.name}: cache block={cache.block} differs from page={self.page}; a page is one "
                f"packed block, set {self.name}:page=N instead of cache:block"
            )
        return replace(cache, block=self.page, window=cache.window if "window" in explicit else 0)


@dataclass(frozen=True)
class PageView:
    """One layer's pages as a page policy sees them (P pages, oldest first).

    ``query``: ``[B, Hkv, g, Q, D]`` float32 post-RoPE queries of the forward, grouped per KV head.
    ``hi``/``lo``: ``[B, Hkv, P, D]`` digests (zeros for a page without live token).
    ``live``: ``[B, Hkv, P]`` bool, the page holds a token of this row (left padding can empty one).
    ``resident``: ``[B, Hkv, P]`` bool, the page is in device memory now.
    ``seen_valid``: ``[B]`` non-padding tokens the row has seen. ``dense``: the cache's dense
    window in tokens (counted in the budget besides the partial page).
    """

    layer_idx: int
    query: torch.Tensor
    hi: torch.Tensor
    lo: torch.Tensor
    live: torch.Tensor
    resident: torch.Tensor
    seen_valid: torch.Tensor
    dense: int


def page_scores(query: torch.Tensor, hi: torch.Tensor, lo: torch.Tensor, group: str = "mean") -> torch.Tensor:
    """``[B, Hkv, Q, P]``: ``sum_j max(q_j hi_j, q_j lo_j)`` averaged (``group="max"``: maximised)
    over each group's query heads.

    ``query``: ``[B, Hkv, g, Q, D]``; ``hi``/``lo``: ``[B, Hkv, P, D]``. Valid as written for any
    box with ``hi >= lo``: the maximum picks ``hi_j`` where ``q_j > 0``, ``lo_j`` where ``q_j < 0``.
    """
    b, hk, g, nq, d = query.shape
    q = query.float().reshape(b, hk, g * nq, d)
    pos = q.clamp_min(0.0)
    s = pos @ hi.float().transpose(-1, -2) + (q - pos) @ lo.float().transpose(-1, -2)
    s = s.view(b, hk, g, nq, -1)
    return s.mean(2) if group == "mean" else s.amax(2)


class PagePolicy(Policy):
    """Base of page policies: a digest of each written page, then a read-time selection."""

    config: PagePolicyConfig
    #: True: unselected pages leave device memory for a host backup and are recalled when selected
    #: again (ArkVale); False: every page stays resident and selection only limits reads (Quest)
    recall: ClassVar[bool] = False

    @abstractmethod
    def digest(self, keys: torch.Tensor, live: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(hi, lo)`` ``[B, Hkv, D]`` float32 of page keys ``[B, Hkv, T, D]``, ``live`` ``[B, Hkv, T]``.

        A row-head without live key gets zeros (its page is marked not live by the cache).
        """

    @abstractmethod
    def select_pages(self, view: PageView) -> torch.Tensor:
        """``[B, Hkv, Q', P]`` bool: the pages each query reads (``Q' = Q``, or 1 for all queries)."""

    # -- helpers shared by the page policies -------------------------------------------------
    def pages_kept(self, view: PageView) -> torch.Tensor:
        """``[B]`` int64 packed pages selected per row and KV head (at least the forced ones + 1)."""
        c = self.config
        if c.budget is not None:
            tokens = torch.full_like(view.seen_valid, c.budget)
        else:
            assert c.ratio is not None
            tokens = torch.ceil(view.seen_valid.double() * (1.0 - c.ratio)).long()
        pages = torch.div(tokens - view.dense, c.page, rounding_mode="floor") - 1
        return pages.clamp_min(c.sinks + c.window + 1)

    def top_pages(self, view: PageView, scores: torch.Tensor) -> torch.Tensor:
        """Forced sink and window pages plus the best-scored others: ``[B, Hkv, Q, P]`` bool.

        ``scores``: ``[B, Hkv, Q, P]``. Ranks count live pages only, so sinks skip pages that
        left padding emptied.
        """
        b, hk, nq, p = scores.shape
        live = view.live[:, :, None].expand(b, hk, nq, p)
        from_old, from_new = live_rank(live)
        forced = (from_old < self.config.sinks) | (from_new < self.config.window)
        flat = (b, hk * nq, p)
        keep = select(scores.reshape(flat), live.reshape(flat), self.pages_kept(view), forced.reshape(flat))
        return keep.view(b, hk, nq, p)


def masked_extremes(keys: torch.Tensor, live: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Element-wise max and min over the live keys: ``[B, Hkv, D]`` each, zeros where none is live."""
    k = keys.float()
    m = live[..., None]
    hi = k.masked_fill(~m, -math.inf).amax(-2)
    lo = k.masked_fill(~m, math.inf).amin(-2)
    none = ~live.any(-1, keepdim=True)
    return hi.masked_fill(none, 0.0), lo.masked_fill(none, 0.0)
