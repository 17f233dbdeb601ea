"""ArkVale (Chen et al., NeurIPS 2024): a bounded resident set of pages, the rest recallable.

Every written page goes to a host backup; device memory keeps at most ``budget`` tokens per KV
head (pages plus the partial page). Before each forward that reads pages, the current query
scores every page's digest, resident or not; the top pages become the resident set, recalling
those that were evicted (copied back from the backup) and dropping the rest from the device
(the backup still holds them, so nothing is lost). After a forward that writes pages, the same
rule with its last query bounds the resident set again; after a dense prompt that is the
paper's prefill rule (top pages by the *last prompt query*). A forward of many queries (a
question) selects once with its last query: its queries share one resident set, which the
budget bounds. Attention reads every resident page, as the released code does.

Digest: cuboid-mean (the paper's choice, ``digest=cuboid``): centre ``c = (max + min) / 2``,
radius ``r = mean |k - c|`` element-wise, box ``c +- r``. Not a strict bound (the min/max box is
Quest's) but the paper finds it ranks pages better on LongBench. A needle is one sentence inside a
page of essay text: its one matching key is an outlier the mean deviation averages away, so
``digest=box`` (Quest's min/max bound) is offered for retrieval-style workloads. Selection is per KV head with group-averaged scores (the released code shares one
selection across all heads of a layer; the notes advise per-KV-head). Paper defaults: page 32,
1 sink page, 2 window pages, first 2 layers dense.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..core.errors import SpecError
from .base import register_policy
from .paged import PagePolicy, PagePolicyConfig, PageView, masked_extremes, page_scores

__all__ = ["ArkVale", "ArkValeConfig"]


@dataclass(frozen=True)
class ArkValeConfig(PagePolicyConfig):
    name: ClassVar[str] = "arkvale"
    digest: str = "cuboid"  # cuboid (the paper's cuboid-mean) or box (min/max, Quest's bound)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.digest not in ("cuboid", "box"):
            raise SpecError(f"arkvale: digest must be 'cuboid' or 'box', got {self.digest!r}")


@register_policy(ArkValeConfig)
class ArkVale(PagePolicy):
    config: ArkValeConfig
    recall: ClassVar[bool] = True

    def digest(self, keys: torch.Tensor, live: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hi, lo = masked_extremes(keys, live)
        if self.config.digest == "box":
            return hi, lo
        centre = (hi + lo) / 2
        n = live.sum(-1, keepdim=True).clamp_min(1)
        dev = (keys.float() - centre[..., None, :]).abs().masked_fill(~live[..., None], 0.0)
        radius = dev.sum(-2) / n
        return centre + radius, centre - radius

    def select_pages(self, view: PageView) -> torch.Tensor:
        return self.top_pages(view, page_scores(view.query[..., -1:, :], view.hi, view.lo, self.config.group))
