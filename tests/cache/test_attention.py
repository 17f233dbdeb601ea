"""The online softmax against a one-shot softmax reference (fp32), on odd sizes and GQA."""

from __future__ import annotations

import math

import pytest
import torch

from kvshrink.cache.attention import OnlineSoftmax, allowed_mask, attend_own_tokens


def reference(q, k, v, allowed, scaling):
    """Dense attention with repeated KV heads: ``[B, H, Q, Dv]``; fully masked rows -> 0."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = (q.double() @ k.double().transpose(-1, -2)) * scaling
    a = allowed.repeat_interleave(g, 1) if allowed.shape[1] > 1 else allowed
    s = s.masked_fill(~a, -math.inf)
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return (p @ v.double()).float()


@pytest.mark.parametrize("chunk", [1, 7, 64, 257], ids=lambda c: f"chunk{c}")
@pytest.mark.parametrize("rows", [1, 5, 33], ids=lambda r: f"rows{r}")
def test_online_softmax_matches_reference(chunk: int, rows: int) -> None:
    g = torch.Generator().manual_seed(0)
    b, hk, grp, nq, t, d = 2, 3, 3, 33, 257, 60
    q = torch.randn(b, hk * grp, nq, d, generator=g)
    k = torch.randn(b, hk, t, d, generator=g)
    v = torch.randn(b, hk, t, d + 4, generator=g)
    kpos = torch.arange(t, dtype=torch.int32).view(1, 1, t).repeat(b, hk, 1)
    kpos[0, 1, 10:20] = -1  # evicted slots, per head
    qcols = torch.arange(t - nq, t)
    pad = torch.ones(b, t, dtype=torch.bool)
    pad[1, :50] = False  # left padding of row 1
    allowed = allowed_mask(kpos, qcols, sliding=100, pad2d=pad)
    ref = reference(q, k, v, allowed, 0.125)
    state = OnlineSoftmax(q, hk, 0.125, d + 4)
    for a in range(0, t, chunk):
        z = min(t, a + chunk)
        for r0 in range(0, nq, rows):
            r1 = min(nq, r0 + rows)
            state.update(k[:, :, a:z], v[:, :, a:z], allowed[:, :, r0:r1, a:z], r0, r1)
    torch.testing.assert_close(state.result(), ref, atol=1e-5, rtol=1e-5)


def test_fully_masked_rows_are_zero_not_nan() -> None:
    q = torch.randn(1, 2, 3, 8)
    k, v = torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 8)
    allowed = torch.zeros(1, 1, 3, 4, dtype=torch.bool)
    allowed[..., 2, :2] = True
    state = OnlineSoftmax(q, 1, 1.0, 8)
    state.update(k, v, allowed, 0, 3)
    out = state.result()
    assert torch.isfinite(out).all()
    assert (out[:, :, :2] == 0).all() and (out[:, :, 2] != 0).any()


def test_mass_sums_to_one_per_observed_query() -> None:
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 4, 6, 16, generator=g)
    k, v = torch.randn(1, 2, 40, 16, generator=g), torch.randn(1, 2, 40, 16, generator=g)
    kpos = torch.arange(40, dtype=torch.int32).view(1, 1, 40)
    allowed = allowed_mask(kpos, torch.arange(34, 40), None, None)
    state = OnlineSoftmax(q, 2, 0.25, 16)
    state.update(k[:, :, :17], v[:, :, :17], allowed[..., :17], 0, 6)
    state.update(k[:, :, 17:], v[:, :, 17:], allowed[..., 17:], 0, 6)
    mass = torch.cat(
        [
            state.mass(k[:, :, :17], allowed[:, :, 3:, :17], 3, 6),
            state.mass(k[:, :, 17:], allowed[:, :, 3:, 17:], 3, 6),
        ],
        -1,
    )
    # summed over 3 observed rows, averaged over the 2 query heads of each group
    torch.testing.assert_close(mass.sum(-1), torch.full((1, 2), 3.0))
    one = OnlineSoftmax(q[:, :, -1:], 2, 0.25, 16, capture=True)
    one.update(k, v, allowed[:, :, -1:], 0, 1)
    torch.testing.assert_close(one.captured_mass().sum(-1), torch.ones(1, 2))


@pytest.mark.parametrize("sliding", [None, 20, 100], ids=lambda w: f"sliding{w}")
@pytest.mark.parametrize("pad", [0, 9], ids=lambda p: f"pad{p}")
def test_fused_own_token_path_matches_reference(sliding, pad) -> None:
    g = torch.Generator().manual_seed(2)
    b, hk, grp, nq, d = 2, 2, 3, 61, 32
    q = torch.randn(b, hk * grp, nq, d, generator=g)
    k, v = torch.randn(b, hk, nq, d, generator=g), torch.randn(b, hk, nq, d, generator=g)
    qcols = torch.arange(40, 40 + nq)
    pos = qcols.to(torch.int32).view(1, 1, nq).repeat(b, 1, 1)
    pos[1, :, :pad] = -1
    allowed = allowed_mask(pos, qcols, sliding, None)
    state = OnlineSoftmax(q, hk, 0.2, d)
    assert attend_own_tokens(state, k, v, pos, qcols, sliding, tile=16)
    out, ref = state.result(), reference(q, k, v, allowed, 0.2)
    torch.testing.assert_close(out[1, :, pad:], ref[1, :, pad:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[0], ref[0], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(out).all()
