"""The compiled CPU scan (numba) against the PyTorch gather/scatter form of the same lookups."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvshrink.cache.lut import PackedKeys, PackedValues
from kvshrink.kernels.lut_cpu import available

pytestmark = pytest.mark.skipif(not available(), reason="numba not importable")


def _codes(b, h, t, m, n, k, seed):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, n, (b, h, t, m), generator=g) + torch.arange(m) * n
    norm = torch.rand(b, h, t, generator=g) + 0.5
    book = torch.randn(n, k, generator=g)
    return idx, norm, book


@settings(max_examples=25, deadline=None)
@given(
    b=st.integers(1, 2),
    h=st.integers(1, 3),
    r=st.integers(1, 4),
    t=st.integers(0, 70),
    k=st.sampled_from([2, 4, 8]),
    n=st.sampled_from([4, 32, 256]),
    pad=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_compiled_matches_torch(b, h, r, t, k, n, pad, seed) -> None:
    d = 16 - (k // 2 if pad else 0)  # pad: the last block is partly zero padding
    m = -(-d // k)
    idx, norm, book = _codes(b, h, t, m, n, k, seed)
    keys, values = PackedKeys(idx, norm, book, d), PackedValues(idx, norm, book, d)
    g = torch.Generator().manual_seed(seed + 1)
    q = torch.randn(b, h, r, d, generator=g)
    p = torch.softmax(torch.randn(b, h, r, t, generator=g), -1) if t else torch.zeros(b, h, r, 0)
    p[..., ::3] = 0.0  # masked tokens
    want, got = keys.scores(q, compiled=False), keys.scores(q, compiled=True)
    assert got.shape == want.shape == (b, h, r, t)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    want, got = values.weighted(p, compiled=False), values.weighted(p, compiled=True)
    assert got.shape == want.shape == (b, h, r, d)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_default_on_cpu_is_compiled() -> None:
    idx, norm, book = _codes(1, 2, 40, 4, 256, 4, 0)
    keys = PackedKeys(idx, norm, book, 16)
    q = torch.randn(1, 2, 3, 16)
    torch.testing.assert_close(keys.scores(q), keys.scores(q, compiled=True), rtol=0, atol=0)
