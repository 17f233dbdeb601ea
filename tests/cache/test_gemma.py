"""Gemma 3 (270M): sliding-window layers next to global ones, prompt longer than the window.

Marked slow: loading the GGUF takes about a minute on 2 cores and each generate ~10 s.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from kvshrink.cache import CompressedCache

from .conftest import prompt

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def g3(gemma, essay):
    model, tok = gemma
    tok.padding_side = "left"
    window = model.config.sliding_window
    text = prompt(tok, essay, window + 100, offset=20000)
    yield model, tok, text
    CompressedCache(model, "fp16").uninstall()


def greedy(model, enc, cache, new=30):
    with torch.no_grad():
        return model.generate(**enc, max_new_tokens=new, do_sample=False, past_key_values=cache)


def test_gemma_greedy_fp16_identical_past_the_sliding_window(g3) -> None:
    model, tok, text = g3
    enc = tok(text, return_tensors="pt")
    assert enc.input_ids.shape[1] > model.config.sliding_window
    ref = greedy(model, enc, DynamicCache(config=model.config))
    cache = CompressedCache(model, "fp16", window=64, block=64)
    assert torch.equal(greedy(model, enc, cache), ref)
    window = model.config.sliding_window
    for layer, kind in zip(cache.layers, model.config.layer_types):
        assert layer.is_sliding == (kind == "sliding_attention")
        if layer.is_sliding:  # only what the window can still see, plus one block of slack
            assert layer.slots() <= window - 1 + 64 + 64
            assert all(b.hi > layer.seen - window for b in layer.blocks)
        else:
            assert layer.slots() == layer.seen


def test_gemma_left_padded_batch_and_policy(g3) -> None:
    model, tok, text = g3
    short = "Gemma is a family of open models. The smallest one has"
    batch = tok([text, short], return_tensors="pt", padding=True)
    out = greedy(model, batch, CompressedCache(model, "h2o:budget=256+int8", window=64, block=64), new=12)
    alone_cache = CompressedCache(model, "h2o:budget=256+int8", window=64, block=64)
    alone = greedy(model, tok(short, return_tensors="pt"), alone_cache, new=12)
    assert torch.equal(out[1, -12:], alone[0, -12:])
