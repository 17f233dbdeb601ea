"""The long-context runner: every method on the same cases, question-agnostic, exact scoring.

Per case and method (batch 1, greedy, deterministic):

1. the chat-formatted context is prefilled into a fresh cache from the method (a kvpress press
   prunes inside this forward; a CompressedCache policy decides after it);
2. the first question chunk (rest of the user turn, assistant header, answer prefix) is fed as
   a separate forward on that cache; the bytes held are counted now, after context + question;
3. the reply is generated greedily, up to the task's ``max_new_tokens`` or an end token;
4. a multi-turn case appends the reply and feeds the next question on the same cache.

Position ids are passed explicitly from the true token count, so a cache that dropped tokens
(kvpress) still places the question where the sequence is; a CompressedCache counts evicted
tokens in its own length, so this is what it would compute anyway. Rows aggregate cases per
(method, task, length): ``accuracy`` in percent, and the ratios of the fp16 reference bytes
over the total and resident bytes held (summed over cases).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..core.errors import SpecError
from ..tasks import Case, Haystack, make_task, score_reply
from .chat import ChatPrompt
from .longbench_methods import build_longbench_method, cache_bytes, fp16_baseline

__all__ = ["CaseResult", "LongbenchConfig", "run_case", "run_longbench", "summarize"]


@dataclass(frozen=True)
class LongbenchConfig:
    tasks: tuple[str, ...]
    lengths: tuple[int, ...]
    cases: int

    def __post_init__(self) -> None:
        if not self.tasks:
            raise SpecError("no task given: expected e.g. 'niah_single;multiturn'")
        if not self.lengths or any(n < 64 for n in self.lengths):
            raise SpecError(f"--lengths must be context sizes >= 64 tokens, got {list(self.lengths)}")
        if self.cases < 1:
            raise SpecError(f"--cases must be >= 1, got {self.cases}")
        for spec in self.tasks:
            make_task(spec)  # a bad task spec fails before any model is loaded


@dataclass
class CaseResult:
    method: str
    task: str
    length: int
    index: int
    tokens: int  # context tokens actually fed (chat template included)
    scores: list[float]  # per question
    replies: list[str]
    resident: int
    total: int
    fp16: int
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def accuracy(self) -> float:
        return sum(self.scores) / len(self.scores)


def _stop_ids(model: Any, tokenizer: Any) -> set[int]:
    ids = {tokenizer.eos_token_id}
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None)
    ids.update(eos if isinstance(eos, list) else [eos])
    return {i for i in ids if i is not None}


class _Session:
    """One sequence on one cache: feeds chunks at their true positions, generates greedily."""

    def __init__(self, model: Any, cache: Any) -> None:
        self.model, self.cache = model, cache
        self.device = next(model.parameters()).device
        self.pos = 0

    @torch.no_grad()
    def feed(self, ids: list[int], **extra: Any) -> torch.Tensor:
        x = torch.tensor([ids], dtype=torch.long, device=self.device)
        position_ids = torch.arange(self.pos, self.pos + len(ids), device=self.device).unsqueeze(0)
        out = self.model(
            input_ids=x,
            past_key_values=self.cache,
            position_ids=position_ids,
            use_cache=True,
            logits_to_keep=1,
            **extra,
        )
        self.pos += len(ids)
        return out.logits[0, -1]

    def generate(self, logits: torch.Tensor, max_new: int, stop: set[int]) -> tuple[list[int], bool]:
        """Greedy reply; returns its ids and whether the last one still has to be fed."""
        out = [int(logits.argmax())]
        while out[-1] not in stop and len(out) < max_new:
            out.append(int(self.feed([out[-1]]).argmax()))
        return out, out[-1] not in stop


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def run_case(model: Any, tokenizer: Any, prompt: ChatPrompt, method: Any, case: Case) -> CaseResult:
    """Run one case with one method (see the module docstring for the protocol)."""
    t0 = time.perf_counter()
    stop = _stop_ids(model, tokenizer)
    cache = method.new_cache(model)
    session = _Session(model, cache)
    try:
        ctx = _encode(tokenizer, prompt.context(case.context))
        with method.prefill(model, len(ctx), session.device) as extra:
            session.feed(ctx, **extra)
        carry: list[int] = []
        scores, replies = [], []
        held = None
        for turn, q in enumerate(case.questions):
            logits = session.feed(carry + _encode(tokenizer, prompt.question(q.text, q.answer_prefix, turn)))
            if held is None:
                held, fp16 = cache_bytes(cache), fp16_baseline(model, session.pos)
            reply, pending = session.generate(logits, case.max_new_tokens, stop)
            carry = reply[-1:] if pending else []
            text = tokenizer.decode([t for t in reply if t not in stop], skip_special_tokens=True)
            replies.append(text)
            scores.append(score_reply(text, q.expected))
    finally:
        method.release(model, cache)
    assert held is not None
    return CaseResult(
        method.name, case.task, case.length, case.index, len(ctx), scores, replies,
        held.resident, held.total, fp16, time.perf_counter() - t0,
    )  # fmt: skip


def _se(xs: Sequence[float]) -> float:
    n = len(xs)
    if n < 2:
        return float("nan")
    m = sum(xs) / n
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1) / n)


def summarize(results: Sequence[CaseResult]) -> list[dict]:
    """One row per (method, task, length), in first-seen order."""
    groups: dict[tuple[str, str, int], list[CaseResult]] = {}
    for r in results:
        groups.setdefault((r.method, r.task, r.length), []).append(r)
    rows = []
    for (method, task, length), rs in groups.items():
        acc = [100.0 * r.accuracy for r in rs]
        fp16 = sum(r.fp16 for r in rs)
        row = {
            "method": method,
            "task": task,
            "length": length,
            "accuracy": sum(acc) / len(acc),
            "compression_ratio": fp16 / max(sum(r.total for r in rs), 1),
            "resident_ratio": fp16 / max(sum(r.resident for r in rs), 1),
            # extras beyond the fixed interface
            "accuracy_se": _se(acc),
            "cases": len(rs),
            "tokens": sum(r.tokens for r in rs) / len(rs),
            "seconds": sum(r.seconds for r in rs),
        }
        if len(rs[0].scores) > 1:
            row["turn_accuracy"] = [
                100.0 * sum(r.scores[t] for r in rs) / len(rs) for t in range(len(rs[0].scores))
            ]
        rows.append(row)
    return rows


def run_longbench(
    model: Any,
    tokenizer: Any,
    methods: Sequence[str | Any],
    cfg: LongbenchConfig,
    haystack: Haystack,
    model_name: str = "",
    progress: Callable[[int], Any] | None = None,
    on_result: Callable[[CaseResult], None] | None = None,
    keep_replies: bool = False,
) -> dict:
    """Every method on the same cases of every task and length; returns the JSON document.

    Cases are generated once per (task, length) and shared by all methods. ``on_result`` sees
    each case result as it finishes (for a caller that writes partial results);
    ``keep_replies`` adds every reply and its scores to the document.
    """
    built = [build_longbench_method(m) if isinstance(m, str) else m for m in methods]
    for m in built:
        if hasattr(m, "check"):
            m.check(model)
    prompt = ChatPrompt.from_tokenizer(tokenizer)
    tasks = [make_task(t) for t in cfg.tasks]
    bar = progress(len(tasks) * len(cfg.lengths) * cfg.cases * len(built)) if progress else None
    results: list[CaseResult] = []
    for task in tasks:
        for length in cfg.lengths:
            cases = task.cases(haystack, length, cfg.cases)
            for method in built:
                for case in cases:
                    r = run_case(model, tokenizer, prompt, method, case)
                    results.append(r)
                    if on_result:
                        on_result(r)
                    if bar:
                        bar.update(1)
    if bar:
        bar.close()
    doc = {
        "model": model_name,
        "accuracy_unit": "percent",
        "bytes": "fp16 reference over bytes held after context + first question; dense tensors at 2 B/elem",
        "cases": cfg.cases,
        "lengths": list(cfg.lengths),
        "tasks": [t.spec for t in tasks],
        "methods": [m.name for m in built],
        "rows": summarize(results),
    }
    if keep_replies:
        doc["replies"] = [
            {
                "method": r.method,
                "task": r.task,
                "length": r.length,
                "case": r.index,
                "scores": r.scores,
                "replies": r.replies,
            }
            for r in results
        ]
    return doc
