"""Query-aware key transform (``white=``): the fit, its stored form, bytes, errors, and that it helps."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvshrink.cache.config import parse_cache_spec
from kvshrink.codecs import make_codec
from kvshrink.codecs.primitives import whiten
from kvshrink.core import InputError, SpecError
from kvshrink.eval.capture import apply_rope, capture
from kvshrink.eval.methods import code_keys, key_queries
from tests.policies.tiny import VOCAB, tiny_llama

D = 64


def _anisotropic(
    seed: int, b: int = 1, h: int = 2, t: int = 256, n: int = 96
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys with a large common direction and a decaying spectrum, and queries that look along
    other directions than the keys' energy: the case real attention heads are in."""
    g = torch.Generator().manual_seed(seed)
    spec_k = torch.logspace(0, -1.5, D)
    spec_q = torch.logspace(-1.5, 0, D)
    basis = torch.linalg.qr(torch.randn(D, D, generator=g))[0]
    k = (torch.randn(b, h, t, D, generator=g) * spec_k) @ basis.T + 3.0 * basis[:, 0]
    q = (torch.randn(b, h, n, D, generator=g) * spec_q) @ basis.T
    return q, k


def _score_err(q: torch.Tensor, k: torch.Tensor, k_hat: torch.Tensor) -> float:
    return float(((q @ (k_hat - k).transpose(-1, -2)) ** 2).mean())


@pytest.mark.parametrize("spec", ["fibquant:b=2,k=4", "turboquant:b=2"])
def test_white_cuts_the_score_error_the_queries_see(spec: str) -> None:
    q, k = _anisotropic(0)
    plain = make_codec(spec)
    white = make_codec(spec + ",white=4")
    e_plain = _score_err(q, k, plain.decode(plain.encode(k, "key")))
    e_white = _score_err(q, k, white.decode(white.encode(k, "key", queries=q)))
    assert e_white < 0.6 * e_plain, (e_white, e_plain)


def test_stored_transform_is_counted_and_deterministic() -> None:
    q, k = _anisotropic(1)
    plain, white = make_codec("fibquant:b=2,k=4"), make_codec("fibquant:b=2,k=4,white=4")
    pp, pw = plain.encode(k, "key"), white.encode(k, "key", queries=q)
    assert pw.tensors["wu"].shape == (1, 2, 4, D) and pw.tensors["wu"].dtype == torch.float16
    assert pw.tensors["ws"].shape == (1, 2, 4) and pw.tensors["ws"].dtype == torch.float16
    assert pw.nbytes() - pp.nbytes() == 2 * (4 * D + 4) * 2  # per head: r·d + r fp16 values
    again = white.encode(k, "key", queries=q)
    for name, v in pw.tensors.items():
        assert torch.equal(v, again.tensors[name]), name


def test_values_and_unset_white_ignore_queries() -> None:
    _, k = _anisotropic(2)
    c = make_codec("fibquant:b=2,k=4,white=4")
    assert c.uses_queries("key") and not c.uses_queries("value")
    assert not make_codec("fibquant:b=2,k=4").uses_queries("key")
    pv = c.encode(k, "value")
    assert "wu" not in pv.tensors


def test_white_keys_need_matching_queries() -> None:
    q, k = _anisotropic(3)
    c = make_codec("turboquant:b=3,white=2")
    with pytest.raises(InputError, match="pass queries"):
        c.encode(k, "key")
    with pytest.raises(InputError, match="leading dims"):
        c.encode(k, "key", queries=q[:, :1])
    with pytest.raises(InputError, match="original basis only"):
        c.decode_rotated(c.encode(k, "key", queries=q))


def test_white_with_sinks_window_center_decodes_every_token_range() -> None:
    q, k = _anisotropic(4, t=64)
    c = make_codec("fibquant:b=3,k=2,white=3,sinks=2,window=4,center=1")
    p = c.encode(k, "key", queries=q)
    full = c.decode(p)
    torch.testing.assert_close(full[..., :2, :], k[..., :2, :].half().float())  # sinks exact (fp16)
    torch.testing.assert_close(full[..., -4:, :], k[..., -4:, :].half().float())
    idx = torch.tensor([0, 5, 30, 62])
    torch.testing.assert_close(c.decode_tokens(p, idx), full[..., idx, :])


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), rank=st.integers(1, 16), shrink=st.floats(0.01, 1.0))
def test_fit_gives_an_invertible_symmetric_positive_transform(seed: int, rank: int, shrink: float) -> None:
    q, k = _anisotropic(seed, h=1, t=48, n=24)
    u, s = whiten.fit(q, k, rank, shrink)
    assert u.shape == (1, 1, rank, D) and s.shape == (1, 1, rank)
    assert bool((s.float() > -1).all())
    a, a_inv = whiten.matrix(u, s), whiten.inverse(u, s)
    torch.testing.assert_close(a, a.transpose(-1, -2))
    assert float(torch.linalg.eigvalsh(a.double()).min()) > 0
    eye = torch.eye(D).expand_as(a)
    torch.testing.assert_close(a @ a_inv, eye, atol=1e-4, rtol=0)
    uu = u.float() @ u.float().transpose(-1, -2)
    torch.testing.assert_close(uu, torch.eye(rank).expand_as(uu), atol=2e-3, rtol=0)


def test_spec_errors_name_the_valid_range() -> None:
    with pytest.raises(SpecError, match=r"white .* must be in 0\.\.1024"):
        make_codec("fibquant:b=2,k=4,white=-1")
    with pytest.raises(SpecError, match=r"wshrink must be in \(0, 10\]"):
        make_codec("turboquant:b=2,white=4,wshrink=0")
    with pytest.raises(SpecError, match=r"white .* must be in 0\.\.1024"):
        parse_cache_spec("fibquant:b=2,k=4,white=2000")


def test_frontier_keys_get_the_prompt_queries_turned_back_to_key_positions() -> None:
    """For keys coded before RoPE, ``key_queries`` rotates each query back to key positions:
    ``(R_nᵀ q)·k = q·(R_n k)`` must hold for the model's own RoPE."""
    model = tiny_llama(layers=2)
    ids = torch.randint(0, VOCAB, (1, 40), generator=torch.Generator().manual_seed(1))
    cap = capture(model, ids, torch.tensor([20, 39]))
    layer = cap.layers[1]
    qe = key_queries(layer, prerope=False)
    hq, hkv = layer.q.shape[1], layer.k.shape[1]
    assert qe.shape == (1, hkv, hq // hkv * 2, layer.q.shape[-1])
    # one query, one key position n: compare the two sides directly
    q = layer.q[:, :1, :1].float()
    n = 7
    cos, sin = layer.cos[:, n : n + 1].float(), layer.sin[:, n : n + 1].float()
    k_pre = layer.k_pre[:, :1, n : n + 1].float()
    back = apply_rope(q, cos, -sin, layer.rope_fn)
    torch.testing.assert_close(
        back @ k_pre.transpose(-1, -2), q @ apply_rope(k_pre, cos, sin, layer.rope_fn).transpose(-1, -2)
    )
    assert key_queries(layer, prerope=True).shape[-2] == hq // hkv * 2 * 4
    k_hat, nbytes = code_keys(make_codec("fibquant:b=3,k=2,prerope=1,white=2"), layer)
    assert k_hat.shape == layer.k.shape and nbytes > 0
