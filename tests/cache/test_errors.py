"""Bad input fails fast with one-line KvshrinkError subclasses, never silent garbage."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, GPT2Config, GPT2LMHeadModel

from kvshrink.cache import CompressedCache
from kvshrink.core import InputError, KvshrinkError, ModelError, SpecError


@pytest.fixture(scope="module")
def lm(smollm2):
    model, tok = smollm2
    yield model, tok
    CompressedCache(model, "fp16").uninstall()


def one_line(err: pytest.ExceptionInfo) -> None:
    assert isinstance(err.value, KvshrinkError) and "\n" not in str(err.value)


def test_unknown_policy(lm) -> None:
    with pytest.raises(SpecError, match="unknown stage 'foo'") as err:
        CompressedCache(lm[0], "foo:ratio=0.5+int4")
    one_line(err)


def test_codec_that_cannot_split_the_head_dim(lm) -> None:
    with pytest.raises(InputError, match="group=48 does not divide head dim 64") as err:
        CompressedCache(lm[0], "int4:group=48")
    one_line(err)


def test_unsupported_model() -> None:
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32))
    with pytest.raises(ModelError, match="does not support model type 'gpt2'") as err:
        CompressedCache(gpt2, "int4")
    one_line(err)
    with pytest.raises(ModelError, match="needs a transformers model"):
        CompressedCache(torch.nn.Linear(2, 2), "int4")


def test_budget_larger_than_the_prompt(lm) -> None:
    model, tok = lm
    enc = tok("A short prompt about caches.", return_tensors="pt")
    with pytest.raises(SpecError, match="nothing would be evicted") as err:
        model.generate(
            **enc, max_new_tokens=2, past_key_values=CompressedCache(model, "snapkv:budget=512+int4")
        )
    one_line(err)


def test_reusing_a_cache_with_another_batch_size(lm) -> None:
    model, tok = lm
    cache = CompressedCache(model, "int4")
    model.generate(**tok("One sequence.", return_tensors="pt"), max_new_tokens=2, past_key_values=cache)
    tok.padding_side = "left"
    two = tok(["One sequence.", "And another one."], return_tensors="pt", padding=True)
    with pytest.raises(InputError, match="build a new cache for a different batch") as err:
        model.generate(**two, max_new_tokens=2, past_key_values=cache)
    one_line(err)


def test_attention_switched_away_while_in_use(lm) -> None:
    model, tok = lm
    cache = CompressedCache(model, "int4")
    model.set_attn_implementation("sdpa")
    try:
        with pytest.raises(ModelError, match="not 'kvshrink'") as err:
            model(**tok("Hello there.", return_tensors="pt"), past_key_values=cache)
        one_line(err)
    finally:
        CompressedCache(model, "int4")  # re-installs


def test_prepared_4d_mask_and_crop_are_refused(lm) -> None:
    model, tok = lm
    ids = tok("Hello there, general.", return_tensors="pt").input_ids
    n = ids.shape[1]
    mask = torch.ones(1, 1, n, n, dtype=torch.bool).tril()
    with pytest.raises(InputError, match="not a prepared 4-D mask"):
        model(input_ids=ids, attention_mask=mask, past_key_values=CompressedCache(model, "int4"))
    cache = CompressedCache(model, "int4")
    model(input_ids=ids, past_key_values=cache)
    with pytest.raises(InputError, match="cannot be cropped"):
        cache.crop(-1)


def test_other_caches_still_work_while_installed_and_uninstall_restores(lm) -> None:
    model, tok = lm
    enc = tok("The kvshrink attention stays installed; DynamicCache still works.", return_tensors="pt")
    cache = CompressedCache(model, "int4")
    assert model.config._attn_implementation == "kvshrink"
    with torch.no_grad():
        a = model(**enc, past_key_values=DynamicCache(config=model.config)).logits
        cache.uninstall()
        assert model.config._attn_implementation == "sdpa"
        b = model(**enc, past_key_values=DynamicCache(config=model.config)).logits
    torch.testing.assert_close(a, b)
