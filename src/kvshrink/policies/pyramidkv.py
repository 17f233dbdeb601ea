"""PyramidKV (Cai et al., 2024): SnapKV selection with budgets shrinking from bottom to top layer.

Attention funnels: lower layers spread attention over the whole prompt, upper layers focus on a
few tokens, so a uniform budget wastes memory on top and starves the bottom. PyramidKV keeps
SnapKV's selection (observation window, pooled votes, per KV head) and gives layer ``l`` of
``L`` an arithmetic share of the non-window budget (official code, Zefan-Cai/PyramidKV
``PyramidKVCluster``): with ``A = K - window`` the uniform non-window budget, the top layer
gets ``A / beta`` and the bottom ``2A - A / beta``; if that exceeds the ``n - window`` prompt
tokens there are, the bottom gets ``n - window`` and the top ``2A - (n - window)``. Prompts
shorter than ``2A`` fall back to the uniform budget, as in the code.

The per-layer amounts are real numbers averaging exactly ``A``; they are rounded through their
running sum, so the layers together keep exactly what a uniform ``K`` would (the code floors the
step, which keeps a few more). Defaults follow the code's LongBench runs: ``window=8``,
``kernel=7`` max-pool, ``beta=20``. Decode steps append without eviction, as in SnapKV.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..core.errors import SpecError
from .base import Decision, LayerView, PolicyConfig, register_policy
from .snapkv import SnapKV

__all__ = ["PyramidKV", "PyramidKVConfig", "layer_budgets"]


@dataclass(frozen=True)
class PyramidKVConfig(PolicyConfig):
    name: ClassVar[str] = "pyramidkv"
    window: int = 8
    kernel: int = 7
    pool: str = "max"
    beta: float = 20.0  # bottom-to-top steepness: the top layer gets 1/beta of the average

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.window < 1:
            raise SpecError(f"pyramidkv: window must be >= 1 query, got {self.window}")
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise SpecError(f"pyramidkv: kernel must be an odd integer >= 1, got {self.kernel}")
        if self.pool not in ("max", "avg"):
            raise SpecError(f"pyramidkv: pool must be 'max' or 'avg', got {self.pool!r}")
        if self.beta < 1.0:
            raise SpecError(f"pyramidkv: beta must be >= 1 (1 = uniform top and bottom), got {self.beta}")
        if self.budget is not None and self.budget <= self.window:
            raise SpecError(
                f"pyramidkv: budget={self.budget} must exceed the observation window={self.window}, "
                "which is always kept"
            )


def layer_budgets(
    uniform: torch.Tensor, n: torch.Tensor, window: int, beta: float, n_layers: int
) -> torch.Tensor:
    """``[B, L]`` tokens each layer keeps per head, for ``uniform`` ``[B]`` kept under a uniform
    budget and ``n`` ``[B]`` tokens held. Sums to ``L * uniform`` per row (where a pyramid applies)."""
    a = (uniform - window).double()  # non-window budget of the average layer
    top = a / beta
    bottom = 2 * a - top
    clamp = bottom >= (n - window).double()
    bottom = torch.where(clamp, (n - window).double(), bottom)
    top = torch.where(clamp, 2 * a - bottom, top)
    step = (bottom - top) / max(n_layers - 1, 1)
    i = torch.arange(n_layers + 1, dtype=torch.float64, device=uniform.device)
    cum = i * bottom[:, None] - step[:, None] * i * (i - 1) / 2  # kept by layers < i, before rounding
    per_layer = window + torch.diff(torch.round(cum), dim=-1).long()
    pyramid = (a > 0) & (n >= 2 * a) & (n_layers > 1)
    return torch.where(pyramid[:, None], per_layer, uniform[:, None].expand(-1, n_layers))


@register_policy(PyramidKVConfig)
class PyramidKV(SnapKV):
    config: PyramidKVConfig  # type: ignore[assignment]

    def on_prefill(self, view: LayerView) -> Decision | None:
        c = self.config
        if c.budget is not None and not bool((view.live.sum(-1) > c.budget).any()):
            n = int(view.live.sum(-1).max())
            raise SpecError(
                f"pyramidkv: budget={c.budget} is not smaller than the {n} tokens held after the prompt, so "
                "nothing would be evicted; use a smaller budget or ratio="
            )
        return super().on_prefill(view)

    def kept_per_row(self, view: LayerView) -> torch.Tensor:
        uniform = super().kept_per_row(view)
        c = self.config
        return layer_budgets(uniform, view.seen_valid, c.window, c.beta, view.n_layers)[:, view.layer_idx]
