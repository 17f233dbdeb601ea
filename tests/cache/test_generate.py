"""Correctness harness on SmolLM2: CompressedCache against DynamicCache in every generation mode.

With the ``fp16`` codec and no policy the cache must change nothing (token identity), also when
the prompt is long enough that most of it was packed. The window is kept small so that blocks
are packed during the prompt and flushed during decoding.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import DynamicCache

from kvshrink.cache import CompressedCache

from .conftest import prompt

NEW = 40
SMALL = {"window": 32, "block": 32, "chunk": 96}  # packs most of a 300-token prompt, many chunks


@pytest.fixture(scope="module")
def lm(smollm2, essay):
    model, tok = smollm2
    tok.padding_side = "left"
    text = prompt(tok, essay, 300)
    yield model, tok, text
    CompressedCache(model, "fp16").uninstall()


def greedy(model, enc, cache=None, new: int = NEW, **kw):
    with torch.no_grad():
        return model.generate(**enc, max_new_tokens=new, do_sample=False, past_key_values=cache, **kw)


@pytest.fixture(scope="module")
def reference(lm):
    model, tok, text = lm
    enc = tok(text, return_tensors="pt")
    return enc, greedy(model, enc, DynamicCache(config=model.config))


@pytest.mark.parametrize("opts", [{}, SMALL], ids=["default", "small-window"])
def test_greedy_fp16_is_token_identical(lm, reference, opts) -> None:
    model, _, _ = lm
    enc, ref = reference
    cache = CompressedCache(model, "fp16", **opts)
    out = greedy(model, enc, cache)
    assert torch.equal(out, ref)
    layer = cache.layers[0]
    assert layer.blocks and cache.get_seq_length() == ref.shape[1] - 1  # packed, true length
    assert layer.slots() == cache.get_seq_length()


def test_prompt_alone_equals_prompt_in_left_padded_batch(lm) -> None:
    model, tok, text = lm
    short = "The capital of France is Paris. The capital of Italy is"
    batch = tok([text, short], return_tensors="pt", padding=True)
    assert int(batch.attention_mask[1].sum()) < batch.input_ids.shape[1] - 200
    out = greedy(model, batch, CompressedCache(model, "fp16", **SMALL), new=20)
    alone = greedy(model, tok(short, return_tensors="pt"), CompressedCache(model, "fp16", **SMALL), new=20)
    assert torch.equal(out[1, -20:], alone[0, -20:])


def test_beam_search_fp16_equals_dynamic_cache(lm) -> None:
    model, tok, text = lm
    enc = tok(prompt(tok, text, 120), return_tensors="pt")
    ref = greedy(model, enc, DynamicCache(config=model.config), new=12, num_beams=3)
    out = greedy(model, enc, CompressedCache(model, "fp16", window=16, block=16), new=12, num_beams=3)
    assert torch.equal(out, ref)


def test_repeated_generate_continues_like_dynamic_cache(lm) -> None:
    model, tok, text = lm
    enc = tok(prompt(tok, text, 150), return_tensors="pt")
    follow = tok(" Summarise that in one line:", return_tensors="pt", add_special_tokens=False).input_ids
    outs = []
    for cache in (DynamicCache(config=model.config), CompressedCache(model, "fp16", **SMALL)):
        first = greedy(model, enc, cache, new=10)
        ids = torch.cat([first, follow], dim=1)
        second = greedy(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, cache, new=10)
        outs.append(second)
        assert cache.get_seq_length() == second.shape[1] - 1
    assert torch.equal(outs[0], outs[1])


def test_deepcopy_is_independent(lm) -> None:
    model, tok, text = lm
    enc = tok(prompt(tok, text, 100), return_tensors="pt")
    cache = CompressedCache(model, "int4", window=16, block=16)
    first = greedy(model, enc, cache, new=4)
    fork = copy.deepcopy(cache)
    assert fork.codec is cache.codec and fork.layers[0] is not cache.layers[0]
    before = fork.nbytes()
    ids = torch.cat([first, first[:, -3:]], dim=1)
    feed = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    a = greedy(model, feed, cache, new=6)
    assert fork.nbytes() == before and fork.get_seq_length() == first.shape[1] - 1
    b = greedy(model, feed, fork, new=6)
    assert torch.equal(a, b)


def test_sampling_with_a_seed_is_reproducible(lm) -> None:
    model, tok, text = lm
    enc = tok(prompt(tok, text, 80), return_tensors="pt")
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        cache = CompressedCache(model, "kivi:b=2", window=16, block=32)
        with torch.no_grad():
            runs.append(
                model.generate(**enc, max_new_tokens=12, do_sample=True, top_k=20, past_key_values=cache)
            )
    assert torch.equal(runs[0], runs[1]) and runs[0].shape[1] == enc.input_ids.shape[1] + 12


def test_hand_written_loop_matches_dynamic_cache(lm) -> None:
    model, tok, text = lm
    ids = tok(prompt(tok, text, 90), return_tensors="pt").input_ids
    logits = []
    for cache in (DynamicCache(config=model.config), CompressedCache(model, "fp16", window=16, block=16)):
        step, seq, out = ids, ids, []
        with torch.no_grad():
            for _ in range(5):
                o = model(input_ids=step, past_key_values=cache, attention_mask=torch.ones_like(seq))
                out.append(o.logits[:, -1])
                step = o.logits[:, -1:].argmax(-1)
                seq = torch.cat([seq, step], 1)
        logits.append(torch.stack(out))
    torch.testing.assert_close(logits[1], logits[0], atol=2e-3, rtol=1e-3)


@pytest.mark.parametrize("spec", ["int4", "kivi:b=2", "snapkv:ratio=0.75+int4"], ids=str)
def test_lossy_specs_generate_and_hold_fewer_bytes(lm, spec: str) -> None:
    model, tok, text = lm
    enc = tok(text, return_tensors="pt")
    cache = CompressedCache(model, spec, window=32, block=64)
    out = greedy(model, enc, cache, new=8)
    assert out.shape[1] == enc.input_ids.shape[1] + 8
    report = cache.memory_report()
    assert report.nbytes == cache.nbytes() < report.fp16
    layer = report.layers[0]
    assert layer.total == layer.packed + layer.window + layer.bookkeeping
    assert layer.packed == sum(p.nbytes() for s in cache.layers[0].blocks for p in s.keys + s.values)


def test_chunked_prefill_equals_one_shot(lm, reference) -> None:
    model, _, _ = lm
    enc, ref = reference
    out = greedy(model, enc, CompressedCache(model, "fp16", **SMALL), prefill_chunk_size=64)
    assert torch.equal(out, ref)


def test_num_return_sequences_expands_rows(lm) -> None:
    model, tok, text = lm
    enc = tok(prompt(tok, text, 60), return_tensors="pt")
    torch.manual_seed(1)
    cache = CompressedCache(model, "int4", window=16, block=16)
    with torch.no_grad():
        out = model.generate(
            **enc, max_new_tokens=6, do_sample=True, num_return_sequences=3, past_key_values=cache
        )
    assert out.shape[0] == 3 and cache.layers[0].batch == 3
