"""Scissorhands, A2SF, PyramidKV and LazyEviction inside CompressedCache on a tiny random Llama:
generate() runs, each head holds what the budget allows, left padding changes nothing."""

from __future__ import annotations

import pytest
import torch

from kvshrink.cache import CompressedCache
from kvshrink.core import KvshrinkError
from kvshrink.policies import make_policy
from kvshrink.policies.pyramidkv import layer_budgets

from .tiny import VOCAB, held_columns, live_per_head, tiny_llama

PROMPT, NEW = 100, 9  # 9 new tokens: the prompt forward and 8 decode steps


@pytest.fixture(scope="module")
def model():
    return tiny_llama(layers=4)


def generate(model, ids, mask, spec, new=NEW):
    cache = CompressedCache(model, spec, window=16, block=16, chunk=48)
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=new,
            do_sample=False,
            past_key_values=cache,
            pad_token_id=0,
        )
    return out, cache


def prompt(batch: int = 1, n: int = PROMPT, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(1, VOCAB, (batch, n), generator=torch.Generator().manual_seed(seed))
    return ids, torch.ones_like(ids)


def expected(spec: str, layer: int) -> int:
    """Tokens per head after the prompt and 8 decode steps with budget 40."""
    if spec.startswith("pyramidkv"):  # evicts the prompt only, then appends
        return (
            layer_budgets(torch.tensor([40]), torch.tensor([PROMPT]), 8, 20.0, 4)[0, layer].item() + NEW - 1
        )
    return 40  # lazyeviction: step 8 is a window boundary (window=4)


SPECS = [
    "scissorhands:budget=40+int8",
    "a2sf:budget=40+int8",
    "pyramidkv:budget=40+int8",
    "lazyeviction:budget=40,window=4,alpha=0.01+int8",
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.split(":")[0])
def test_generate_holds_the_budget_per_layer_and_head(model, spec: str) -> None:
    ids, mask = prompt()
    out, cache = generate(model, ids, mask, spec)
    assert out.shape[1] == PROMPT + NEW and cache.get_seq_length() == PROMPT + NEW - 1
    for layer in cache.layers:
        assert live_per_head(layer).eq(expected(spec, layer.layer_idx)).all(), layer.layer_idx
        assert layer.slots() < layer.seen  # evicted slots were given back
    if spec.startswith("scissorhands"):  # the first token is always kept
        assert all(0 in cols for layer in cache.layers for cols in held_columns(layer))


def test_lazyeviction_grows_between_evictions(model) -> None:
    ids, mask = prompt()
    _, cache = generate(model, ids, mask, "lazyeviction:budget=40,window=4+int8", new=7)  # 6 decode steps
    assert live_per_head(cache.layers[2]).eq(40 + 2).all()  # evicted at step 4, two steps since
    _, cache = generate(model, ids, mask, "lazyeviction:budget=40,window=4+int8", new=4)
    assert live_per_head(cache.layers[2]).eq(PROMPT + 3).all()  # no eviction before step 4


@pytest.mark.parametrize(
    "spec",
    [s.replace("budget=40", "ratio=0.6") for s in SPECS],
    ids=lambda s: s.split(":")[0],
)
def test_a_prompt_alone_and_inside_a_left_padded_batch_keep_the_same_tokens(model, spec: str) -> None:
    long_ids, _ = prompt(n=PROMPT, seed=1)
    short_ids, short_mask = prompt(n=PROMPT - 23, seed=2)
    ids = torch.cat([long_ids, torch.cat([torch.zeros(1, 23, dtype=torch.long), short_ids], 1)])
    mask = torch.ones_like(ids)
    mask[1, :23] = 0
    batch, bcache = generate(model, ids, mask, spec)
    alone, acache = generate(model, short_ids, short_mask, spec)
    assert torch.equal(batch[1, -NEW:], alone[0, -NEW:])
    for lb, la in zip(bcache.layers, acache.layers):
        assert int(live_per_head(la).max()) < la.seen  # the policy did evict
        shifted = [[c - 23 for c in cols] for cols in held_columns(lb, row=1)]
        assert shifted == held_columns(la)


@pytest.mark.parametrize(
    "spec,match",
    [
        ("scissorhands:budget=11", "must exceed sinks \\+ recent"),
        ("scissorhands:ratio=0.5,drop=1", "drop"),
        ("scissorhands:ratio=0.5,window=0", "window"),
        ("a2sf:budget=16", "must exceed recent"),
        ("a2sf:ratio=0.5,alpha=1.5", "forgetting factor"),
        ("lazyeviction:budget=52", "must exceed window"),
        ("lazyeviction:ratio=0.5,alpha=0", "alpha"),
        ("lazyeviction:ratio=0.5,window=0", "window"),
        ("a2sf:ratio=0.5,beta=3", "unknown option"),
        ("scisorhands:ratio=0.5", "did you mean scissorhands"),
        ("lazyevict:ratio=0.5", "did you mean lazyeviction"),
    ],
)
def test_bad_specs_raise_one_line(spec: str, match: str) -> None:
    with pytest.raises(KvshrinkError, match=match) as err:
        make_policy(spec)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "spec",
    [
        "scissorhands:ratio=0.5,window=64,drop=0.25",
        "a2sf:budget=64,alpha=0.9",
        "pyramidkv:ratio=0.8,beta=10",
        "lazyeviction:budget=300,window=101,alpha=0.0001",
    ],
)
def test_specs_round_trip_and_compose_with_a_codec(model, spec: str) -> None:
    p = make_policy(spec)
    assert make_policy(str(p.config)).config == p.config
    assert CompressedCache(model, f"{spec}+kivi:b=2").spec.startswith(str(p.config) + "+kivi")
