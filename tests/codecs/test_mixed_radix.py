"""Mixed-radix index packing: exact round trip, near-ideal rate, fixed row length (random access)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvshrink.codecs.primitives.bitpack import pack_rows
from kvshrink.codecs.primitives.mixed_radix import (
    index_row_bytes,
    pack_indices,
    pack_radix,
    radix_layout,
    unpack_indices,
    unpack_radix,
)
from kvshrink.core import InputError


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 70), radix=st.integers(2, 70000), rows=st.integers(0, 5), seed=st.integers(0, 9))
def test_round_trip_and_rate(n: int, radix: int, rows: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, radix, (2, rows, n), generator=g)
    idx[..., 0] = radix - 1  # the largest digit must survive
    packed = pack_indices(idx, radix)
    assert packed.dtype == torch.uint8 and packed.shape == (2, rows, index_row_bytes(n, radix))
    assert torch.equal(unpack_indices(packed, radix, n), idx)
    # random access: a row packs the same alone as among others
    if rows:
        assert torch.equal(pack_indices(idx[:, -1:], radix), packed[:, -1:])
    lay = radix_layout(n, radix)
    ideal = n * math.log2(radix)
    # each integer is ceil(group·log2 N) bits; the padded last group wastes its empty digits
    waste = lay.groups + (lay.groups * lay.group - n) * math.log2(radix)
    assert ideal <= lay.row_bits <= ideal + waste + 1e-9
    assert lay.row_bits <= n * math.ceil(math.log2(radix))  # never worse than plain packing


@pytest.mark.parametrize(
    "n,radix,bits",
    [(11, 7, 31), (22, 7, 62), (128, 3, 204), (33, 5, 77), (16, 65535, 256), (10, 3, 16)],
    ids=str,
)
def test_known_layouts(n: int, radix: int, bits: int) -> None:
    """Within a bit or two of n·log2 N: 11 indices below 7 (FibQuant k=6, N=7, d=64) in 31 bits."""
    assert radix_layout(n, radix).row_bits == bits
    assert bits < n * math.log2(radix) + 2


@pytest.mark.parametrize("bits", range(1, 17))
@pytest.mark.parametrize("n", [1, 7, 32, 33])
def test_power_of_two_is_plain_bit_packing(bits: int, n: int) -> None:
    radix = 1 << bits
    idx = torch.randint(0, radix, (3, 17, n))
    packed = pack_indices(idx, radix)
    assert torch.equal(packed, pack_rows(idx, bits))
    assert torch.equal(unpack_indices(packed, radix, n), idx)
    # the raw mixed-radix path also handles it exactly
    assert torch.equal(unpack_radix(pack_radix(idx, radix), radix, n), idx)


def test_bad_layouts() -> None:
    with pytest.raises(InputError, match="base must be"):
        radix_layout(4, 1)
    with pytest.raises(InputError, match="at least one digit"):
        radix_layout(0, 7)
