"""Needle-in-a-haystack retrieval (RULER's NIAH family) over the essays.

Needles read "One of the special magic numbers for {key} is: {value}." with a made-up key and
a 7-digit value, inserted at random sentence boundaries. One config covers RULER's variants:

- ``niah_single``: one needle, asked for;
- ``niah_multikey``: ``keys`` needles with different keys, one asked for (the rest distract);
- ``niah_multivalue``: one key with ``values`` values, all asked for;
- ``niah_multiquery``: ``keys`` needles, ``queries`` of them asked for in one question.

Prompts, needle and answer prefix follow RULER's templates; the answer prefix is the start of
the assistant's turn, so even a small model answers in a scorable form.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ..core.errors import SpecError
from .base import Question, Task, TaskConfig, register_task
from .haystack import Haystack, insert, made_up_words, numbers

__all__ = ["NIAH_PREAMBLE", "Niah", "NiahConfig", "needle", "niah_context"]

NIAH_PREAMBLE = (
    "Some special magic numbers are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the numbers afterwards."
)


def needle(key: str, value: str) -> str:
    return f"One of the special magic numbers for {key} is: {value}."


def niah_context(hay: Haystack, length: int, rng: np.random.Generator, needles: list[str]) -> str:
    """Preamble, then essay sentences with ``needles`` at random depths: about ``length`` tokens."""
    own = hay.tokens(NIAH_PREAMBLE) + sum(hay.tokens(n) + 1 for n in needles)
    filler = hay.fill(rng, length - own)
    return " ".join([NIAH_PREAMBLE, *insert(filler, needles, rng)])


def _join(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


@dataclass(frozen=True)
class NiahConfig(TaskConfig):
    name: ClassVar[str] = "niah_single"
    keys: int = 1
    values: int = 1
    queries: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        for field in ("keys", "values", "queries"):
            if getattr(self, field) < 1:
                raise SpecError(f"{self.name}: {field} must be >= 1, got {getattr(self, field)}")
        if self.queries > self.keys:
            raise SpecError(f"{self.name}: queries={self.queries} cannot exceed keys={self.keys}")


@dataclass(frozen=True)
class NiahMultiKeyConfig(NiahConfig):
    name: ClassVar[str] = "niah_multikey"
    keys: int = 4


@dataclass(frozen=True)
class NiahMultiValueConfig(NiahConfig):
    name: ClassVar[str] = "niah_multivalue"
    values: int = 4
    max_new_tokens: int = 48


@dataclass(frozen=True)
class NiahMultiQueryConfig(NiahConfig):
    name: ClassVar[str] = "niah_multiquery"
    keys: int = 4
    queries: int = 2
    max_new_tokens: int = 40


class Niah(Task):
    config: NiahConfig

    def build(self, hay: Haystack, length: int, rng: np.random.Generator) -> tuple[str, list[Question]]:
        c = self.config
        keys = made_up_words(rng, c.keys, hay.vocabulary)
        vals = numbers(rng, c.keys * c.values)
        table = {k: vals[i * c.values : (i + 1) * c.values] for i, k in enumerate(keys)}
        needles = [needle(k, v) for k in keys for v in table[k]]
        order = rng.permutation(len(needles))
        context = niah_context(hay, length, rng, [needles[i] for i in order])
        asked = [keys[i] for i in sorted(rng.choice(c.keys, size=c.queries, replace=False))]
        expected = tuple(v for k in asked for v in table[k])
        if len(expected) == 1:
            text = f"What is the special magic number for {asked[0]} mentioned in the provided text?"
            prefix = f"The special magic number for {asked[0]} mentioned in the provided text is"
        else:
            text = (
                f"What are all the special magic numbers for {_join(asked)} mentioned in the provided text?"
            )
            prefix = f"The special magic numbers for {_join(asked)} mentioned in the provided text are"
        return context, [Question(text, prefix, expected)]


for _cfg in (NiahConfig, NiahMultiKeyConfig, NiahMultiValueConfig, NiahMultiQueryConfig):
    register_task(_cfg)(Niah)
