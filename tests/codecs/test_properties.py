"""Property tests for the baseline codecs: rate, error ordering, exact decode, exact sizes."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvshrink.codecs import make_codec

from ..conftest import gaussian_kv


def _rel_err(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(((x - y) ** 2).sum() / (x**2).sum())


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), t=st.integers(1, 300), d=st.sampled_from([32, 64, 96, 128]))
def test_error_shrinks_as_bits_grow(seed: int, t: int, d: int) -> None:
    x = gaussian_kv(seed, (1, 2, t, d))
    errs = [_rel_err(x, make_codec(s).roundtrip(x)[0]) for s in ("int4", "int8", "fp16")]
    assert errs[0] > errs[1] > errs[2]


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), role=st.sampled_from(["key", "value"]))
def test_kivi_4_beats_kivi_2(seed: int, role: str) -> None:
    x = gaussian_kv(seed, (2, 2, 256, 64))
    e2 = _rel_err(x, make_codec("kivi:b=2,residual=0").roundtrip(x, role)[0])
    e4 = _rel_err(x, make_codec("kivi:b=4,residual=0").roundtrip(x, role)[0])
    assert e4 < e2 / 8


@pytest.mark.parametrize(
    ("spec", "bits"),
    [("int8", 8 + 16 / 32), ("int8:group=0", 8 + 16 / 64), ("int4", 4 + 16 / 32), ("int4:group=16", 4 + 1)],
)
def test_exact_size_per_token(spec: str, bits: float) -> None:
    x = gaussian_kv(0, (3, 5, 64))
    packed = make_codec(spec).encode(x)
    assert packed.bits_per_element() == pytest.approx(bits)


def test_kivi_exact_size() -> None:
    # 2-bit codes + fp16 scale and min per group of 32; keys: 256 quantized, values: last 128 fp16
    x = gaussian_kv(0, (1, 1, 300, 64))
    c = make_codec("kivi:b=2")
    pk, pv = c.encode(x, "key"), c.encode(x, "value")
    assert pk.nbytes() == 256 * 64 * 2 // 8 + 2 * (256 // 32) * 64 * 2 + 44 * 64 * 2
    assert pv.nbytes() == 172 * 64 * 2 // 8 + 2 * 172 * 2 * 2 + 128 * 64 * 2


def test_representable_inputs_decode_exactly() -> None:
    # integers times a power-of-two scale are exactly representable by int8 absmax
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(-127, 128, (4, 9, 64), generator=g).float()
    codes[..., 0] = 127.0  # pins the absmax so the scale is exactly 1/8
    x = codes / 8
    assert torch.equal(make_codec("int8:group=0").roundtrip(x)[0], x)
    # KIVI recovers inputs that sit on its per-group grid
    lv = torch.randint(0, 4, (1, 1, 64, 64), generator=g).float()
    lv[..., 0, :], lv[..., 1, :] = 0.0, 3.0  # every key-channel group spans the full range
    lv[..., 32, :], lv[..., 33, :] = 0.0, 3.0
    assert torch.equal(make_codec("kivi:b=2,residual=0").roundtrip(lv, "key")[0], lv)


def test_kivi_keeps_recent_tokens_exact_in_fp16() -> None:
    x = gaussian_kv(3, (1, 2, 200, 64)).half().float()
    y = make_codec("kivi:b=2").roundtrip(x, "value")[0]
    assert torch.equal(y[..., -128:, :], x[..., -128:, :])
    assert not torch.equal(y[..., :72, :], x[..., :72, :])
