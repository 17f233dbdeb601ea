"""Quest (Tang et al., ICML 2024): read only the pages whose upper-bound logit is highest.

Every page stays resident (no memory saving: a read-bandwidth optimisation). Each page keeps
the element-wise max and min of its keys per KV head; ``relu(q) . max + min(q, 0) . min`` is a
true upper bound of ``q . k`` over the page, so a page whose keys could matter is never ranked
below one whose keys cannot beat that bound. Each query reads its own top pages: a question
forward of many tokens is selected per query row, which is what the paper's token-by-token
question feeding computes (except that pages the question itself fills during that forward are
read densely as the forward's own tokens). Paper defaults: page 16, first 2 layers dense; the
paper forces no sink page, but ``sinks=1`` keeps token 0 (an attention sink on SmolLM2) read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import register_policy
from .paged import PagePolicy, PagePolicyConfig, PageView, masked_extremes, page_scores

__all__ = ["Quest", "QuestConfig"]


@dataclass(frozen=True)
class QuestConfig(PagePolicyConfig):
    name: ClassVar[str] = "quest"
    page: int = 16
    sinks: int = 1
    window: int = 0


@register_policy(QuestConfig)
class Quest(PagePolicy):
    config: QuestConfig

    def digest(self, keys: torch.Tensor, live: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return masked_extremes(keys, live)

    def select_pages(self, view: PageView) -> torch.Tensor:
        return self.top_pages(view, page_scores(view.query, view.hi, view.lo, self.config.group))
