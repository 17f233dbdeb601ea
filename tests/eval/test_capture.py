"""Capture on the real SmolLM2: shapes, pre-RoPE keys, and the cache it returns."""

from __future__ import annotations

import torch

from kvshrink.data import load_text
from kvshrink.eval.capture import apply_rope, capture


def test_capture_real_model(smollm2) -> None:
    model, tok = smollm2
    ids = tok(load_text()[:3000], return_tensors="pt").input_ids[:, :96]
    pos = torch.tensor([10, 50, 95])
    cap = capture(model, ids, pos)
    cfg = model.config
    assert len(cap.layers) == cfg.num_hidden_layers
    for layer, held in zip(cap.layers, cap.cache.layers):
        assert layer.q.shape == (1, cfg.num_attention_heads, 3, cfg.head_dim)
        assert layer.k.shape == layer.v.shape == (1, cfg.num_key_value_heads, 96, cfg.head_dim)
        assert torch.equal(held.keys, layer.k) and torch.equal(held.values, layer.v)
        # re-applying the model's RoPE to the captured pre-RoPE keys gives the cached keys
        assert torch.allclose(
            apply_rope(layer.k_pre, layer.cos, layer.sin, layer.rope_fn), layer.k, atol=1e-5
        )
        assert layer.scaling == cfg.head_dim**-0.5 and layer.sliding_window is None
    # the model's own attention implementation is restored afterwards
    assert model.config._attn_implementation != "kvshrink_capture"


def test_keys_carry_a_strong_mean_direction(smollm2) -> None:
    """The pitfall the codecs must live with: a large share of key energy along the per-head mean."""
    model, tok = smollm2
    ids = tok(load_text()[:6000], return_tensors="pt").input_ids[:, :256]
    cap = capture(model, ids, torch.tensor([255]))
    fracs = []
    for layer in cap.layers:
        k = layer.k_pre[0].double()
        mu = k.mean(1, keepdim=True)
        fracs.append(float((mu**2).sum(-1).mean() / (k**2).sum(-1).mean()))
    assert 0.3 < sum(fracs) / len(fracs) < 0.9
