"""One CompressedLayer against dense attention over what it holds (decoded), for every codec.

The reference is attention over ``decode(encode(block))`` for packed slots and the raw window,
masked from the slot positions: what the layer *should* compute, codec error included. It
checks the chunked read, the masks (padding, sliding windows, empty slots) and eviction.
"""

from __future__ import annotations

import pytest
import torch

from kvshrink.cache.attention import allowed_mask
from kvshrink.cache.config import parse_cache_spec
from kvshrink.cache.layer import CompressedLayer
from kvshrink.codecs import CODECS
from kvshrink.core import SpecError

from .test_attention import reference


def _codecs() -> list[str]:
    specs = []
    for name in CODECS.names():
        try:
            parse_cache_spec(name).build_codec()
        except SpecError:
            continue  # a codec without usable defaults
        specs.append(name)
    return specs


def make_layer(spec: str, sliding: int | None = None, **cache) -> CompressedLayer:
    parsed = parse_cache_spec(spec, **cache)
    return CompressedLayer(0, parsed.build_codec(), parsed.build_policy(), parsed.cache, sliding)


def held(layer: CompressedLayer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dense keys, values ``[B, Hkv, N, D]`` and positions ``[B, Hkv, N]`` of every slot."""
    ks, vs, ps = [], [], []
    for seg in layer.segments():
        k, v = seg.dense(layer.codec)
        ks.append(k)
        vs.append(v)
        ps.append(seg.full_pos(layer.batch, layer.heads))
    return torch.cat(ks, 2), torch.cat(vs, 2), torch.cat(ps, -1)


def step(layer: CompressedLayer, q, k, v, mask2d, scaling=0.125):
    """Run one forward through the layer and the reference; return both outputs."""
    layer.update(k, v)
    start = layer.seen - k.shape[2]
    if layer.blocks or layer.window is not None:
        hk, hv, hp = held(layer)
        hk, hv = torch.cat([hk, k.float()], 2), torch.cat([hv, v.float()], 2)
    else:
        hk, hv, hp = k.float(), v.float(), torch.empty(k.shape[0], k.shape[1], 0, dtype=torch.int32)
    cols = (
        torch.arange(start, layer.seen, dtype=torch.int32).view(1, 1, -1).expand(k.shape[0], k.shape[1], -1)
    )
    if mask2d is not None:
        cols = cols.masked_fill(~mask2d[:, None, start : layer.seen], -1)
    pos = torch.cat([hp, cols], -1)
    qcols = torch.arange(start, layer.seen)
    allowed = allowed_mask(pos, qcols, layer.sliding_window, mask2d)
    ref = reference(q, hk, hv, allowed, scaling).transpose(1, 2)
    pad = mask2d is not None and not bool(mask2d.all())
    out = layer.attend(q, scaling, mask2d, pad)
    return out, ref


def run(layer: CompressedLayer, prompt: int, decode: int, pad_rows: int = 0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    b, hk, grp, d = 2, 2, 3, 64
    total = prompt + decode
    mask = torch.ones(b, total, dtype=torch.bool)
    mask[1, :pad_rows] = False
    worst = 0.0
    for start, n in [(0, prompt)] + [(prompt + i, 1) for i in range(decode)]:
        q = torch.randn(b, hk * grp, n, d, generator=g)
        k = torch.randn(b, hk, n, d, generator=g)
        v = torch.randn(b, hk, n, d, generator=g)
        out, ref = step(layer, q, k, v, mask[:, : start + n] if pad_rows else None)
        assert torch.isfinite(out).all()
        worst = max(worst, float((out - ref).abs().max()))
    return worst


@pytest.mark.parametrize("codec", _codecs(), ids=str)
def test_layer_matches_dense_attention_over_what_it_holds(codec: str) -> None:
    layer = make_layer(codec, window=16, block=32, chunk=48)
    assert run(layer, prompt=150, decode=40, pad_rows=23) < 1e-4
    assert layer.blocks, "some tokens must have been packed"


def test_sliding_layer_drops_what_nobody_can_see() -> None:
    layer = make_layer("int8", sliding=50, window=8, block=16, chunk=32)
    assert run(layer, prompt=130, decode=30) < 1e-4
    assert layer.slots() <= 49 + 16 + 8  # sliding window - 1, one block of slack, the window
    assert min(b.lo for b in layer.blocks) > layer.seen - 50 - 16


@pytest.mark.parametrize(
    "spec",
    [
        "streamingllm:sinks=4,budget=40+int8",
        "h2o:budget=40+int8",
        "h2o:ratio=0.5+fp16",
        "snapkv:ratio=0.6+int4",
    ],
    ids=str,
)
def test_evicting_layer_matches_dense_attention_and_holds_its_budget(spec: str) -> None:
    layer = make_layer(spec, window=8, block=16, chunk=24)
    assert run(layer, prompt=90, decode=50, pad_rows=11) < 1e-4
    live = torch.cat([s.full_pos(2, 2) for s in layer.segments()], -1) >= 0
    if "budget=40" in spec:
        assert int(live.sum(-1).max()) <= 40
    assert layer.slots() < layer.seen  # slots were given back


def test_reorder_permutes_packed_rows_without_reencoding() -> None:
    layer = make_layer("int4", window=8, block=16)
    run(layer, prompt=70, decode=3)
    rows = [b.keys[1] for b in layer.blocks]  # type: ignore[index]
    layer.reorder_cache(torch.tensor([1, 1]))
    assert all(b.keys[0] is r and b.keys[1] is r for b, r in zip(layer.blocks, rows))  # type: ignore[index]


def test_small_score_tiles_give_the_same_result(monkeypatch) -> None:
    """Row tiling of prompt scores (and of H2O's observed mass) must not change anything."""
    import kvshrink.cache.layer as layer_module
    import kvshrink.cache.observe as observe_module

    results = []
    for tile in (1 << 22, 97):
        monkeypatch.setattr(layer_module, "TILE", tile)  # prompt attention
        monkeypatch.setattr(observe_module, "TILE", tile)  # H2O's observation pass
        layer = make_layer("h2o:budget=40+fp16", window=8, block=16, chunk=24)
        assert run(layer, prompt=90, decode=6, pad_rows=11) < 1e-4
        results.append(torch.cat([s.full_pos(2, 2) for s in layer.segments()], -1))
    assert torch.equal(results[0], results[1])  # same tokens kept
