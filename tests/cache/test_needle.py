"""A needle in ~1500 tokens of essays, retrieved by SmolLM2 through a >= 8x compressed cache.

The issue's target: "at >= 8x total reduction (policy and codec together, e.g. MiKV-style
low-bit instead of dropping, plus FibQuant), needle accuracy >= 80%". Ten cases put a
different number at depths 5%..95%; the answer is greedy and must contain the number. The
reduction is the cache's own count (fp16 DynamicCache bytes over every byte held: codes,
norms, window, positions, scores, codebooks), taken after the answer.

Spec: MiKV keeps 1/4 of each head's tokens (half of them the newest) with ``fibquant:b=2`` and
the other 3/4 with ``fibquant:b=1,k=8``; the cache window is 0 and blocks are 16 tokens, since
a full-precision window of float32 tokens costs as much as ten times as many packed ones.
(Keeping 1/8 instead, 8.9x, loses the needle: the answer stops after its first digit.)

Not met yet, so the test is a strict xfail (it flags the day it passes): measured on CPU, this
spec reaches 8.2x but finds 3/10 needles; the answers usually start with the right digit and
then go wrong. The needle digits are not heavy hitters, so they land in the 1-bit tier, which
cannot carry them. ``zipcache:ratio=0.8`` (last-5% probes) did worse (1/10 at 8.4x), while
``mikv:ratio=0.75`` with a 16-token float32 window (7.1x) found case 0. See the branch report.
"""

from __future__ import annotations

import pytest
import torch

from kvshrink.cache import CompressedCache

SPEC = "mikv:ratio=0.75,low=[fibquant:b=1,k=8]+fibquant:b=2+cache:window=0,block=16"
NUMBERS = (7392, 4815, 2604, 9137, 5581, 3726, 8049, 6213, 1958, 4470)
QUESTION = "\n\nQuestion: What is the magic number? Answer: The magic number is"


def needle_prompt(tok, essay: str, i: int, n_tokens: int = 1500) -> tuple[str, str]:
    """Case ``i``: ``n_tokens`` of essay with the needle at depth ``(i + 0.5) / 10``."""
    start = 20000 + 3000 * i
    ids = tok(essay[start : start + 8 * n_tokens], add_special_tokens=False).input_ids[:n_tokens]
    cut = int((i + 0.5) / len(NUMBERS) * len(ids))
    n = NUMBERS[i]
    needle = f" The magic number is {n}. Remember it: the magic number is {n}. "
    return tok.decode(ids[:cut]) + needle + tok.decode(ids[cut:]) + QUESTION, str(n)


@pytest.mark.slow
@pytest.mark.heavy
@pytest.mark.xfail(strict=True, reason="issue target not met: 3/10 needles at 8.2x (see module docstring)")
def test_mikv_fibquant_finds_the_needle_at_8x(smollm2, essay) -> None:
    model, tok = smollm2
    hits, ratios = [], []
    try:
        for i in range(len(NUMBERS)):
            prompt, answer = needle_prompt(tok, essay, i)
            enc = tok(prompt, return_tensors="pt")
            cache = CompressedCache(model, SPEC)
            with torch.no_grad():
                out = model.generate(**enc, max_new_tokens=6, do_sample=False, past_key_values=cache)
            text = tok.decode(out[0, enc.input_ids.shape[1] :])
            hits.append(answer in text)
            ratios.append(cache.memory_report().ratio)
            print(f"case {i}: {answer} -> {text!r} {ratios[-1]:.2f}x")
    finally:
        cache.uninstall()
    print(f"\n{SPEC}: {sum(hits)}/{len(hits)} needles, reduction {min(ratios):.2f}x-{max(ratios):.2f}x")
    assert min(ratios) >= 8.0
    assert sum(hits) >= 0.8 * len(NUMBERS)
