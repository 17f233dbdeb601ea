from __future__ import annotations

import math

import pytest
import torch

from kvshrink.eval.metrics import attention_fidelity, token_nll_kl


def _qkv(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 4, 5, 16, generator=g)
    k = torch.randn(1, 2, 20, 16, generator=g)
    v = torch.randn(1, 2, 20, 16, generator=g)
    return q, torch.tensor([3, 7, 11, 15, 19]), k, v


def test_exact_cache_is_perfect() -> None:
    q, pos, k, v = _qkv()
    f = attention_fidelity(q, pos, k, v, k.clone(), v.clone(), 0.25)
    assert f.attn_cosine == pytest.approx(1.0)
    assert f.key_ip_rel_err == 0.0
    # causal pairs only: 4 heads x (4+8+12+16+20) visible keys
    assert f.n_pairs == 4 * 60 and f.n_queries == 20


def test_matches_a_direct_computation() -> None:
    q, pos, k, v = _qkv(1)
    k_hat, v_hat = k + 0.3 * torch.randn_like(k), v + 0.3 * torch.randn_like(v)
    f = attention_fidelity(q, pos, k, v, k_hat, v_hat, 0.25, window=6)
    cos = []
    for h in range(4):
        kv = h // 2
        for i, p in enumerate(pos.tolist()):
            lo = max(0, p - 5)
            a = torch.softmax(q[0, h, i] @ k[0, kv, lo : p + 1].T * 0.25, -1) @ v[0, kv, lo : p + 1]
            b = torch.softmax(q[0, h, i] @ k_hat[0, kv, lo : p + 1].T * 0.25, -1) @ v_hat[0, kv, lo : p + 1]
            cos.append(torch.nn.functional.cosine_similarity(a, b, dim=0))
    assert f.attn_cosine == pytest.approx(float(torch.stack(cos).mean()), abs=1e-5)


def test_nll_and_kl() -> None:
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    nll, kl = token_nll_kl(logits, logits, torch.tensor([0, 0]))
    assert nll.tolist() == pytest.approx([math.log(2), -math.log(0.75)])
    assert kl.abs().max() < 1e-12
    _, kl2 = token_nll_kl(torch.zeros(1, 2), torch.tensor([[math.log(3.0), 0.0]]), torch.tensor([0]))
    assert float(kl2) == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5))
