"""Long-context tasks generated from the embedded essays: RULER-style retrieval, tracking and
aggregation, and an SCBench-style multi-turn session. ``TASKS`` maps a spec (``vt:hops=2``)
to a task; ``task.cases(haystack, length, n)`` makes the deterministic cases."""

from . import common_words, multiturn, needle, variables  # noqa: F401  (register the tasks)
from .base import TASKS, Case, Question, Task, TaskConfig, make_task, register_task, score_case, score_reply
from .haystack import Haystack, TokenCounter, tokenizer_counter

__all__ = [
    "DEFAULT_TASKS",
    "TASKS",
    "Case",
    "Haystack",
    "Question",
    "Task",
    "TaskConfig",
    "TokenCounter",
    "make_task",
    "register_task",
    "score_case",
    "score_reply",
    "tokenizer_counter",
]

#: the suite run by default, in table order
DEFAULT_TASKS = (
    "niah_single",
    "niah_multikey",
    "niah_multivalue",
    "niah_multiquery",
    "vt",
    "cwe",
    "multiturn",
)
