"""Packed segments whose positions are just ``c0 .. c0+T-1`` view one shared arange instead of
holding 4 bytes per token and layer: the bytes drop, nothing the model sees changes."""

from __future__ import annotations

import copy

import torch

from kvshrink.cache import CompressedCache
from kvshrink.cache import segment as segment_mod
from kvshrink.cache.segment import column_bytes, shares_columns

from .conftest import prompt

SPEC = "int4+cache:window=0,block=16"


def _packed(cache: CompressedCache):
    return [s for layer in cache.layers for s in layer.segments() if s.packed]


def _run(model, ids, cache, steps: int = 6, attention_mask=None) -> torch.Tensor:
    """Prefill, then greedy steps; the logits of every step stacked."""
    out = []
    with torch.no_grad():
        r = model(input_ids=ids, past_key_values=cache, attention_mask=attention_mask)
        nxt = r.logits[:, -1:].argmax(-1)
        out.append(r.logits[:, -1])
        for _ in range(steps):
            if attention_mask is not None:
                attention_mask = torch.cat([attention_mask, attention_mask.new_ones(ids.shape[0], 1)], 1)
            r = model(input_ids=nxt, past_key_values=cache, attention_mask=attention_mask)
            nxt = r.logits[:, -1:].argmax(-1)
            out.append(r.logits[:, -1])
    return torch.stack(out)


def test_positions_shared_and_not_counted(smollm2, essay) -> None:
    model, tok = smollm2
    ids = tok(prompt(tok, essay, 70, offset=1000), return_tensors="pt").input_ids
    cache = CompressedCache(model, SPEC)
    _run(model, ids, cache, steps=20)  # blocks packed at prefill and during decoding
    packed = _packed(cache)
    assert packed and all(shares_columns(s.pos) for s in packed)
    for s in packed:  # still the right columns
        assert torch.equal(s.pos.flatten(), torch.arange(s.c0, s.c0 + s.size, dtype=torch.int32))
    rep = cache.memory_report()
    cols = max(s.c0 + s.size for s in packed)
    assert rep.shared == column_bytes(cols)  # int4 shares no codec state: only the columns, once
    # bookkeeping is only the per-row counters and the window's own positions now
    window = sum(s.size for layer in cache.layers for s in layer.segments() if not s.packed)
    assert sum(r.bookkeeping for r in rep.layers) <= 30 * 8 + 4 * window
    cache.uninstall()


def test_shared_positions_change_no_logit(smollm2, essay, monkeypatch) -> None:
    model, tok = smollm2
    ids = tok(prompt(tok, essay, 50, offset=3000), return_tensors="pt").input_ids
    shared = _run(model, ids, cache := CompressedCache(model, SPEC))
    cache.uninstall()
    monkeypatch.setattr(segment_mod, "held_pos", lambda seg: seg.pos.contiguous().clone())
    monkeypatch.setattr("kvshrink.cache.store.held_pos", lambda seg: seg.pos.contiguous().clone())
    own = _run(model, ids, cache := CompressedCache(model, SPEC))
    assert not any(shares_columns(s.pos) for s in _packed(cache))
    cache.uninstall()
    assert torch.equal(shared, own)


def test_left_padding_keeps_own_positions(smollm2, essay) -> None:
    model, tok = smollm2
    a = tok(prompt(tok, essay, 40, offset=500), add_special_tokens=False).input_ids
    b = tok(prompt(tok, essay, 25, offset=9000), add_special_tokens=False).input_ids
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids = torch.tensor([a, [pad] * (len(a) - len(b)) + b])
    mask = torch.tensor([[1] * len(a), [0] * (len(a) - len(b)) + [1] * len(b)])
    cache = CompressedCache(model, SPEC)
    _run(model, ids, cache, steps=4, attention_mask=mask)
    packed = _packed(cache)
    assert packed
    # the first block holds padding: its positions are its own (-1 where padded), and counted
    first = [s for s in packed if s.c0 == 0]
    assert first and not any(shares_columns(s.pos) for s in first)
    assert all(bool((s.pos < 0).any()) for s in first)
    cache.uninstall()


def test_deepcopy_keeps_positions_shared(smollm2, essay) -> None:
    model, tok = smollm2
    ids = tok(prompt(tok, essay, 50, offset=7000), return_tensors="pt").input_ids
    cache = CompressedCache(model, SPEC)
    with torch.no_grad():
        model(input_ids=ids, past_key_values=cache)
    twin = copy.deepcopy(cache)
    assert all(shares_columns(s.pos) for s in _packed(twin))
    assert twin.memory_report().nbytes == cache.memory_report().nbytes
    nxt = ids[:, -1:]
    with torch.no_grad():
        for _ in range(5):
            x = model(input_ids=nxt, past_key_values=cache).logits[:, -1]
            y = model(input_ids=nxt, past_key_values=twin).logits[:, -1]
            assert torch.equal(x, y)
            nxt = x.argmax(-1, keepdim=True)
    cache.uninstall()
