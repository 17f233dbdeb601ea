"""Every supported family on a tiny random model: logits match DynamicCache step by step.

Tiny configs (2-3 layers, GQA, sliding windows shorter than the prompt) run in a second and
exercise what SmolLM2 cannot: Mistral's all-sliding layers and Qwen2's mixed layer types.
"""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    DynamicCache,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
)

from kvshrink.cache import SUPPORTED_MODEL_TYPES, CompressedCache

COMMON = dict(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=96,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    max_position_embeddings=256,
)
CONFIGS = {
    "llama": lambda: LlamaConfig(num_hidden_layers=2, **COMMON),
    "mistral": lambda: MistralConfig(num_hidden_layers=2, sliding_window=24, **COMMON),
    "qwen2": lambda: Qwen2Config(
        num_hidden_layers=3,
        use_sliding_window=True,
        sliding_window=24,
        max_window_layers=1,
        layer_types=["full_attention", "sliding_attention", "sliding_attention"],
        **COMMON,
    ),
    "gemma3_text": lambda: Gemma3TextConfig(
        num_hidden_layers=3,
        sliding_window=24,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        query_pre_attn_scalar=32,
        **COMMON,
    ),
}


def test_every_supported_family_is_covered() -> None:
    assert set(CONFIGS) == set(SUPPORTED_MODEL_TYPES)


def run(model, cache, ids, mask, steps=12):
    logits = []
    seq_mask = mask
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=seq_mask, past_key_values=cache)
        for _ in range(steps):
            logits.append(out.logits[:, -1])
            nxt = out.logits[:, -1:].argmax(-1)
            seq_mask = torch.cat([seq_mask, torch.ones_like(nxt)], 1)
            out = model(input_ids=nxt, attention_mask=seq_mask, past_key_values=cache)
    return torch.stack(logits)


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_logits_match_dynamic_cache(family: str) -> None:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS[family](), dtype=torch.float32).eval()
    model.set_attn_implementation("sdpa")
    ids = torch.randint(1, 97, (2, 70))
    mask = torch.ones(2, 70, dtype=torch.long)
    mask[1, :13] = 0  # left padding
    ref = run(model, DynamicCache(config=model.config), ids, mask)
    cache = CompressedCache(model, "fp16", window=8, block=8, chunk=20)
    out = run(model, cache, ids, mask)
    assert any(layer.blocks for layer in cache.layers)
    torch.testing.assert_close(out, ref, atol=1e-3, rtol=1e-3)
    sliding = [layer for layer in cache.layers if layer.is_sliding]
    assert all(layer.slots() <= 23 + 8 + 8 for layer in sliding)
