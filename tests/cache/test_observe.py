"""Per-slot policy state kept by CompressedLayer against a dense softmax reference.

The cache observes queries chunk by chunk and tile by tile (packed blocks decoded, left padding,
GQA groups); the reference builds every probability at once in float64 from what the layer
holds, averages each KV group's query heads and applies the policy's rule by hand: A2SF's
decayed sum, Scissorhands' decayed above-uniform count, LazyEviction's recurrence tracking.
Budgets are large so nothing is evicted and slots keep their order.
"""

from __future__ import annotations

import math

import pytest
import torch

from kvshrink.cache.attention import allowed_mask
from kvshrink.cache.layer import CompressedLayer

from .test_layer import held, make_layer

B, HK, GRP, D = 2, 2, 3, 32
SCALING = D**-0.5


def forward(
    layer: CompressedLayer, n: int, mask: torch.Tensor, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward of ``n`` tokens: group-averaged probabilities and allowed pairs ``[B, HK, n, N]``."""
    q = torch.randn(B, HK * GRP, n, D, generator=g)
    k = torch.randn(B, HK, n, D, generator=g)
    v = torch.randn(B, HK, n, D, generator=g)
    start = layer.seen
    if layer.window is not None or layer.blocks:
        hk, _, hp = held(layer)
    else:
        hk, hp = torch.zeros(B, HK, 0, D), torch.zeros(B, HK, 0, dtype=torch.int32)
    layer.update(k, v)
    cols = torch.arange(start, start + n, dtype=torch.int32).view(1, 1, n).expand(B, HK, n)
    pos = torch.cat([hp, cols.masked_fill(~mask[:, None, start : start + n], -1)], -1)
    allowed = allowed_mask(pos, torch.arange(start, start + n), None, mask[:, : start + n])
    keys = torch.cat([hk, k.float()], 2).repeat_interleave(GRP, 1).double()
    s = (q.double() @ keys.transpose(-1, -2)) * SCALING
    s = s.masked_fill(~allowed.repeat_interleave(GRP, 1), -math.inf)
    p = torch.softmax(s, -1).nan_to_num(0.0)
    layer.attend(q, SCALING, mask[:, : start + n], True)
    return p.view(B, HK, GRP, n, -1).mean(2), allowed.expand(B, HK, n, -1)


def state(layer: CompressedLayer) -> torch.Tensor:
    return torch.cat([s.acc for s in layer.segments()], -1).double()  # type: ignore[misc]


def grow(x: torch.Tensor, n: int) -> torch.Tensor:
    return torch.cat([x, torch.zeros(*x.shape[:-1], n, dtype=x.dtype)], -1)


def lengths(prompt: int = 70, decode: int = 12) -> list[int]:
    return [prompt] + [1] * decode


MASK = torch.ones(B, 90, dtype=torch.bool)
MASK[1, :9] = False  # left padding of row 1


@pytest.mark.parametrize("tile", [1 << 22, 150], ids=["one-tile", "tiled"])
def test_a2sf_state_is_the_decayed_attention_sum(tile: int, monkeypatch) -> None:
    import kvshrink.cache.layer as layer_module
    import kvshrink.cache.observe as observe_module

    monkeypatch.setattr(layer_module, "TILE", tile)
    monkeypatch.setattr(observe_module, "TILE", tile)
    alpha = 0.9
    layer = make_layer(f"a2sf:budget=1000,alpha={alpha}+fp16", window=8, block=16, chunk=24)
    g = torch.Generator().manual_seed(1)
    ref = torch.zeros(B, HK, 0, dtype=torch.float64)
    for n in lengths():
        p, _ = forward(layer, n, MASK, g)
        w = alpha ** torch.arange(n - 1, -1, -1, dtype=torch.float64)
        ref = grow(ref, n) * alpha**n + (p * w[:, None]).sum(-2)
    assert layer.blocks, "some slots must have been packed"
    torch.testing.assert_close(state(layer)[0], ref, atol=1e-5, rtol=1e-4)


def test_scissorhands_state_counts_above_uniform_attention() -> None:
    window = 5
    layer = make_layer(f"scissorhands:budget=1000,window={window}+fp16", window=8, block=16, chunk=24)
    gamma = 1 - 1 / window
    g = torch.Generator().manual_seed(2)
    ref = torch.zeros(2, B, HK, 0, dtype=torch.float64)
    for n in lengths():
        p, allowed = forward(layer, n, MASK, g)
        nobs = min(window, n)  # the last queries of a prompt, each decode query
        p, seen_by = p[:, :, -nobs:], allowed[:, :, -nobs:]
        t = seen_by.sum(-1, keepdim=True).clamp_min(1)
        w = (gamma ** torch.arange(nobs - 1, -1, -1, dtype=torch.float64))[:, None]
        hits = ((p >= 1.0 / t) & seen_by).double()
        ref = grow(ref, n) * gamma**n + torch.stack([(hits * w).sum(-2), (seen_by.double() * w).sum(-2)])
    torch.testing.assert_close(state(layer), ref, atol=1e-5, rtol=1e-5)
    assert float(state(layer)[0].max()) > 0, "some slot must have been important"


def test_lazyeviction_state_tracks_last_importance_and_longest_gap() -> None:
    alpha = 0.02
    layer = make_layer(f"lazyeviction:budget=1000,window=4,alpha={alpha}+fp16", window=8, block=16, chunk=24)
    g = torch.Generator().manual_seed(3)
    last = torch.zeros(B, HK, 0, dtype=torch.float64)
    mri = torch.zeros(B, HK, 0, dtype=torch.float64)
    for n in lengths(decode=20):
        p, _ = forward(layer, n, MASK, g)
        now = layer.seen - 1
        last, mri = grow(last, n), grow(mri, n)
        last[..., -n:] = now if n > 1 else now - 1  # the prompt's end / the step before the token
        if n == 1:  # the code's TempCache.record_recurrence, one decode step
            important = p[:, :, 0] >= alpha
            mri = torch.where(important, torch.maximum(mri, now - last), mri)
            last = torch.where(important, torch.full_like(last, now), last)
    pad = torch.cat([s.full_pos(B, HK) for s in layer.segments()], -1) < 0
    got = state(layer).masked_fill(pad, 0.0)
    torch.testing.assert_close(got, torch.stack([last, mri]).masked_fill(pad, 0.0))
    assert float(mri.max()) > 1, "some token must have recurred after a gap"
