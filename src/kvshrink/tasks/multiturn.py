"""A shared-context session (SCBench-style): several questions, one cache, answers appended.

The context hides ``turns`` needles with different keys (plus ``distractors`` more); the
session asks for one key per turn, each after the previous reply has been appended to the
cache. The cache is compressed once, before the first question, so a query-agnostic eviction
that kept what turn 1 needed has already dropped what turn 3 needs: SCBench shows such
methods lose most of their accuracy after the first turn, while full-KV or recall designs do
not. The accuracy is the mean over turns; the runner also keeps the per-turn scores.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ..core.errors import SpecError
from .base import Question, Task, TaskConfig, register_task
from .haystack import Haystack, made_up_words, numbers
from .needle import needle, niah_context

__all__ = ["MultiTurn", "MultiTurnConfig"]


@dataclass(frozen=True)
class MultiTurnConfig(TaskConfig):
    name: ClassVar[str] = "multiturn"
    turns: int = 4
    distractors: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.turns < 2:
            raise SpecError(f"multiturn: turns must be >= 2 (one turn is niah_multikey), got {self.turns}")
        if self.distractors < 0:
            raise SpecError(f"multiturn: distractors must be >= 0, got {self.distractors}")


@register_task(MultiTurnConfig)
class MultiTurn(Task):
    config: MultiTurnConfig

    def build(self, hay: Haystack, length: int, rng: np.random.Generator) -> tuple[str, list[Question]]:
        c = self.config
        n = c.turns + c.distractors
        keys = made_up_words(rng, n, hay.vocabulary)
        vals = numbers(rng, n)
        needles = [needle(k, v) for k, v in zip(keys, vals)]
        order = rng.permutation(n)
        context = niah_context(hay, length, rng, [needles[i] for i in order])
        asked = rng.choice(n, size=c.turns, replace=False)  # the turn order is not the text order
        return context, [
            Question(
                f"What is the special magic number for {keys[i]} mentioned in the provided text?",
                f"The special magic number for {keys[i]} mentioned in the provided text is",
                (vals[i],),
            )
            for i in asked
        ]
