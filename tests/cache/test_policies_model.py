"""Policies inside CompressedCache on SmolLM2: budgets held, true positions, batch invariance."""

from __future__ import annotations

import pytest
import torch

from kvshrink.cache import CompressedCache

from .conftest import prompt


@pytest.fixture(scope="module")
def lm(smollm2, essay):
    model, tok = smollm2
    tok.padding_side = "left"
    return model, tok, prompt(tok, essay, 200, offset=5000)


def live_per_head(layer) -> torch.Tensor:
    pos = torch.cat([s.full_pos(layer.batch, layer.heads) for s in layer.segments()], -1)
    return (pos >= 0).sum(-1)


def generate(model, enc, cache, new=10):
    with torch.no_grad():
        return model.generate(**enc, max_new_tokens=new, do_sample=False, past_key_values=cache)


@pytest.mark.parametrize(
    "spec,bound",
    [
        ("streamingllm:sinks=4,budget=64+int8", 64),
        ("h2o:budget=64+int8", 64),
        ("snapkv:ratio=0.75+int8", None),
    ],
    ids=["streamingllm", "h2o", "snapkv"],
)
def test_policy_holds_its_budget_and_true_positions(lm, spec, bound) -> None:
    model, tok, text = lm
    enc = tok(text, return_tensors="pt")
    n = enc.input_ids.shape[1]
    cache = CompressedCache(model, spec, window=16, block=16)
    out = generate(model, enc, cache)
    assert cache.get_seq_length() == out.shape[1] - 1  # positions keep counting evicted tokens
    layer = cache.layers[3]
    live = live_per_head(layer)
    if bound is None:  # snapkv: a quarter of the prompt kept, then decode tokens appended
        assert int(live.max()) == -(-n // 4) + 9
    else:
        assert int(live.max()) <= bound
    assert layer.slots() < layer.seen
    if spec.startswith("streamingllm"):
        pos = torch.cat([s.full_pos(1, layer.heads) for s in layer.segments()], -1)
        assert set(range(4)) <= set(pos[0, 0].tolist())  # the sinks are still there


def test_snapkv_selects_per_kv_head(lm) -> None:
    model, tok, text = lm
    cache = CompressedCache(model, "snapkv:ratio=0.5+fp16", window=16, block=16)
    generate(model, tok(text, return_tensors="pt"), cache, new=1)
    pos = torch.cat([s.full_pos(1, cache.layers[5].heads) for s in cache.layers[5].segments()], -1)[0]
    assert not torch.equal(pos[0], pos[1])


def test_policy_is_batch_invariant_under_left_padding(lm) -> None:
    model, tok, text = lm
    short = prompt(tok, text, 60)
    spec = "snapkv:ratio=0.5+int4"
    batch = tok([text, short], return_tensors="pt", padding=True)
    out = generate(model, batch, CompressedCache(model, spec, window=16, block=16), new=12)
    alone = generate(
        model, tok(short, return_tensors="pt"), CompressedCache(model, spec, window=16, block=16), new=12
    )
    assert torch.equal(out[1, -12:], alone[0, -12:])
