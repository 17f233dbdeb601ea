"""FibQuant: spec grammar and errors, the codecs.md §1.5 distortions, exact bytes, exact decode."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvshrink.codecs import make_codec
from kvshrink.codecs.fibquant import FibQuantCodec
from kvshrink.codecs.primitives.mixed_radix import radix_layout
from kvshrink.core import InputError, SpecError

from ..conftest import gaussian_kv
from .specs_rotated import codeword_input, unit_mse


def _fq(spec: str) -> FibQuantCodec:
    codec = make_codec(spec)
    assert isinstance(codec, FibQuantCodec)
    return codec


# -- spec grammar --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "spec,canonical,n",
    [
        ("fibquant", "fibquant:b=2,k=4", 256),
        ("fibquant:k=4,n=256", "fibquant:b=2,k=4", 256),
        ("fibquant:b=0.5,k=8", "fibquant:b=0.5,k=8", 16),
        ("fibquant:b=1.25,k=4", "fibquant:b=1.25,k=4", 32),
        ("fibquant:k=6,n=7", "fibquant:k=6,n=7", 7),
        ("fibquant:b=1.3333333333333,k=3", "fibquant:k=3,n=16", 16),  # 4/3 has no short decimal
        ("fibquant:b=2,k=2,kb=2,vb=3", "fibquant:b=2,k=2,vb=3", 16),
    ],
    ids=str,
)
def test_canonical_specs(spec: str, canonical: str, n: int) -> None:
    codec = _fq(spec)
    assert str(codec.config) == canonical and codec.levels("key") == n
    assert make_codec(canonical).config == codec.config


@pytest.mark.parametrize(
    "spec,match",
    [
        (
            "fibquant:b=0.468,k=6",
            r"2\^\(k·b\) = 7\.003, not an integer; nearest valid: n=6 .*n=7 \(b≈0\.467892\)",
        ),
        ("fibquant:b=1.1,k=4", r"nearest valid: .*b=1 \(n=16\).*n=21"),
        ("fibquant:b=3,k=8", r"more than 65536; for k=8 use b <= 2"),
        ("fibquant:b=9,k=1", r"b must be in \(0, 8\]"),
        ("fibquant:b=0,k=4", r"b must be in \(0, 8\]"),
        ("fibquant:b=2,k=5", r"k must be one of 1, 2, 3, 4, 6, 8, got 5 \(nearest: 4, 6\)"),
        ("fibquant:k=4,n=1", r"n \(codebook size\) must be in 2\.\.65536"),
        ("fibquant:b=2,k=4,n=255", r"disagree at k=4 \(b gives n=256\)"),
        ("fibquant:b=2,k=4,dirs=lattice", r"dirs must be one of fib, random"),
        ("fibquant:b=2,k=4,kb=0.3", r"kb=0\.3 with k=4 gives N .* nearest valid"),
    ],
    ids=str,
)
def test_bad_specs_name_valid_choices(spec: str, match: str) -> None:
    with pytest.raises(SpecError, match=match) as err:
        make_codec(spec)
    assert "\n" not in str(err.value)


def test_k_must_divide_head_dim_unless_padded() -> None:
    x = gaussian_kv(0, (1, 2, 9, 66))
    with pytest.raises(
        InputError, match=r"k=4 does not divide head dim 66; valid k for d=66: 1, 2, 3, 6 \(or pad=1\)"
    ):
        _fq("fibquant:b=2,k=4").encode(x)
    codec = _fq("fibquant:b=2,k=4,pad=1")
    packed = codec.encode(x)
    assert packed.meta["pad"] == 2 and packed.meta["blocks"] == 17
    assert codec.decode(packed).shape == x.shape


# -- distortion ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "spec,ref,rel",
    [
        ("fibquant:b=2,k=4", 0.0955, 0.05),
        ("fibquant:b=2,k=2", 0.105, 0.05),
        ("fibquant:k=6,n=7,pad=1", 0.642, 0.05),
    ],
    ids=str,
)
def test_unit_vector_mse_matches_codecs_md(spec: str, ref: float, rel: float) -> None:
    """codecs.md §1.5 at d=64 (k=6, N=7 pads 64 to 66 here, so its last block is not a 6-block)."""
    assert unit_mse(spec) == pytest.approx(ref, rel=rel)


def test_vector_code_beats_scalar_and_error_falls_with_rate() -> None:
    assert unit_mse("fibquant:b=2,k=4") < 0.87 * unit_mse("turboquant:b=2")  # ≈17% below scalar
    errs = [unit_mse(f"fibquant:b={b},k=2", n=4096) for b in (1, 2, 3)]
    assert errs[0] > 2.5 * errs[1] > 2.5**2 * errs[2]


def test_ablations_are_worse() -> None:
    full = unit_mse("fibquant:b=2,k=2", n=4096)
    assert unit_mse("fibquant:b=2,k=2,lloyd=0", n=4096) > 1.05 * full
    assert unit_mse("fibquant:b=2,k=2,dirs=random,lloyd=0", n=4096) > 1.05 * full


# -- bytes ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "spec,d",
    [
        ("fibquant:b=2,k=4", 64),
        ("fibquant:b=1.25,k=4", 64),
        ("fibquant:k=6,n=7,pad=1", 64),
        ("fibquant:k=3,n=20", 48),
    ],
    ids=str,
)
def test_bytes_are_rate_plus_norm_plus_padding(spec: str, d: int) -> None:
    codec = _fq(spec)
    lead, t = (2, 3), 21
    packed = codec.encode(gaussian_kv(1, (*lead, t, d)))
    n, blocks = codec.levels("key"), codec.blocks(d)
    if n & (n - 1) == 0:  # fixed width: d/k·log2 N bits, rounded up to a byte
        row_bits = blocks * int(math.log2(n))
        assert packed.meta["bits"] == math.log2(n) and packed.meta["radix_width"] == 0
    else:  # mixed radix: within `groups` bits of d/k·log2 N (plus padded digits)
        lay = radix_layout(blocks, n)
        row_bits = lay.row_bits
        assert packed.meta["radix_width"] == lay.width and packed.meta["radix_group"] == lay.group
        assert row_bits <= blocks * math.log2(n) + lay.groups + (lay.groups * lay.group - blocks) * math.log2(
            n
        )
    assert codec.row_bytes(d) == math.ceil(row_bits / 8)
    assert packed.nbytes() == math.prod(lead) * t * (
        codec.row_bytes(d) + 2
    )  # codes + fp16 norm, nothing else


def test_options_are_counted() -> None:
    x = gaussian_kv(2, (1, 2, 100, 64))
    codec = _fq("fibquant:b=2,k=2,center=1,sinks=4,window=10,kb=3,vb=1")
    key, value = codec.encode(x, "key"), codec.encode(x, "value")
    coded = 100 - 4 - 10
    fp16_rows = 2 * (4 + 10) * 64 * 2
    assert (
        key.nbytes() == 2 * coded * (codec.row_bytes(64, "key") + 2) + fp16_rows + 2 * 64 * 4
    )  # + fp32 mean
    assert value.nbytes() == 2 * coded * (codec.row_bytes(64, "value") + 2) + fp16_rows
    assert codec.row_bytes(64, "key") == 24 and codec.row_bytes(64, "value") == 8  # 32 blocks × 6 / 2 bits
    assert codec.codebook(64, "key").shape == (64, 2) and codec.codebook(64, "value").shape == (4, 2)
    assert codec.shared_nbytes(64) == 4 * 64 * 64 + 4 * 2 * (64 + 4)  # Π + both codebooks


# -- exactness and random access -----------------------------------------------------------------
@pytest.mark.parametrize(
    "spec", ["fibquant:b=2,k=2", "fibquant:b=2,k=4", "fibquant:b=0.5,k=8", "fibquant:k=6,n=7"], ids=str
)
def test_codewords_quantize_to_themselves(spec: str) -> None:
    codec = _fq(spec)
    book = codec.codebook(66 if codec.k == 6 else 64)
    y = book.reshape(1, -1)[:, : (book.numel() // codec.k) * codec.k]
    d = 66 if codec.k == 6 else 64
    idx = torch.arange(book.shape[0])[None]
    assert torch.equal(codec.dequantize(codec.quantize(codec.dequantize(idx, d), d), d), y)


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 10_000), spec=st.sampled_from(["fibquant:b=2,k=2", "fibquant:b=2,k=4"]))
def test_inputs_built_from_codewords_decode_exactly(seed: int, spec: str) -> None:
    codec = _fq(spec)
    x, want, eps = codeword_input(codec, 64, "key", seed)
    assert eps < 1e-4
    packed = codec.encode(x)
    assert float(packed.tensors["norm"]) == 3.0  # exact in fp16
    got = codec.quantize(codec.rotation(64).apply(x / x.norm()), 64)
    assert torch.equal(codec.dequantize(got, 64), codec.dequantize(want, 64))
    assert torch.allclose(codec.decode(packed), x, rtol=0, atol=3.0 * eps + 1e-5)


@settings(max_examples=12, deadline=None)
@given(
    spec=st.sampled_from(
        [
            "fibquant:b=2,k=2",
            "fibquant:b=1,k=4,rot=hadamard",
            "fibquant:k=6,n=7,pad=1",
            "fibquant:b=2,k=2,kb=3,vb=1",
        ]
    ),
    t=st.integers(1, 40),
    sinks=st.integers(0, 5),
    window=st.integers(0, 9),
    center=st.booleans(),
    role=st.sampled_from(["key", "value"]),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
)
def test_round_trip_random_access_rotated_basis(
    spec: str, t: int, sinks: int, window: int, center: bool, role: str, dtype: torch.dtype
) -> None:
    codec = _fq(f"{spec},sinks={sinks},window={window},center={int(center)}")
    x = gaussian_kv(t, (3, t, 64), dtype)
    packed = codec.encode(x, role)  # type: ignore[arg-type]
    y = codec.decode(packed)
    assert y.shape == x.shape and y.dtype == dtype
    assert packed.tensors["codes"].dtype == torch.uint8 and packed.tensors["norm"].dtype == torch.float16
    assert packed.tensors["codes"].shape == (3, packed.meta["coded"], codec.row_bytes(64, role))  # type: ignore[arg-type]
    s, w = packed.meta["sinks"], packed.meta["window"]
    assert torch.equal(y[..., :s, :], x[..., :s, :].half().to(dtype))
    assert torch.equal(y[..., t - w :, :], x[..., t - w :, :].half().to(dtype))
    idx = torch.randint(-t, t, (9,), generator=torch.Generator().manual_seed(t))
    assert torch.equal(codec.decode_tokens(packed, idx), y[..., idx, :])
    q = torch.randn(4, 64)
    ref = q @ codec.decode(packed, torch.float32).transpose(-1, -2)
    rotated = codec.rotate_query(q) @ codec.decode_rotated(packed).transpose(-1, -2)
    assert torch.allclose(rotated, ref, atol=1e-3 * float(x.float().abs().max()) + 1e-4)


def test_few_tokens_and_empty_coded_part() -> None:
    codec = _fq("fibquant:b=2,k=2,sinks=4,window=8")
    x = gaussian_kv(3, (2, 5, 64))  # all five tokens are sinks and window
    packed = codec.encode(x, "key")
    assert packed.meta["coded"] == 0 and packed.tensors["codes"].shape == (2, 0, 16)
    assert torch.equal(codec.decode(packed), x.half().float())


@pytest.mark.parametrize(
    "spec", ["fibquant:b=2,k=4", "fibquant:b=1,k=8", "fibquant:b=3,k=2", "fibquant:k=6,n=7,pad=1"]
)
def test_kd_tree_search_equals_the_scan(spec: str) -> None:
    """The CPU fast path (exact k-d tree) returns the matmul scan's indices."""
    codec = make_codec(spec)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 3, 300, 64, generator=g)
    d = codec.blocks(64) * codec.k
    y = torch.nn.functional.pad(codec.rotation(64).apply(x / x.norm(dim=-1, keepdim=True)), (0, d - 64))
    assert torch.equal(codec.quantize(y, 64), codec.quantize_reference(y, 64))
