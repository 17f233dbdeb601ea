"""PyramidKV: per-layer budgets, and generate() with them against a hand-written reference."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from transformers import DynamicCache
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import AttentionInterface

from kvshrink.cache import CompressedCache
from kvshrink.core import SpecError
from kvshrink.policies import make_policy
from kvshrink.policies.pyramidkv import layer_budgets

from .tiny import VOCAB, held_columns, live_per_head, tiny_llama
from .views import kept, view


def budgets(k: int, n: int, layers: int, window: int = 8, beta: float = 20.0) -> list[int]:
    return layer_budgets(torch.tensor([k]), torch.tensor([n]), window, beta, layers)[0].tolist()


def test_budgets_decrease_arithmetically_and_sum_to_the_uniform_total() -> None:
    got = budgets(40, 120, 4)
    # non-window average A = 32: bottom 2A - A/20 = 62.4, top 1.6, step 20.27; rounded cumulatively
    assert got == [70, 51, 29, 10] and sum(got) == 4 * 40
    many = budgets(300, 5000, 30, window=32)
    assert sum(many) == 30 * 300 and all(a >= b for a, b in itertools.pairwise(many))
    a = 300 - 32  # non-window average
    bottom, top = 2 * a - a / 20, a / 20
    exact = [32 + bottom - i * (bottom - top) / 29 for i in range(30)]
    assert all(abs(x - y) < 1 for x, y in zip(many, exact))  # arithmetic up to rounding


def test_bottom_layer_is_capped_by_the_prompt_and_short_prompts_stay_uniform() -> None:
    assert budgets(40, 70, 4) == [70, 50, 30, 10]  # bottom capped at n - window = 62
    assert budgets(40, 60, 4) == [40] * 4  # n < 2A: the code falls back to SnapKV's budget
    assert budgets(40, 120, 1) == [40]


def test_each_layer_keeps_its_budget_and_the_window_per_head() -> None:
    s = torch.rand(2, 2, 120, generator=torch.Generator().manual_seed(0))
    p = make_policy("pyramidkv:budget=40")
    for layer, expect in enumerate([70, 51, 29, 10]):
        v = view(120, scores=s, layer_idx=layer, n_layers=4)
        d = p.on_prefill(v)
        assert d is not None and d.keep.sum(-1).eq(expect).all()
        assert kept(d.keep, v, 0, 1)[-8:] == list(range(112, 120))  # observation window
    first = p.on_prefill(view(120, scores=s, layer_idx=0, n_layers=4))
    assert first is not None and not torch.equal(first.keep[:, 0], first.keep[:, 1])  # per KV head


def test_ratio_budgets_follow_each_rows_real_tokens() -> None:
    p = make_policy("pyramidkv:ratio=0.75")
    v = view(120, pad=20, scores=torch.rand(2, 2, 120), layer_idx=1, n_layers=4)
    d = p.on_prefill(v)
    assert d is not None
    row0, row1 = budgets(30, 120, 4)[1], budgets(25, 100, 4)[1]
    assert d.keep[0].sum(-1).eq(row0).all() and d.keep[1].sum(-1).eq(row1).all()


@pytest.mark.parametrize(
    "spec,match",
    [
        ("pyramidkv:budget=8", "must exceed the observation window"),
        ("pyramidkv:ratio=0.5,beta=0.5", "beta"),
        ("pyramidkv:ratio=0.5,kernel=2", "odd"),
        ("pyramidkv:ratio=0.5,pool=median", "pool"),
    ],
)
def test_bad_options(spec: str, match: str) -> None:
    with pytest.raises(SpecError, match=match):
        make_policy(spec)


# -- generate() with per-layer budgets against a reference that applies the same keep masks ----
_KEEP: dict[int, torch.Tensor] = {}  # layer -> [Hkv, prompt columns] bool, set after the prompt
_REF = "kvshrink_test_keep_masks"


def _reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Eager attention over a full DynamicCache, hiding the prompt columns a layer evicted."""
    h, q = query.shape[1], query.shape[2]
    g = h // key.shape[1]
    n = key.shape[2]
    allowed = torch.arange(n)[None, :] <= torch.arange(n - q, n)[:, None]  # causal, batch 1, no padding
    keep = _KEEP.get(module.layer_idx)
    if keep is not None:
        cols = torch.ones(key.shape[1], n, dtype=torch.bool)
        cols[:, : keep.shape[1]] = keep
        allowed = allowed[None] & cols.repeat_interleave(g, 0)[:, None, :]
    s = (query @ key.repeat_interleave(g, 1).transpose(-1, -2)) * scaling
    p = torch.softmax(s.masked_fill(~allowed, -math.inf), -1)
    return (p @ value.repeat_interleave(g, 1)).transpose(1, 2).contiguous(), None


def test_generate_with_per_layer_budgets_matches_a_keep_mask_reference() -> None:
    model = tiny_llama(layers=4)
    ids = torch.randint(1, VOCAB, (1, 120), generator=torch.Generator().manual_seed(1))
    cache = CompressedCache(model, "pyramidkv:budget=40+fp16", window=256)  # nothing packed: exact
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            max_new_tokens=12,
            do_sample=False,
            past_key_values=cache,
            output_scores=True,
            return_dict_in_generate=True,
            pad_token_id=0,
        )
    cache.uninstall()
    for layer, expect in zip(cache.layers, budgets(40, 120, 4)):
        assert live_per_head(layer).eq(expect + 11).all()  # its budget + the decoded tokens
    _KEEP.clear()
    AttentionInterface.register(_REF, _reference_attention)
    AttentionMaskInterface.register(_REF, sdpa_mask)
    model.set_attn_implementation(_REF)
    ref_tokens, ref_logits = [], []
    with torch.no_grad():
        dyn = DynamicCache(config=model.config)
        logits = model(input_ids=ids, past_key_values=dyn).logits[:, -1]
        for layer in cache.layers:  # the prompt columns each layer kept, per KV head
            keep = torch.zeros(layer.heads, 120, dtype=torch.bool)
            for h, cols in enumerate(held_columns(layer)):
                keep[h, [c for c in cols if c < 120]] = True
            _KEEP[layer.layer_idx] = keep
        for _ in range(12):
            ref_logits.append(logits)
            nxt = logits.argmax(-1, keepdim=True)
            ref_tokens.append(nxt)
            logits = model(input_ids=nxt, past_key_values=dyn).logits[:, -1]
    model.set_attn_implementation("sdpa")
    assert torch.equal(out.sequences[:, 120:], torch.cat(ref_tokens, 1))
    torch.testing.assert_close(torch.stack(out.scores), torch.stack(ref_logits), atol=1e-4, rtol=1e-4)
