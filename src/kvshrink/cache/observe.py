"""What a forward's last queries did to every slot: the evidence a slot policy decides on.

A decode step's single query is captured inside the attention pass itself
(:meth:`OnlineSoftmax.captured_observation`); a prompt forward's observed queries need a second
walk over the chunks, tiled so that H2O and A2SF can observe every prompt query without a
``[queries x slots]`` matrix. Kept apart from :mod:`.layer`, which only decides when to observe.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..policies import UNIFORM, Observation, Policy
from .attention import OnlineSoftmax
from .segment import Segment

if TYPE_CHECKING:
    from .layer import CompressedLayer

__all__ = ["TILE", "observe_slots"]

TILE = 1 << 22  # score elements per (query rows x keys) tile in a prompt forward (16 MiB fp32)


def observe_slots(
    layer: CompressedLayer,
    policy: Policy,
    state: OnlineSoftmax,
    sources: list[Segment],
    qcols: torch.Tensor,
    n_obs: int,
    pad2d: torch.Tensor | None,
) -> Observation:
    """What the last ``n_obs`` queries (columns ``qcols``) did to every slot of ``sources``."""
    threshold = policy.hit_threshold()
    if qcols.numel() == 1:
        return Observation(*state.captured_observation(threshold))
    nq, r_first = qcols.numel(), qcols.numel() - n_obs
    decay = policy.query_decay()
    weights = None
    if decay != 1.0:  # w_r = decay ** (rows after r), in float64 so it underflows to exactly 0
        weights = (decay ** torch.arange(n_obs - 1, -1, -1, dtype=torch.float64)).float()
        weights = weights.to(qcols.device)
    counts = _visible(layer, sources, qcols[r_first:], pad2d) if threshold == UNIFORM else None
    sums: list[list[torch.Tensor]] = [[], [], []]
    for k, _, seg, rot in layer._chunks(sources, state.basis is not None):
        piece = [torch.zeros(layer.batch, layer.heads, seg.size, device=qcols.device) for _ in range(3)]
        rows = max(1, TILE // max(1, layer.batch * layer.heads * state.shape[2] * seg.size))
        for r0 in range(r_first, nq, rows):  # tiled: H2O and A2SF observe every prompt query
            r1 = min(nq, r0 + rows)
            allowed, skip = layer._mask(seg, qcols[r0:r1], pad2d)
            if skip:
                continue
            w = None if weights is None else weights[r0 - r_first : r1 - r_first]
            theta = threshold if counts is None else 1.0 / counts[..., r0 - r_first : r1 - r_first]
            theta_ = None if threshold is None else theta
            got = state.observe(k, allowed, r0, r1, w, theta_, rot)  # type: ignore[arg-type]
            for acc, value in zip(piece, got):
                if value is not None:
                    acc += value
        for out, value in zip(sums, piece):
            out.append(value)
    mass, hits, seen = (torch.cat(parts, dim=-1) for parts in sums)
    return Observation(mass, None, None) if threshold is None else Observation(mass, hits, seen)


def _visible(
    layer: CompressedLayer, sources: list[Segment], qcols: torch.Tensor, pad2d: torch.Tensor | None
) -> torch.Tensor:
    """``[B, Hkv, Q]``: how many slots each query column may attend (at least 1)."""
    counts = torch.zeros(layer.batch, layer.heads, qcols.numel(), device=qcols.device)
    for seg in sources:
        rows = max(1, TILE // max(1, layer.batch * layer.heads * seg.size))
        for r0 in range(0, qcols.numel(), rows):
            r1 = min(qcols.numel(), r0 + rows)
            allowed, skip = layer._mask(seg, qcols[r0:r1], pad2d)
            if skip:
                continue
            counts[..., r0:r1] += seg.size if allowed is None else allowed.sum(-1)
    return counts.clamp_min(1)
