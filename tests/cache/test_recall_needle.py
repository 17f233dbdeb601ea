"""ArkVale on SmolLM2: a passphrase hidden in ~1500 tokens of essays, asked after them.

The whole prompt (essays + question + the answer's first words) is one dense forward; ArkVale
then keeps a context/8 budget of tokens resident per KV head (sink page, two window pages, the
partial page and the top pages by the last prompt query), recalling evicted pages when a
decode query scores them high. Slow: ~10 cases of a 1.5k-token prompt, twice.
"""

from __future__ import annotations

import random

import pytest
import torch

from kvshrink.cache import CompressedCache

from .conftest import prompt

WORDS = (
    "tangerine", "obsidian", "lighthouse", "marmalade", "saxophone", "avalanche", "pelican",
    "kaleidoscope", "thunderbolt", "porcupine", "cinnamon", "glacier", "harmonica", "meadowlark",
)  # fmt: skip
ANSWER = "The secret passphrase is"  # primes the answer: the tiny model otherwise restates the question
QUESTION = "What is the secret passphrase mentioned in the text above? Answer with the passphrase only."


def needle_case(tok, essay: str, seed: int, n_tokens: int = 1500) -> tuple[torch.Tensor, str]:
    """Chat-formatted prompt ids with the passphrase at a seeded depth, and the passphrase."""
    rng = random.Random(seed)
    word = rng.choice(WORDS)
    haystack = prompt(tok, essay, n_tokens, offset=rng.randrange(0, len(essay) - 20 * n_tokens))
    cut = int(len(haystack) * rng.uniform(0.1, 0.8))
    cut = haystack.rfind(". ", 0, cut) + 2 if haystack.rfind(". ", 0, cut) > 0 else cut
    text = f"{haystack[:cut]}The secret passphrase is {word}. {haystack[cut:]}"
    messages = [{"role": "user", "content": f"{text}\n\n{QUESTION}"}]
    chat = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tok(chat + ANSWER, add_special_tokens=False, return_tensors="pt").input_ids
    return ids, word


def answer(
    model, tok, ids: torch.Tensor, spec: str | None, new: int = 8
) -> tuple[str, CompressedCache | None]:
    cache = CompressedCache(model, spec) if spec is not None else None
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new,
            do_sample=False,
            past_key_values=cache,
        )
    if cache is not None:
        cache.uninstall()
    return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True), cache


def accuracy(model, tok, essay: str, spec_for, seeds) -> tuple[float, list]:
    """Fraction of cases whose answer contains the passphrase; ``spec_for(n_prompt)`` builds the spec."""
    rows = []
    for seed in seeds:
        ids, word = needle_case(tok, essay, seed)
        spec = spec_for(ids.shape[1])
        text, cache = answer(model, tok, ids, spec)
        rows.append((seed, word, text.strip(), word.lower() in text.lower(), cache))
    return sum(r[3] for r in rows) / len(rows), rows


SPEC = "arkvale:budget={budget},page=16,group=max+fp16"  # page 32 / group mean: 0.00 (see below)


@pytest.mark.slow
@pytest.mark.heavy
@pytest.mark.xfail(
    strict=True,
    reason="issue target missed: on 10 cases full cache 0.60, arkvale page 16 group max at context/8 0.50 "
    "(page 32 group mean 0.00, streamingllm 0.00); strict, so meeting the target shows as a failure to remove this",
)
def test_arkvale_keeps_the_needle_at_an_eighth_resident(smollm2, essay) -> None:
    model, tok = smollm2
    seeds = range(10)
    full, _ = accuracy(model, tok, essay, lambda n: "fp16", seeds)
    ark, rows = accuracy(model, tok, essay, lambda n: SPEC.format(budget=n // 8), seeds)
    print(f"needle accuracy over {len(seeds)} cases: full cache {full:.2f}, arkvale at context/8 {ark:.2f}")
    cache = rows[-1][4]
    report = cache.memory_report()
    paged = report.layers[-1]
    assert paged.resident_live <= cache.parsed.policy.budget < paged.live / 7  # ~8x fewer tokens resident
    assert report.resident < report.total
    assert sum(layer.pages.recalls for layer in cache.layers if layer.pages is not None) > 0
    assert full >= 0.5  # the model can do the task at all
    assert ark >= full - 0.05
