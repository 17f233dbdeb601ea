"""LazyEviction on hand-built views: recurrence tracking, the code's score, lagged eviction."""

from __future__ import annotations

import math

import torch

from kvshrink.policies import Observation, make_policy

from .views import kept, view


def tracked(n: int, last: dict[int, float], mri: dict[int, float]) -> torch.Tensor:
    """``[2, 2, 2, n]`` state: columns never important (last = 0, MRI = 0) except those given."""
    state = torch.zeros(2, 2, 2, n)
    for col, x in last.items():
        state[0, ..., col] = x
    for col, x in mri.items():
        state[1, ..., col] = x
    return state


def hits(n: int, cols: list[int]) -> Observation:
    h = torch.zeros(2, 2, n)
    h[..., cols] = 1.0
    return Observation(torch.zeros(2, 2, n), h, torch.ones(2, 2, n))


def test_prompt_tokens_start_at_the_prompt_end_and_decode_tokens_one_step_before() -> None:
    p = make_policy("lazyeviction:budget=64,window=4")
    assert p.observed_queries(6) == 0 and p.observed_queries(1) == 1  # decode steps only
    prompt = p.update_state(view(6, state=torch.zeros(2, 2, 2, 6)), None)
    assert prompt[0].eq(5).all() and prompt[1].eq(0).all()
    state = torch.cat([prompt, torch.zeros(2, 2, 2, 1)], -1)
    step = p.update_state(view(7, state=state, n_new=1), hits(7, [2, 6]))
    assert step[0, 0, 0].tolist() == [5, 5, 6, 5, 5, 5, 6]  # important now: last = 6
    assert step[1, 0, 0].tolist() == [0, 0, 1, 0, 0, 0, 1]  # one-step recurrence


def test_mri_is_the_longest_gap_between_important_steps() -> None:
    p = make_policy("lazyeviction:budget=64,window=4")
    state = tracked(11, {3: 2.0, 4: 7.0}, {3: 1.0, 4: 6.0})
    out = p.update_state(view(11, state=state, n_new=1), hits(11, [3, 4]))
    assert out[1, 0, 0, 3] == 8.0 and out[1, 0, 0, 4] == 6.0  # gaps 10 - 2 = 8 and 10 - 7 = 3 < 6
    assert out[0, 0, 0, 3] == 10.0 and out[0, 0, 0, 4] == 10.0


def test_score_is_the_codes_formula() -> None:
    p = make_policy("lazyeviction:budget=64,window=4")
    v = view(20, state=tracked(20, {2: 17.0, 5: 15.0}, {2: 4.0, 5: 1.0}), n_new=1)
    s = p.scores(v)[0, 0]
    now = 19
    expect2 = 2 / (1 + math.exp(1 + (now - 17) / (4 + 1e-5))) + 2 / (1 + math.exp(4 - 1))
    expect5 = 2 / (1 + math.exp(1 + (now - 15) / (1 + 1e-5))) + 1.0
    assert abs(float(s[2]) - expect2) < 1e-6 and abs(float(s[5]) - expect5) < 1e-6
    assert float(s[7]) < 1e-30  # never important: MRI = 0


def test_evicts_only_every_window_steps_keeping_the_window_newest() -> None:
    p = make_policy("lazyeviction:budget=8,window=4")
    state = tracked(
        20, {1: 18.0, 3: 17.0, 6: 18.0, 9: 12.0, 11: 16.0}, {1: 2.0, 3: 3.0, 6: 1.0, 9: 6.0, 11: 5.0}
    )
    assert p.on_prefill(view(20, state=state)) is None  # the prompt is never compressed
    assert p.on_decode(view(20, state=state, n_new=1, step=7)) is None  # not a window boundary
    v = view(20, state=state, n_new=1, step=8)
    d = p.on_decode(v)
    assert d is not None
    assert kept(d.keep, v, 0, 1) == [
        1,
        3,
        6,
        11,
        16,
        17,
        18,
        19,
    ]  # 9: idle 7 for an MRI of 6 scores 0.22 < 0.37
    assert p.on_decode(view(8, state=state[..., :8], n_new=1, step=8)) is None  # within budget
