"""TurboQuant: the paper's distortion, exact byte accounting, QJL unbiasedness, rotated-basis decode."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvshrink.codecs import make_codec
from kvshrink.codecs.turboquant import TurboQuantCodec
from kvshrink.core import InputError, SpecError

from ..conftest import gaussian_kv
from .specs_rotated import codeword_input, unit_mse, unit_vectors


@pytest.mark.parametrize("b,ref", [(1, 0.360), (2, 0.115), (3, 0.0334)])
def test_unit_vector_mse_matches_codecs_md(b: int, ref: float) -> None:
    """codecs.md §1.5 (d=64): 0.360 / 0.115 / 0.0334 for b=1/2/3."""
    assert unit_mse(f"turboquant:b={b}") == pytest.approx(ref, rel=0.03)


def test_error_falls_as_bits_rise() -> None:
    x = gaussian_kv(0, (2, 2, 129, 64))
    errs = []
    for b in (1, 2, 3, 4):
        codec = make_codec(f"turboquant:b={b}")
        errs.append(float((codec.decode(codec.encode(x)) - x).pow(2).mean()))
    assert all(a > 2.5 * b for a, b in itertools.pairwise(errs))  # ~4x per bit (the 4^-b law)


@pytest.mark.parametrize("spec", ["turboquant:b=1", "turboquant:b=3", "turboquant:b=4,qjl=1"], ids=str)
def test_bytes_are_exactly_rate_plus_norm(spec: str) -> None:
    codec = make_codec(spec)
    assert isinstance(codec, TurboQuantCodec)
    lead, t, d = (2, 3), 37, 64
    packed = codec.encode(gaussian_kv(1, (*lead, t, d)))
    b = codec.config.b
    per_token = math.ceil(d * b / 8) + 2 + (2 if codec.config.qjl else 0)  # codes (+ signs) + fp16 norm(s)
    assert packed.nbytes() == math.prod(lead) * t * per_token
    assert codec.rate_bits() == b
    assert packed.bits_per_element() == pytest.approx(b + (16 + 16 * codec.config.qjl) / d)


@pytest.mark.parametrize("b", [2, 3, 4])
def test_inputs_built_from_levels_decode_exactly(b: int) -> None:
    codec = make_codec(f"turboquant:b={b}")
    assert isinstance(codec, TurboQuantCodec)
    idx = torch.randint(0, 2**b, (5, 64))
    assert torch.equal(codec.quantize(codec.dequantize(idx, 64), 64), idx)
    x, want, eps = codeword_input(codec, 64, "key", seed=b)
    assert eps < 3e-3
    packed = codec.encode(x)
    assert torch.equal(codec.quantize(codec.rotation(64).apply(x / x.norm()), 64), want)
    assert float(packed.tensors["norm"]) == 3.0
    assert torch.allclose(codec.decode(packed), x, rtol=0, atol=3.0 * eps + 1e-5)


def test_qjl_makes_inner_products_unbiased() -> None:
    """Regress ⟨q,x̂⟩ on ⟨q,x⟩: slope 1 with the QJL sketch, 1-D (shrinkage) without."""
    d, n = 64, 6000
    x = unit_vectors(1, n, d)
    q = 3 * x + torch.randn(n, d, generator=torch.Generator().manual_seed(2))
    true = (q * x).sum(-1)

    def slope(spec: str) -> float:
        codec = make_codec(spec)
        est = (q * codec.decode(codec.encode(x[None]))[0]).sum(-1)
        return float((est * true).sum() / (true * true).sum())

    assert slope("turboquant:b=2,qjl=1") == pytest.approx(1.0, abs=0.02)
    assert slope("turboquant:b=3,qjl=1") == pytest.approx(1.0, abs=0.02)
    assert slope("turboquant:b=1") == pytest.approx(1 - 0.360, abs=0.02)  # 2/π shrinkage
    assert slope("turboquant:b=2") == pytest.approx(1 - 0.115, abs=0.02)


@settings(max_examples=12, deadline=None)
@given(
    b=st.integers(1, 4),
    rot=st.sampled_from(["haar", "hadamard"]),
    t=st.integers(1, 40),
    sinks=st.integers(0, 5),
    window=st.integers(0, 9),
    center=st.booleans(),
    qjl=st.booleans(),
    role=st.sampled_from(["key", "value"]),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
)
def test_round_trip_random_access_rotated_basis(
    b: int, rot: str, t: int, sinks: int, window: int, center: bool, qjl: bool, role: str, dtype: torch.dtype
) -> None:
    qjl = qjl and b > 1
    spec = f"turboquant:b={b},rot={rot},sinks={sinks},window={window},center={int(center)},qjl={int(qjl)}"
    codec = make_codec(spec)
    assert isinstance(codec, TurboQuantCodec)
    x = gaussian_kv(t, (2, 1, t, 32), dtype)
    packed = codec.encode(x, role)  # type: ignore[arg-type]
    y = codec.decode(packed)
    assert y.shape == x.shape and y.dtype == dtype
    s, w = packed.meta["sinks"], packed.meta["window"]
    assert s + packed.meta["coded"] + w == t
    assert torch.equal(y[..., :s, :], x[..., :s, :].half().to(dtype))  # sinks/window kept exactly
    assert torch.equal(y[..., t - w :, :], x[..., t - w :, :].half().to(dtype))
    idx = torch.randint(-t, t, (7,), generator=torch.Generator().manual_seed(t))
    assert torch.equal(codec.decode_tokens(packed, idx), y[..., idx, :])
    q = torch.randn(3, 32)
    ref = q @ codec.decode(packed, torch.float32).transpose(-1, -2)
    rotated = codec.rotate_query(q) @ codec.decode_rotated(packed).transpose(-1, -2)
    assert torch.allclose(rotated, ref, atol=1e-3 * float(x.float().abs().max()) + 1e-4)


def test_center_and_key_value_rates() -> None:
    x = gaussian_kv(3, (1, 2, 200, 64)) + 4.0 * torch.randn(1, 2, 1, 64)  # a shared offset per head
    plain, centered = make_codec("turboquant:b=2"), make_codec("turboquant:b=2,center=1")
    err = [float((c.decode(c.encode(x)) - x).pow(2).mean()) for c in (plain, centered)]
    assert err[1] < 0.5 * err[0]
    packed = centered.encode(x, "key")
    assert packed.tensors["mean"].shape == (1, 2, 1, 64) and packed.tensors["mean"].dtype == torch.float32
    assert "mean" not in centered.encode(x, "value").tensors  # keys only
    mixed = make_codec("turboquant:b=2,kb=4,vb=1")
    assert mixed.encode(x, "key").tensors["codes"].shape[-1] == 32
    assert mixed.encode(x, "value").tensors["codes"].shape[-1] == 8
    assert mixed.shared_nbytes(64) == 4 * 64 * 64 + 4 * (16 + 2)  # Π + both tables


def test_fibquant_k1_is_turboquant() -> None:
    x = gaussian_kv(4, (1, 3, 50, 64))
    tq, fq = make_codec("turboquant:b=2"), make_codec("fibquant:b=2,k=1")
    assert torch.equal(tq.decode(tq.encode(x)), fq.decode(fq.encode(x)))


def test_bad_specs_and_inputs() -> None:
    with pytest.raises(SpecError, match="b must be one of 1, 2, 3, 4, got 5"):
        make_codec("turboquant:b=5")
    with pytest.raises(SpecError, match="qjl=1 spends one bit"):
        make_codec("turboquant:b=1,qjl=1")
    with pytest.raises(SpecError, match="rot must be one of haar, hadamard"):
        make_codec("turboquant:b=2,rot=dct")
    with pytest.raises(SpecError, match="window must be >= 0"):
        make_codec("turboquant:b=2,window=-1")
    with pytest.raises(InputError, match=r"power-of-two head dim, got 96; use rot=haar"):
        make_codec("turboquant:b=2,rot=hadamard").encode(torch.ones(1, 4, 96))
    with pytest.raises(InputError, match="fp16 range"):
        make_codec("turboquant:b=2").encode(torch.full((1, 2, 64), 1e5))
    assert str(make_codec("turboquant:b=2,kb=2").config) == "turboquant:b=2"  # canonical


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    codec = make_codec("turboquant:b=3,center=1,sinks=2,window=4")
    x = gaussian_kv(5, (2, 2, 65, 64))
    cpu = codec.decode(codec.encode(x, "key"))
    gpu = codec.decode(codec.encode(x.cuda(), "key"))
    assert torch.allclose(gpu.cpu(), cpu, atol=1e-4)
