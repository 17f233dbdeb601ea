"""Codec.concat_tokens: joining blocks of consecutive tokens decodes like the blocks one by one."""

from __future__ import annotations

import pytest
import torch

from kvshrink.codecs import make_codec

JOINABLE = [
    "fp16",
    "int8",
    "int4:group=16",
    "turboquant:b=2",
    "turboquant:b=3,qjl=1",
    "fibquant:b=2,k=4",
    "fibquant:b=1.5,k=4",
    "fibquant:b=0.75,k=8",
]


@pytest.mark.parametrize("spec", JOINABLE)
@pytest.mark.parametrize("role", ["key", "value"])
def test_joined_blocks_decode_like_each_block(spec: str, role: str) -> None:
    codec = make_codec(spec)
    g = torch.Generator().manual_seed(3)
    blocks = [torch.randn(2, t, 64, generator=g) for t in (5, 1, 7)]
    packs = [codec.encode(x, role) for x in blocks]
    joined = codec.concat_tokens(packs)
    assert joined is not None
    assert joined.shape == (2, 13, 64)
    assert joined.nbytes() == sum(p.nbytes() for p in packs)
    ref = torch.cat([codec.decode(p, torch.float32) for p in packs], dim=-2)
    torch.testing.assert_close(codec.decode(joined, torch.float32), ref, rtol=1e-5, atol=1e-5)
    if hasattr(codec, "decode_rotated"):
        ref_r = torch.cat([codec.decode_rotated(p) for p in packs], dim=-2)
        torch.testing.assert_close(codec.decode_rotated(joined), ref_r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "spec", ["fibquant:b=2,sinks=1", "fibquant:b=2,window=2", "turboquant:b=2,center=1", "kivi:b=2"]
)
def test_blocks_with_per_block_state_are_not_joined(spec: str) -> None:
    codec = make_codec(spec)
    g = torch.Generator().manual_seed(4)
    packs = [codec.encode(torch.randn(1, 40, 64, generator=g), "key") for _ in range(2)]
    assert codec.concat_tokens(packs) is None


def test_mismatched_roles_or_shapes_are_not_joined() -> None:
    codec = make_codec("int4")
    x = torch.randn(2, 4, 64)
    assert codec.concat_tokens([codec.encode(x, "key"), codec.encode(x, "value")]) is None
    assert codec.concat_tokens([codec.encode(x, "key"), codec.encode(x[:1], "key")]) is None
