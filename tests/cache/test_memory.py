"""Quantize on write: prefill peak memory no higher than DynamicCache's, and far less held."""

from __future__ import annotations

import gc

import pytest
import torch
from transformers import DynamicCache

from kvshrink.cache import CompressedCache
from kvshrink.cache.memory import peak_heap

from .conftest import prompt


@pytest.mark.parametrize(
    "spec", ["int4", pytest.param("snapkv:ratio=0.5+kivi:b=2", marks=pytest.mark.slow)], ids=str
)
def test_prefill_peak_not_above_dynamic_cache(smollm2, essay, spec: str) -> None:
    model, tok = smollm2
    ids = tok(prompt(tok, essay, 1024, offset=40000), return_tensors="pt").input_ids

    def prefill(cache):
        with torch.no_grad():
            model(input_ids=ids, past_key_values=cache, logits_to_keep=1)
        return cache

    peaks = {}
    for name, make in (
        ("dynamic", lambda: DynamicCache(config=model.config)),
        ("ours", lambda: CompressedCache(model, spec)),
    ):
        gc.collect()
        cache, peaks[name] = peak_heap(lambda make=make: prefill(make()))
        if name == "ours":
            held = cache.nbytes()
        del cache
    kv_fp32 = 30 * 2 * 3 * 64 * 4 * ids.shape[1]
    print(spec, peaks, held)
    assert peaks["ours"] <= peaks["dynamic"], peaks
    assert peaks["dynamic"] >= kv_fp32  # the probe sees the dense cache
    assert held < kv_fp32 / 3  # the fp32 window of 128-255 tokens is a good part of it at 1k
    CompressedCache(model, "fp16").uninstall()
