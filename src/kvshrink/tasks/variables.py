"""Variable tracking (RULER ``vt``): follow a chain of assignments through the essays.

``VAR QPTXW = 48213.`` starts a chain; each hop ``VAR HJKLM = VAR QPTXW.`` copies the previous
variable; the statements sit in order at random depths of the essay text. The question asks
for every variable that ends up holding the first chain's value, so each hop is one more fact
the cache must still hold and connect. ``chains - 1`` further chains (other values) distract.
Templates follow RULER, including its answer prefix that states how many variables to list.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ..core.errors import SpecError
from .base import Question, Task, TaskConfig, register_task
from .haystack import Haystack, insert, numbers

__all__ = ["VariableTracking", "VariableTrackingConfig"]

PREAMBLE = "Memorize and track the chain(s) of variable assignment hidden in the following text."
_LETTERS = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ"))


@dataclass(frozen=True)
class VariableTrackingConfig(TaskConfig):
    name: ClassVar[str] = "vt"
    hops: int = 4
    chains: int = 1
    max_new_tokens: int = 40

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.hops < 1:
            raise SpecError(f"vt: hops must be >= 1, got {self.hops}")
        if self.chains < 1:
            raise SpecError(f"vt: chains must be >= 1, got {self.chains}")


def _names(rng: np.random.Generator, n: int) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        name = "".join(rng.choice(_LETTERS, size=5))
        if name not in out:
            out.append(name)
    return out


@register_task(VariableTrackingConfig)
class VariableTracking(Task):
    config: VariableTrackingConfig

    def build(self, hay: Haystack, length: int, rng: np.random.Generator) -> tuple[str, list[Question]]:
        c = self.config
        names = _names(rng, c.chains * (c.hops + 1))
        values = numbers(rng, c.chains, digits=5)
        chains = []
        for j in range(c.chains):
            v = names[j * (c.hops + 1) : (j + 1) * (c.hops + 1)]
            chains.append(
                [f"VAR {v[0]} = {values[j]}."] + [f"VAR {b} = VAR {a}." for a, b in itertools.pairwise(v)]
            )
        # interleave the chains at random, each chain's statements in order
        cursor = [0] * c.chains
        statements = []
        for j in rng.permutation(np.repeat(np.arange(c.chains), c.hops + 1)):
            statements.append(chains[j][cursor[j]])
            cursor[j] += 1
        own = hay.tokens(PREAMBLE) + sum(hay.tokens(s) + 1 for s in statements)
        filler = hay.fill(rng, length - own)
        context = " ".join([PREAMBLE, *insert(filler, statements, rng)])
        first = names[: c.hops + 1]
        return context, [
            Question(
                f"Question: Find all variables that are assigned the value {values[0]} in the text above.",
                f"Answer: According to the chain(s) of variable assignment in the text above, {len(first)} "
                f"variables are assigned the value {values[0]}, they are:",
                tuple(first),
            )
        ]
