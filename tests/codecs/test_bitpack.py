from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvshrink.codecs.primitives.bitpack import pack_rows, row_bytes, unpack_rows


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(1, 20), n=st.integers(1, 70), rows=st.integers(1, 5), seed=st.integers(0, 2**31))
def test_roundtrip_any_width(bits: int, n: int, rows: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (rows, n), generator=g)
    packed = pack_rows(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (rows, row_bytes(n, bits))
    assert torch.equal(unpack_rows(packed, bits, n), codes)


def test_layout_is_little_endian_low_bits_first() -> None:
    # two 4-bit codes per byte, the first in the low nibble (kernels rely on this)
    assert pack_rows(torch.tensor([[0x3, 0xA]]), 4).tolist() == [[0xA3]]
    assert pack_rows(torch.tensor([[1, 2, 3, 0]]), 2).tolist() == [[0b00111001]]
    # a 3-bit stream straddles bytes: codes 5,6,7 -> bits 101 110 111 (LSB first) = 0b111110101
    assert pack_rows(torch.tensor([[5, 6, 7]]), 3).tolist() == [[0b11110101, 0b1]]


def test_rows_are_independent() -> None:
    codes = torch.randint(0, 8, (7, 13))
    packed = pack_rows(codes, 3)
    assert torch.equal(unpack_rows(packed[2:5], 3, 13), codes[2:5])


def test_empty_rows() -> None:
    for bits in (2, 3, 8):
        packed = pack_rows(torch.zeros(2, 0, 13, dtype=torch.long), bits)
        assert packed.shape == (2, 0, row_bytes(13, bits))
        assert unpack_rows(packed, bits, 13).shape == (2, 0, 13)
