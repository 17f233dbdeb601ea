"""Common-word extraction (RULER ``cwe``): aggregate counts over a long numbered word list.

Words are drawn from the essays' vocabulary. ``common`` words appear ``freq`` times each and
every other word ``rare`` times, shuffled into one numbered list of about ``length`` tokens;
the question asks for the ``common`` most frequent words. No single position holds the answer,
so this probes whether a compressed cache still supports aggregation over the whole context,
which token eviction by attention score tends to destroy. When the list is too short for
``common * freq`` entries (short lengths), ``freq`` is lowered so that common entries stay
at most half the list, and never below ``rare + 2``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ..core.errors import SpecError
from .base import Question, Task, TaskConfig, register_task
from .haystack import Haystack

__all__ = ["CommonWords", "CommonWordsConfig"]

PREAMBLE = (
    "Below is a numbered list of words. In these words, some appear more often than others. "
    "Memorize the ones that appear most often."
)
_QUESTION = "Question: What are the {k} most common words in the above list?"
_PREFIX = "Answer: The top {k} words that appear most often in the list are:"


@dataclass(frozen=True)
class CommonWordsConfig(TaskConfig):
    name: ClassVar[str] = "cwe"
    common: int = 10
    freq: int = 30
    rare: int = 3
    max_new_tokens: int = 64

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.common < 1:
            raise SpecError(f"cwe: common must be >= 1, got {self.common}")
        if self.rare < 1 or self.freq < self.rare + 2:
            raise SpecError(
                f"cwe: need rare >= 1 and freq >= rare + 2, got freq={self.freq}, rare={self.rare}"
            )


@register_task(CommonWordsConfig)
class CommonWords(Task):
    config: CommonWordsConfig

    def _listing(self, words: list[str], n_entries: int, rng: np.random.Generator) -> str:
        c = self.config
        freq = max(c.rare + 2, min(c.freq, n_entries // (2 * c.common)))
        n_rare = max(1, (n_entries - c.common * freq) // c.rare)
        entries = [w for w in words[: c.common] for _ in range(freq)]
        entries += [w for w in words[c.common : c.common + n_rare] for _ in range(c.rare)]
        order = rng.permutation(len(entries))
        body = " ".join(f"{i + 1}. {entries[j]}" for i, j in enumerate(order))
        return f"{PREAMBLE} {body}"

    def build(self, hay: Haystack, length: int, rng: np.random.Generator) -> tuple[str, list[Question]]:
        c = self.config
        # words of the prompt itself would be found in any reply: never list them
        template = set(re.findall(r"[a-z]+", (PREAMBLE + _QUESTION + _PREFIX).lower()))
        vocab = [w for w in hay.words(4) if w not in template]
        if len(vocab) < 2 * c.common:
            raise SpecError(f"cwe: the haystack has only {len(vocab)} distinct words of 4+ letters")
        seed = int(rng.integers(2**63 - 1))
        n = max(c.common * (c.rare + 2) * 2, length // 4)  # first guess: ~4 tokens per entry
        for _ in range(3):  # rescale the entry count to the measured tokens per entry
            sub = np.random.default_rng(seed)
            pick = sub.choice(len(vocab), size=min(len(vocab), n + c.common), replace=False)
            words = [vocab[i] for i in pick]
            text = self._listing(words, n, sub)
            used = hay.tokens(text)
            if abs(used - length) <= max(8, length // 50):
                break
            n = max(c.common * (c.rare + 2) * 2, int(n * length / used))
        k = c.common
        return text, [Question(_QUESTION.format(k=k), _PREFIX.format(k=k), tuple(words[:k]))]
