"""The filler text that long-context cases hide their facts in: the embedded essays.

Cases are sized in tokens of the model under test, so the haystack counts every essay sentence
once with the caller's counter and then fills a budget by walking consecutive sentences from a
random start (wrapping around). Sentence counts add up to within a few tokens of the joined
text's count; the runner records the exact length it actually fed.

Made-up keys come from syllables, so they are pronounceable, tokenise into a few pieces and
never occur in the essays: a reply that contains one can only have read it from the context.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import numpy as np

from ..core.errors import InputError

__all__ = ["Haystack", "TokenCounter", "insert", "made_up_words", "numbers", "tokenizer_counter"]

#: counts the tokens of each text in a batch (no special tokens)
TokenCounter = Callable[[Sequence[str]], list[int]]

_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")
_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "gr", "st", "tr")
_VOWELS = ("a", "e", "i", "o", "u")


def tokenizer_counter(tokenizer) -> TokenCounter:
    """A :data:`TokenCounter` from a transformers tokenizer."""

    def count(texts: Sequence[str]) -> list[int]:
        return [len(ids) for ids in tokenizer(list(texts), add_special_tokens=False).input_ids]

    return count


class Haystack:
    """Essay sentences with their token counts, filled into budgets deterministically."""

    def __init__(self, text: str, count: TokenCounter) -> None:
        flat = " ".join(text.split())
        self.sentences = [s for s in _SENTENCE.split(flat) if len(s) > 1]
        if len(self.sentences) < 2:
            raise InputError("the haystack text needs at least two sentences")
        self.count = count
        self._lengths: list[int] | None = None
        self._vocab: set[str] | None = None

    @property
    def lengths(self) -> list[int]:
        """Tokens per sentence (counted once, on first use)."""
        if self._lengths is None:
            self._lengths = [n + 1 for n in self.count(self.sentences)]  # + the joining space
        return self._lengths

    @property
    def vocabulary(self) -> set[str]:
        """Lower-case words of the essays (made-up keys must avoid them)."""
        if self._vocab is None:
            self._vocab = {w.lower() for s in self.sentences for w in re.findall(r"[A-Za-z]+", s)}
        return self._vocab

    def words(self, min_len: int = 4) -> list[str]:
        """Distinct lower-case essay words of at least ``min_len`` letters, sorted (stable order)."""
        return sorted(w for w in self.vocabulary if len(w) >= min_len)

    def tokens(self, text: str) -> int:
        return self.count([text])[0]

    def fill(self, rng: np.random.Generator, budget: int) -> list[str]:
        """Consecutive sentences from a random start whose counts sum to at most ``budget``."""
        if budget < 1:
            raise InputError(
                f"length too short: the task's own text (instructions, needles) leaves {budget} tokens "
                "for filler text; use a larger length or fewer needles"
            )
        n = len(self.sentences)
        i = int(rng.integers(n))
        out: list[str] = []
        used = 0
        while used + self.lengths[i % n] <= budget and len(out) < n:
            out.append(self.sentences[i % n])
            used += self.lengths[i % n]
            i += 1
        return out


def insert(filler: list[str], items: Sequence[str], rng: np.random.Generator) -> list[str]:
    """``filler`` with ``items`` inserted in order at random sentence boundaries (depths)."""
    slots = np.sort(rng.integers(0, len(filler) + 1, size=len(items)))
    out: list[str] = []
    k = 0
    for i in range(len(filler) + 1):
        while k < len(items) and slots[k] == i:
            out.append(items[k])
            k += 1
        if i < len(filler):
            out.append(filler[i])
    return out


def made_up_words(rng: np.random.Generator, n: int, avoid: set[str], syllables: int = 3) -> list[str]:
    """``n`` distinct pronounceable words not in ``avoid`` (e.g. ``"brotaki"``)."""
    out: list[str] = []
    while len(out) < n:
        w = "".join(
            _ONSETS[rng.integers(len(_ONSETS))] + _VOWELS[rng.integers(len(_VOWELS))]
            for _ in range(syllables)
        )
        if w not in avoid and w not in out:
            out.append(w)
    return out


def numbers(rng: np.random.Generator, n: int, digits: int = 7) -> list[str]:
    """``n`` distinct ``digits``-digit numbers as strings (no leading zero)."""
    lo, hi = 10 ** (digits - 1), 10**digits
    out: list[str] = []
    while len(out) < n:
        v = str(int(rng.integers(lo, hi)))
        if v not in out:
            out.append(v)
    return out
