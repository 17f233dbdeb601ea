"""Reading rotation-codec blocks in the rotated basis gives the same attention as decoding them."""

from __future__ import annotations

import pytest
import torch

from kvshrink.cache.attention import OnlineSoftmax
from kvshrink.codecs import make_codec

from .test_layer import make_layer


def test_online_softmax_rotated_chunks_equal_plain_chunks() -> None:
    codec = make_codec("fibquant:b=2,k=4")
    rot = codec.rotation(64)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 6, 3, 64, generator=g)
    ks = [torch.randn(2, 2, t, 64, generator=g) for t in (9, 4, 11)]
    vs = [torch.randn(2, 2, t, 64, generator=g) for t in (9, 4, 11)]
    plain = OnlineSoftmax(q, 2, 0.125, 64)
    mixed = OnlineSoftmax(q, 2, 0.125, 64, basis=rot)
    for i, (k, v) in enumerate(zip(ks, vs)):
        plain.update(k, v, None, 0, 3)
        if i % 2 == 0:  # chunks 0 and 2 in the rotated basis, chunk 1 plain
            mixed.update(rot.apply(k), rot.apply(v), None, 0, 3, rotated=True)
        else:
            mixed.update(k, v, None, 0, 3)
    torch.testing.assert_close(mixed.result(), plain.result(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "spec",
    [
        "fibquant:b=2",
        "turboquant:b=3",
        "fibquant:b=1.5,k=4",
        "fibquant:b=1,k=6,pad=1",
        "turboquant:b=3,qjl=1",
    ],
)
def test_layer_reads_rotated_blocks_like_decoded_blocks(spec: str) -> None:
    """The same layer state read both ways agrees closely: a decode query goes through table
    lookups (or rotated decoding, for QJL), the reference decodes every block."""
    g = torch.Generator().manual_seed(1)
    layer = make_layer(spec, window=8, block=16)
    k = torch.randn(1, 3, 70, 64, generator=g)
    v = torch.randn(1, 3, 70, 64, generator=g)
    layer.update(k, v)
    layer.attend(torch.randn(1, 9, 70, 64, generator=g), 0.125, None, False)
    assert len(layer.blocks) >= 3
    q = torch.randn(1, 9, 1, 64, generator=g)
    kn, vn = torch.randn(1, 3, 1, 64, generator=g), torch.randn(1, 3, 1, 64, generator=g)
    import copy

    other = copy.deepcopy(layer)
    other._basis = lambda dq, dv: None  # type: ignore[method-assign]  # the decode-everything path
    layer.update(kn, vn)
    other.update(kn, vn)
    fast = layer.attend(q, 0.125, None, False)
    slow = other.attend(q, 0.125, None, False)
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-5)


def test_lookup_scores_and_values_equal_decoded_attention() -> None:
    from kvshrink.cache.lut import lut_group

    layer = make_layer("fibquant:b=1,k=6,pad=1,kb=1.5", window=4, block=8)
    g = torch.Generator().manual_seed(5)
    layer.update(torch.randn(2, 3, 40, 64, generator=g), torch.randn(2, 3, 40, 64, generator=g))
    layer.attend(torch.randn(2, 9, 40, 64, generator=g), 0.125, None, False)
    codec = layer.codec
    keys, values = lut_group(codec, layer.blocks)
    kr = torch.stack(
        [torch.cat([codec.decode_rotated(s.keys[r]) for s in layer.blocks], -2) for r in range(2)]
    )
    vr = torch.stack(
        [torch.cat([codec.decode_rotated(s.values[r]) for s in layer.blocks], -2) for r in range(2)]
    )
    q = torch.randn(2, 3, 5, 64, generator=g)
    torch.testing.assert_close(keys.scores(q), q @ kr.transpose(-1, -2), rtol=1e-4, atol=1e-4)
    p = torch.rand(2, 3, 5, kr.shape[2], generator=g)
    torch.testing.assert_close(values.weighted(p), p @ vr, rtol=1e-4, atol=1e-4)
