"""StreamingLLM (Xiao et al., ICLR 2024): attention sinks plus a recent window.

The first tokens absorb surplus softmax mass, so a plain sliding window collapses once they
are evicted; keeping ``sinks`` initial tokens and the most recent ones holds perplexity on
endless streams. Same set for every head and layer. Positions are *not* reassigned: keys keep
their original rotation and new tokens their true position ids (the paper re-rotates keys by
cache index; this keeps the kvpress ``StreamingLLMPress`` behaviour without ``KeyRerotation``).
Evicts after every forward, prefill and decode, once a row holds more than it may keep.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..core.errors import SpecError
from .base import Decision, LayerView, Policy, PolicyConfig, live_rank, register_policy

__all__ = ["StreamingLLM", "StreamingLLMConfig"]


@dataclass(frozen=True)
class StreamingLLMConfig(PolicyConfig):
    name: ClassVar[str] = "streamingllm"
    always: ClassVar[tuple[str, ...]] = ("sinks",)
    sinks: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sinks < 0:
            raise SpecError(f"streamingllm: sinks must be >= 0, got {self.sinks}")
        if self.budget is not None and self.budget <= self.sinks:
            raise SpecError(
                f"streamingllm: budget={self.budget} must exceed sinks={self.sinks} to leave a recent window"
            )


@register_policy(StreamingLLMConfig)
class StreamingLLM(Policy):
    config: StreamingLLMConfig

    def _decide(self, view: LayerView) -> Decision | None:
        keep = self.kept_per_row(view)
        if not self.over_budget(view, keep):
            return None
        live = view.live
        from_old, from_new = live_rank(live)
        sinks = keep.clamp_max(self.config.sinks)[:, None, None]
        recent = keep[:, None, None] - sinks
        return Decision(live & ((from_old < sinks) | (from_new < recent)))

    def on_prefill(self, view: LayerView) -> Decision | None:
        return self._decide(view)

    def on_decode(self, view: LayerView) -> Decision | None:
        return self._decide(view)
