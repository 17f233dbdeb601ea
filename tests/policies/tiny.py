"""A tiny random Llama (GQA) for policy tests through CompressedCache: runs in a second on CPU."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

VOCAB = 97


def tiny_llama(layers: int = 4, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = LlamaConfig(
        num_hidden_layers=layers,
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=512,
    )
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.set_attn_implementation("sdpa")
    return model


def live_per_head(layer) -> torch.Tensor:
    """``[B, Hkv]`` tokens a cache layer holds."""
    pos = torch.cat([s.full_pos(layer.batch, layer.heads) for s in layer.segments()], -1)
    return (pos >= 0).sum(-1)


def held_columns(layer, row: int = 0) -> list[list[int]]:
    """Per KV head, the sorted columns a cache layer holds for batch row ``row``."""
    pos = torch.cat([s.full_pos(layer.batch, layer.heads) for s in layer.segments()], -1)[row]
    return [sorted(c for c in p.tolist() if c >= 0) for p in pos]
