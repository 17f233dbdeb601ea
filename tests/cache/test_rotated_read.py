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


@pytest.mark.parametrize("spec", ["fibquant:b=2", "turboquant:b=3", "fibquant:b=1.5,k=4"])
def test_layer_reads_rotated_blocks_like_decoded_blocks(spec: str) -> None:
    """The same layer state read both ways (rotated basis on, forced off) agrees closely."""
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
