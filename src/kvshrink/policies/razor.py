"""RazorAttention (Tang et al., ICLR 2025, arXiv 2407.15891): retrieval heads keep everything.

Only a few heads attend across the whole context. Those "retrieval" KV heads keep every token;
every other KV head keeps ``sinks`` first tokens and a recent window, and folds the tokens it
drops into one compensation entry (mean key, mean value) that attention counts ``|D|`` times,
a ``log|D|`` logit bias (``Decision.compensate``). Without that multiplicity an averaged token
gets almost no attention and the dropped mass is simply lost (the paper's ablation).

Window: ``L = max(window, ceil((1 - ratio) * n) - sinks)`` recent tokens with ``ratio`` (the
paper's ``max(S0, N / C)``, with ``S0`` = ``window``, 256 in Huawei's deployment defaults), or
``budget - sinks`` with ``budget``. The window rolls during decoding, each dropped token joining
the running mean.

Retrieval heads are found once per model on a repeated random token sequence
(:mod:`kvshrink.cache.heads`): the top ``induction`` share of KV heads by induction score
(attention to the token after an earlier occurrence of the current one) plus the top ``echo``
share by echo score (attention to the earlier occurrence itself); the paper protects 14% + 1%.
``heads=3:0/12:2`` (``layer:kv_head`` joined by ``/``) names them instead and skips the search.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..core.errors import InputError, SpecError
from .base import Decision, LayerView, Policy, PolicyConfig, live_rank, register_policy

__all__ = ["RazorAttention", "RazorConfig", "format_heads", "parse_heads", "pick_heads"]

Heads = frozenset[tuple[int, int]]


def parse_heads(text: str) -> Heads:
    """``"3:0/12:2"`` -> ``{(3, 0), (12, 2)}``, or a one-line SpecError."""
    out = set()
    for item in text.split("/"):
        layer, colon, head = item.partition(":")
        if not colon or not layer.strip().isdigit() or not head.strip().isdigit():
            raise SpecError(
                f"razor: heads={text!r} must be layer:kv_head pairs joined by '/', e.g. heads=3:0/12:2"
            )
        out.add((int(layer), int(head)))
    return frozenset(out)


def format_heads(heads: Iterable[tuple[int, int]]) -> str:
    """Canonical ``heads=`` value: sorted ``layer:head`` pairs joined by ``/``."""
    return "/".join(f"{layer}:{head}" for layer, head in sorted(heads))


def pick_heads(
    induction: torch.Tensor, echo: torch.Tensor, induction_share: float, echo_share: float
) -> Heads:
    """Top ``induction_share`` of KV heads by ``induction`` ∪ top ``echo_share`` by ``echo``.

    ``induction``/``echo``: ``[L, Hkv]`` scores. Shares round up (the paper's 14% of a small
    model's heads is not a whole number); a share of 0 picks none. Ties go to the lower index.
    """
    total = induction.numel()
    chosen: set[tuple[int, int]] = set()
    for scores, share in ((induction, induction_share), (echo, echo_share)):
        n = min(total, math.ceil(share * total - 1e-9))
        order = torch.sort(scores.flatten().float(), descending=True, stable=True).indices[:n]
        chosen.update((int(i) // scores.shape[1], int(i) % scores.shape[1]) for i in order)
    return frozenset(chosen)


@dataclass(frozen=True)
class RazorConfig(PolicyConfig):
    name: ClassVar[str] = "razor"
    sinks: int = 4
    window: int = 256  # S0: the least recent window of a non-retrieval head (ratio only)
    induction: float = 0.14
    echo: float = 0.01
    heads: str | None = None
    compensate: bool = True  # 0: drop without the compensation entry (the paper's ablation)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sinks < 0 or self.window < 0:
            raise SpecError(f"razor: sinks and window must be >= 0 tokens, got {self.sinks}, {self.window}")
        for opt in ("induction", "echo"):
            if not 0.0 <= getattr(self, opt) <= 1.0:
                raise SpecError(f"razor: {opt} is a share of KV heads in [0, 1], got {getattr(self, opt)}")
        if self.budget is not None and self.budget <= self.sinks:
            raise SpecError(f"razor: budget={self.budget} must exceed sinks={self.sinks} to leave a window")
        if self.heads is not None:
            object.__setattr__(self, "heads", format_heads(parse_heads(self.heads)))


@register_policy(RazorConfig)
class RazorAttention(Policy):
    """Needs its retrieval heads: from ``heads=`` or bound by the cache (:meth:`bind`)."""

    config: RazorConfig

    def __init__(self, config: RazorConfig) -> None:
        super().__init__(config)
        self.retrieval: Heads | None = None if config.heads is None else parse_heads(config.heads)

    def bind(self, heads: Iterable[tuple[int, int]]) -> None:
        """Set the retrieval heads found for the model this policy will serve."""
        self.retrieval = frozenset(heads)

    def kept_per_row(self, view: LayerView) -> torch.Tensor:
        keep = super().kept_per_row(view)
        if self.config.ratio is not None:
            keep = keep.clamp_min(self.config.sinks + self.config.window)
        return keep

    def _decide(self, view: LayerView) -> Decision | None:
        if self.retrieval is None:
            raise InputError(
                "razor: retrieval heads are unknown; use it through CompressedCache(model, spec), which "
                "searches them once per model, or name them with heads=layer:head/..."
            )
        keep = self.kept_per_row(view)
        live = view.live
        if not self.over_budget(view, keep):
            return None
        from_old, from_new = live_rank(live)
        sinks = keep.clamp_max(self.config.sinks)[:, None, None]
        recent = keep[:, None, None] - sinks
        kept = live & ((from_old < sinks) | (from_new < recent))
        heads = view.positions.shape[1]
        retrieval = torch.tensor(
            [(view.layer_idx, h) in self.retrieval for h in range(heads)], device=live.device
        )
        kept |= live & retrieval[None, :, None]
        if bool((kept == live).all()):
            return None
        return Decision(kept, compensate=self.config.compensate)

    def on_prefill(self, view: LayerView) -> Decision | None:
        return self._decide(view)

    def on_decode(self, view: LayerView) -> Decision | None:
        return self._decide(view)
