"""Hand-built layer views for policy unit tests (no cache, no model)."""

from __future__ import annotations

import torch

from kvshrink.policies import LayerView


def view(
    n: int = 20,
    *,
    pad: int = 0,
    heads: int = 2,
    scores: torch.Tensor | None = None,
    state: torch.Tensor | None = None,
    n_new: int | None = None,
    layer_idx: int = 0,
    n_layers: int = 1,
    step: int = 0,
) -> LayerView:
    """Batch of 2 rows x ``heads`` KV heads holding columns ``0..n-1``; row 1 has ``pad`` leading
    empty slots (left padding). ``n_new`` defaults to ``n`` (a prompt)."""
    pos = torch.arange(n).view(1, 1, n).repeat(2, heads, 1)
    pos[1, :, :pad] = -1
    seen_valid = torch.tensor([n, n - pad])
    return LayerView(layer_idx, pos, scores, seen_valid, n if n_new is None else n_new, n_layers, state, step)


def kept(keep: torch.Tensor, v: LayerView, b: int, h: int) -> list[int]:
    """Columns that row ``b``, head ``h`` keeps."""
    return v.positions[b, h][keep[b, h]].tolist()
