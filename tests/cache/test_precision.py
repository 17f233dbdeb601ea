"""Precision policies inside a CompressedLayer: every token kept, bytes as predicted, exact codes.

A layer is driven by hand (update + attend, as the attention function does) on Gaussian keys
with outlier channels. Predictions come from the codecs themselves (bytes of one encoded token),
never from hard-coded sizes.
"""

from __future__ import annotations

import copy

import pytest
import torch

from kvshrink.cache.config import parse_cache_spec
from kvshrink.cache.layer import CompressedLayer
from kvshrink.codecs import make_codec
from kvshrink.core import SpecError

from ..conftest import gaussian_kv
from .test_layer import held, step

B, HK, G, D = 1, 2, 3, 64


def make(spec: str, **cache) -> CompressedLayer:
    p = parse_cache_spec(spec, **cache)
    return CompressedLayer(0, p.build_codec(), p.build_policy(), p.cache, None, low_codec=p.build_low_codec())


def prefill(layer: CompressedLayer, t: int, seed: int = 0, b: int = B):
    k = gaussian_kv(seed, (b, HK, t, D))
    v = gaussian_kv(seed + 1, (b, HK, t, D))
    q = gaussian_kv(seed + 2, (b, HK * G, t, D))
    out, ref = step(layer, q, k, v, None)
    return k, v, out, ref


def decode(layer: CompressedLayer, n: int, seed: int = 10, b: int = B) -> float:
    worst = 0.0
    for i in range(n):
        k = gaussian_kv(seed + 3 * i, (b, HK, 1, D))
        v = gaussian_kv(seed + 3 * i + 1, (b, HK, 1, D))
        q = gaussian_kv(seed + 3 * i + 2, (b, HK * G, 1, D))
        out, ref = step(layer, q, k, v, None)
        worst = max(worst, float((out - ref).abs().max()))
    return worst


def live_positions(segs, b: int = 0, h: int = 0) -> list[int]:
    pos = torch.cat([s.full_pos(B, HK) for s in segs], -1)[b, h]
    return sorted(pos[pos >= 0].tolist())


def per_token(spec: str, role: str) -> int:
    """Bytes one token of one head takes in ``spec`` (token-wise codecs scale linearly)."""
    return make_codec(spec).encode(gaussian_kv(0, (1, 4, D)), role).nbytes() // 4  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["mikv", "zipcache"])
def test_every_token_is_kept_and_bytes_drop_as_predicted(name: str) -> None:
    t, ratio = 200, 0.75
    layer = make(f"{name}:ratio={ratio},low=int4+int8", window=0, block=10)
    _, _, out, ref = prefill(layer, t)
    assert (out - ref).abs().max() < 1e-4
    assert live_positions(layer.segments()) == list(range(t))  # nothing removed
    n_high = -(-t // 4)
    assert live_positions(layer._main()) == live_positions(layer._main(), 0, 0)
    assert all(len(live_positions(layer._main(), 0, h)) == n_high for h in range(HK))
    assert all(len(live_positions(layer.low, 0, h)) == t - n_high for h in range(HK))
    packed = sum(seg.nbytes(set())[0] for seg in layer.segments())
    tok = {c: per_token(c, "key") + per_token(c, "value") for c in ("int8", "int4")}
    assert packed == HK * (n_high * tok["int8"] + (t - n_high) * tok["int4"])
    assert packed < HK * t * tok["int8"]


def test_salient_tokens_are_bit_exact_with_the_main_codec() -> None:
    t = 96
    layer = make("mikv:ratio=0.5,low=int4+fibquant:b=2", window=0, block=16)
    k, v, _, _ = prefill(layer, t)
    main, low = make_codec("fibquant:b=2"), make_codec("int4")
    for segs, codec in ((layer._main(), main), (layer.low, low)):
        for seg in segs:
            dk, dv = seg.dense(layer.codec)
            for h in range(HK):
                p = seg.pos[0, h].long()
                live = p >= 0
                want_k = codec.decode(codec.encode(k[0, h, p[live]], "key"), torch.float32)
                want_v = codec.decode(codec.encode(v[0, h, p[live]], "value"), torch.float32)
                assert torch.equal(dk[0, h, live], want_k)  # encoded once, from the exact values
                assert torch.equal(dv[0, h, live], want_v)


def test_decode_demotes_in_lag_runs_and_attention_matches_reference() -> None:
    layer = make("mikv:budget=40,lag=8,low=int4+int8", window=4, block=8)
    prefill(layer, 60)
    runs = len(layer.low)
    worst = decode(layer, 30)
    assert worst < 1e-4  # attention over what is held (two codecs) equals dense attention
    assert live_positions(layer.segments()) == list(range(90))
    assert len(layer.low) > runs  # decode demoted
    for h in range(HK):
        assert 40 <= len(live_positions(layer._main(), 0, h)) < 40 + 8


def test_low_runs_hold_no_scores() -> None:
    layer = make("mikv:ratio=0.5,low=int4+int8", window=0, block=8)
    prefill(layer, 64)
    decode(layer, 3)
    assert layer.low and all(seg.acc is None for seg in layer.low)
    assert all(seg.acc is not None for seg in layer._main())


def test_beam_reorder_and_deepcopy_keep_low_runs() -> None:
    layer = make("zipcache:ratio=0.5,low=int4+int8", window=4, block=8)
    prefill(layer, 48, b=2)
    decode(layer, 2, b=2)
    twin = copy.deepcopy(layer)
    layer._rows(torch.tensor([1, 0]))
    kl, vl, pl = held(layer)
    kt, vt, pt = held(twin)
    assert torch.equal(kl, kt.flip(0)) and torch.equal(vl, vt.flip(0)) and torch.equal(pl, pt.flip(0))
    decode(twin, 2, b=2)  # the copy moves on alone
    assert twin.seen == layer.seen + 2


@pytest.mark.parametrize(
    "spec,match",
    [
        ("mikv:ratio=0.5,low=int3+int8", "unknown codec 'int3'"),
        ("mikv:ratio=0.5,low=int8+int8", "is the main codec"),
        ("zipcache:ratio=0.5,low=[kivi:b=2,residual=64]+int8", "residual=64"),
    ],
)
def test_bad_low_codecs_raise_one_line(spec: str, match: str) -> None:
    with pytest.raises(SpecError, match=match) as err:
        parse_cache_spec(spec)
    assert "\n" not in str(err.value)


def test_low_codec_prints_back_canonically() -> None:
    spec = parse_cache_spec("mikv:ratio=0.75,low=[fibquant:k=8,b=1]+fibquant:b=2")
    assert str(spec) == "mikv:ratio=0.75,low=[fibquant:b=1,k=8]+fibquant:b=2,k=4"
    assert parse_cache_spec(str(spec)) == spec
