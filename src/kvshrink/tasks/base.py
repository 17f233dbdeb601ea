"""A long-context case, the task interface, the task registry and exact scoring.

A :class:`Case` is what the runner feeds a model: one long ``context`` (compressed before any
question is seen, the question-agnostic protocol of kvpress and SCBench), then each question in
turn on the same cache, each reply generated greedily after its ``answer_prefix``. Scoring is
exact: every expected string (a 7-digit number, a made-up word) must appear in the reply as a
whole word; a question scores the fraction found, a case the mean over its questions. No
fuzzy matching, so an accuracy is a count of facts the cache still delivered.

Cases are generated from the essays with a numpy ``Generator`` seeded from the task's spec,
the length and the case index, so case 7 of ``niah_single`` at 2048 tokens is the same text on
every machine and does not change when other tasks or lengths are added.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ..core.errors import SpecError
from ..core.registry import Registry
from ..core.seed import derive_seed
from ..core.spec import Configured, SpecConfig, format_config
from .haystack import Haystack

__all__ = [
    "TASKS",
    "Case",
    "Question",
    "Task",
    "TaskConfig",
    "make_task",
    "register_task",
    "score_case",
    "score_reply",
]


@dataclass(frozen=True)
class Question:
    """One turn: the question, the assistant's answer prefix, the strings the reply must contain."""

    text: str
    answer_prefix: str
    expected: tuple[str, ...]


@dataclass(frozen=True)
class Case:
    """``context`` is prefilled first; ``questions`` are asked in turn on the same cache."""

    task: str
    length: int
    index: int
    context: str
    questions: tuple[Question, ...]
    max_new_tokens: int


@dataclass(frozen=True)
class TaskConfig(SpecConfig):
    """Base of task configs; ``max_new_tokens`` bounds each reply (greedy, stops at EOS).

    16 covers a 7-digit answer after its answer prefix (9 tokens and EOS) with room to spare;
    a compressed cache that lost the needle rambles until the bound, so it sets the cost.
    """

    name: ClassVar[str] = ""
    max_new_tokens: int = 16

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise SpecError(f"{self.name}: max_new_tokens must be >= 1, got {self.max_new_tokens}")

    def __str__(self) -> str:
        return format_config(self)


class Task(Configured, ABC):
    """A task family: makes case ``index`` of about ``length`` tokens from the haystack."""

    config: TaskConfig

    def rng(self, length: int, index: int) -> np.random.Generator:
        return np.random.default_rng(derive_seed("longbench", self.spec, length, index))

    def case(self, hay: Haystack, length: int, index: int) -> Case:
        """Case ``index`` at ``length`` context tokens (deterministic)."""
        if length < 64:
            raise SpecError(f"{self.spec}: length must be >= 64 tokens, got {length}")
        if index < 0:
            raise SpecError(f"{self.spec}: case index must be >= 0, got {index}")
        context, questions = self.build(hay, length, self.rng(length, index))
        return Case(self.spec, length, index, context, tuple(questions), self.config.max_new_tokens)

    def cases(self, hay: Haystack, length: int, n: int) -> list[Case]:
        return [self.case(hay, length, i) for i in range(n)]

    @abstractmethod
    def build(self, hay: Haystack, length: int, rng: np.random.Generator) -> tuple[str, list[Question]]:
        """The context text (about ``length`` tokens) and its questions."""


TASKS: Registry[Task] = Registry("task")
register_task = TASKS.register


def make_task(spec: str) -> Task:
    """Build a task from its spec, e.g. ``make_task("niah_multikey:keys=8")``."""
    return TASKS.build(spec)


def _pattern(expected: str) -> re.Pattern[str]:
    return re.compile(r"(?<![A-Za-z0-9])" + re.escape(expected) + r"(?![A-Za-z0-9])", re.IGNORECASE)


def score_reply(reply: str, expected: tuple[str, ...]) -> float:
    """Fraction of ``expected`` strings found in ``reply`` as whole words (case-insensitive)."""
    if not expected:
        raise SpecError("a question needs at least one expected answer")
    return sum(bool(_pattern(e).search(reply)) for e in expected) / len(expected)


def score_case(case: Case, replies: list[str]) -> float:
    """Mean over the case's questions of :func:`score_reply`."""
    if len(replies) != len(case.questions):
        raise SpecError(f"{case.task}: {len(case.questions)} questions but {len(replies)} replies")
    return sum(score_reply(r, q.expected) for r, q in zip(replies, case.questions)) / len(replies)
