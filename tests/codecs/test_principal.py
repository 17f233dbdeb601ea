"""Key directions coded apart (``pca=``): the split, its stored form and bytes, errors, and that
it lowers the key error at equal bytes on keys shaped like real ones."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvshrink.codecs import make_codec
from kvshrink.codecs.primitives import principal
from kvshrink.core import InputError, SpecError

D = 64


def _keys(seed: int, t: int = 400, h: int = 2) -> torch.Tensor:
    """Keys with a large common direction and a few strong ones: most energy in 3 directions."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(D, D, generator=g))[0]
    spec = torch.ones(D)
    spec[:3] = torch.tensor([6.0, 4.0, 3.0])
    x = (torch.randn(1, h, t, D, generator=g) * spec) @ basis.T
    return x + 8.0 * basis[:, 0]


def _rel(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x - y).norm() / x.norm())


@pytest.mark.parametrize("base", ["fibquant:b={b},k=4", "turboquant:b={b}"])
def test_pca_lowers_the_key_error_at_equal_bytes(base: str) -> None:
    x = _keys(0)
    # FibQuant: 0.25 bit/coordinate of codes traded for the coefficients; TurboQuant has whole
    # bits only, so the same rate with and without the split (the split then costs 16 bits more)
    lo, hi = ("2.75", "3") if "fib" in base else ("2", "2")
    plain = make_codec(base.format(b=hi))
    split = make_codec(base.format(b=lo) + ",pca=2")
    pp, ps = plain.encode(x, "key"), split.encode(x, "key")
    if "fib" in base:  # equal bytes up to the stored basis
        assert ps.nbytes() <= pp.nbytes() + 2 * 2 * (2 * D + 2)
    e_plain, e_split = _rel(x, plain.decode(pp)), _rel(x, split.decode(ps))
    assert e_split < 0.8 * e_plain, (e_split, e_plain)


def test_stored_tensors_bytes_and_determinism() -> None:
    x = _keys(1, t=300)
    codec = make_codec("fibquant:b=2,k=4,pca=3,pcabits=4,sinks=2,window=5")
    base = make_codec("fibquant:b=2,k=4,sinks=2,window=5")
    p, q = codec.encode(x, "key"), base.encode(x, "key")
    tc = 300 - 2 - 5
    assert p.tensors["pu"].shape == (1, 2, 3, D) and p.tensors["pu"].dtype == torch.float16
    assert p.tensors["ps"].shape == (1, 2, 3) and p.tensors["ps"].dtype == torch.float16
    assert (
        p.tensors["pc"].shape == (1, 2, tc, 2) and p.tensors["pc"].dtype == torch.int8
    )  # 3 codes in 2 bytes
    per_head = 3 * D * 2 + 3 * 2 + tc * principal.nbytes_per_token(3, 4)
    assert p.nbytes() - q.nbytes() == 2 * per_head
    again = codec.encode(x, "key")
    for name, v in p.tensors.items():
        assert torch.equal(v, again.tensors[name]), name
    # sinks and window stay exact; random access agrees with the full decode
    full = codec.decode(p)
    assert torch.equal(full[..., :2, :], x[..., :2, :].half().float())
    idx = torch.tensor([0, 1, 2, 150, tc + 1, 299])
    assert torch.equal(codec.decode_tokens(p, idx), full[..., idx, :])


def test_values_are_not_split() -> None:
    x = _keys(2, t=64)
    a, b = make_codec("fibquant:b=2,k=4,pca=2"), make_codec("fibquant:b=2,k=4")
    pa, pb = a.encode(x, "value"), b.encode(x, "value")
    assert set(pa.tensors) == set(pb.tensors)
    for name in pa.tensors:
        assert torch.equal(pa.tensors[name], pb.tensors[name])


def test_rotated_decode_matches_the_rotated_query() -> None:
    """Kernels and the cache's online softmax read in the rotated basis: Πq·(rotated decode) = q·decode."""
    codec = make_codec("turboquant:b=2,pca=3,sinks=1,window=2")
    x = _keys(3, t=40)
    p = codec.encode(x, "key")
    q = torch.randn(5, D, generator=torch.Generator().manual_seed(1))
    want = q @ codec.decode(p).transpose(-1, -2)
    got = codec.rotate_query(q) @ codec.decode_rotated(p).transpose(-1, -2)
    torch.testing.assert_close(got, want, atol=2e-3 * float(want.abs().max()), rtol=0)


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("fibquant:b=2,k=4,pca=65", "pca .* must be in 0..64"),
        ("turboquant:b=2,pca=1,pcabits=6", "pcabits must be one of 4, 8"),
    ],
)
def test_bad_options_are_one_line_errors(spec: str, match: str) -> None:
    with pytest.raises(SpecError, match=match) as e:
        make_codec(spec)
    assert "\n" not in str(e.value)


def test_rank_at_head_dim_is_refused() -> None:
    codec = make_codec("fibquant:b=2,k=2,pca=8")
    with pytest.raises(InputError, match="pca=8 must be below the head dim 8"):
        codec.encode(torch.randn(1, 1, 16, 8), "key")


@settings(max_examples=40, deadline=None)
@given(
    rank=st.integers(1, 6),
    bits=st.sampled_from(principal.BITS),
    t=st.integers(0, 40),
    seed=st.integers(0, 2**16),
)
def test_split_then_decode_rebuilds_the_input(rank: int, bits: int, t: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, t, 16, generator=g) * torch.logspace(1, -1, 16)
    u = principal.fit(x if t else torch.randn(2, 3, 16, generator=g), rank)
    assert u.shape == (2, rank, 16)
    gram = u.float() @ u.float().transpose(-1, -2)
    assert torch.allclose(gram, torch.eye(rank).expand_as(gram), atol=2e-3)  # fp16-rounded orthonormal rows
    res, ps, pc = principal.split(x, u, bits)
    back = res + principal.decode(u, ps, pc, bits)
    assert torch.allclose(back, x, atol=1e-4 * (1 + float(x.abs().amax()) if t else 1))
    assert pc.shape[-2] == t and pc.shape[-1] == principal.nbytes_per_token(rank, bits)
    if t:  # the coefficients' own error is within half a step per direction
        coef = x @ u.float().transpose(-1, -2)
        got = principal._unpack(pc, bits, rank) * ps.float().unsqueeze(-2)
        assert bool(((coef - got).abs() <= ps.float().unsqueeze(-2) * 0.5 * (1 + 1e-3)).all())
