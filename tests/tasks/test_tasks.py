"""Task generation is deterministic, sized in tokens, and scored exactly."""

from __future__ import annotations

import itertools
import re
from collections import Counter

import numpy as np
import pytest

from kvshrink.core.errors import SpecError
from kvshrink.data import load_text
from kvshrink.tasks import DEFAULT_TASKS, TASKS, Haystack, make_task, score_case, score_reply
from kvshrink.tasks.haystack import insert, made_up_words


def words(texts):
    """A whitespace token counter: generation only needs some consistent count."""
    return [len(t.split()) for t in texts]


@pytest.fixture(scope="module")
def hay() -> Haystack:
    return Haystack(load_text(), words)


def test_default_suite_is_registered() -> None:
    assert set(DEFAULT_TASKS) == set(TASKS.names())


@pytest.mark.parametrize("spec", DEFAULT_TASKS)
def test_cases_are_deterministic_and_distinct(hay: Haystack, spec: str) -> None:
    task = make_task(spec)
    a, b = task.case(hay, 600, 3), make_task(spec).case(hay, 600, 3)
    assert a == b
    others = [task.case(hay, 600, 4), task.case(hay, 700, 3)]
    assert all(o.context != a.context for o in others)
    assert all(o.questions != a.questions for o in others)


@pytest.mark.parametrize("spec", DEFAULT_TASKS)
@pytest.mark.parametrize("length", [300, 2000])
def test_context_fills_its_length(hay: Haystack, spec: str, length: int) -> None:
    case = make_task(spec).case(hay, length, 0)
    n = hay.tokens(case.context)
    assert length * 0.85 <= n <= length * 1.03, n


@pytest.mark.parametrize(
    "spec", ["niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "multiturn"]
)
def test_needles_hold_every_expected_value_once(hay: Haystack, spec: str) -> None:
    case = make_task(spec).case(hay, 800, 1)
    for q in case.questions:
        for value in q.expected:
            assert case.context.count(value) == 1
            assert value not in q.text + q.answer_prefix  # the answer is never given away
    keys = {q.text.split(" for ")[1].split(" mentioned")[0] for q in case.questions}
    assert all(k.split(" and ")[0] not in hay.vocabulary for k in keys)


def test_task_options_shape_the_case(hay: Haystack) -> None:
    mv = make_task("niah_multivalue:values=3").case(hay, 500, 0)
    assert len(mv.questions[0].expected) == 3
    mq = make_task("niah_multiquery:keys=6,queries=3").case(hay, 500, 0)
    assert len(mq.questions[0].expected) == 3
    assert mq.context.count("One of the special magic numbers for") == 6
    mt = make_task("multiturn:turns=3,distractors=2").case(hay, 500, 0)
    assert len(mt.questions) == 3 and mt.context.count("One of the special magic numbers for") == 5
    assert len({q.expected for q in mt.questions}) == 3


def test_variable_chain_is_in_order_and_complete(hay: Haystack) -> None:
    case = make_task("vt:hops=3,chains=2").case(hay, 900, 2)
    names = case.questions[0].expected
    value = case.questions[0].text.split("value ")[1].split(" ")[0]
    assert len(names) == 4
    starts = [case.context.index(f"VAR {names[0]} = {value}.")]
    starts += [case.context.index(f"VAR {b} = VAR {a}.") for a, b in itertools.pairwise(names)]
    assert starts == sorted(starts)
    assert len(re.findall(r"VAR [A-Z]{5} = ", case.context)) == 8  # the distracting chain too


def test_common_words_are_the_most_frequent(hay: Haystack) -> None:
    case = make_task("cwe:common=4,freq=12,rare=2").case(hay, 1200, 0)
    body = case.context.split("most often. ")[1]
    counts = Counter(tok for tok in body.split() if not tok.endswith("."))
    top = {w for w, _ in counts.most_common(4)}
    assert top == set(case.questions[0].expected)
    assert min(counts[w] for w in top) > max(c for w, c in counts.items() if w not in top)


def test_exact_scoring() -> None:
    assert score_reply(" 4829137.", ("4829137",)) == 1.0
    assert score_reply("The number is 48291370", ("4829137",)) == 0.0  # no partial matches
    assert score_reply("x4829137", ("4829137",)) == 0.0
    assert score_reply("482 9137", ("4829137",)) == 0.0
    assert score_reply("1. Apple 2. pear", ("apple", "pear", "plum")) == pytest.approx(2 / 3)
    assert score_reply("", ("a",)) == 0.0
    with pytest.raises(SpecError):
        score_reply("x", ())


def test_case_score_is_the_mean_over_questions(hay: Haystack) -> None:
    case = make_task("multiturn:turns=2").case(hay, 400, 0)
    a, b = (q.expected[0] for q in case.questions)
    assert score_case(case, [a, "no"]) == 0.5
    assert score_case(case, [a, b]) == 1.0
    with pytest.raises(SpecError, match="2 questions but 1 replies"):
        score_case(case, [a])


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("niah_multiquery:queries=5", "cannot exceed keys=4"),
        ("niah_single:keys=0", "keys must be >= 1"),
        ("vt:hops=0", "hops must be >= 1"),
        ("cwe:freq=3", r"freq >= rare \+ 2"),
        ("multiturn:turns=1", "turns must be >= 2"),
        ("niah_single:depth=3", "unknown option 'depth'"),
        ("needle", "unknown task 'needle'"),
    ],
)
def test_bad_task_specs(spec: str, match: str) -> None:
    with pytest.raises(SpecError, match=match):
        make_task(spec)


def test_bad_lengths(hay: Haystack) -> None:
    with pytest.raises(SpecError, match="length must be >= 64"):
        make_task("niah_single").case(hay, 10, 0)
    with pytest.raises(Exception, match="length too short"):
        make_task("multiturn:turns=30").case(hay, 64, 0)


def test_helpers() -> None:
    rng = np.random.default_rng(0)
    assert insert(["a", "b"], ["X", "Y"], np.random.default_rng(1)).count("X") == 1
    out = insert(["a", "b", "c"], ["X", "Y", "Z"], rng)
    assert [t for t in out if t.isupper()] == ["X", "Y", "Z"] and len(out) == 6
    ws = made_up_words(np.random.default_rng(2), 20, avoid={"babab"})
    assert len(set(ws)) == 20 and "babab" not in ws
