"""Scissorhands on hand-built views: importance rates, sinks and recent tokens, block drops."""

from __future__ import annotations

import pytest
import torch

from kvshrink.policies import UNIFORM, Observation, make_policy

from .views import kept, view


def rates(n: int, hits: dict[int, float], seen: float = 10.0) -> torch.Tensor:
    """``[2, 2, 2, n]`` state: ``hits`` per column for head 0, mirrored columns for head 1."""
    state = torch.zeros(2, 2, 2, n)
    state[1] = seen
    for col, h in hits.items():
        state[0, :, 0, col] = h
        state[0, :, 1, n - 1 - col] = h
    return state


def test_keeps_first_token_recent_ones_and_the_most_often_important() -> None:
    v = view(20, state=rates(20, {5: 9, 7: 8, 11: 7, 13: 6, 14: 5, 2: 1}))
    d = make_policy("scissorhands:budget=8,recent=3").on_prefill(v)
    assert d is not None
    assert kept(d.keep, v, 0, 0) == [0, 5, 7, 11, 13, 17, 18, 19]
    assert kept(d.keep, v, 1, 1) == [0, 6, 8, 12, 14, 17, 18, 19]  # each KV head its own set
    assert d.keep.sum(-1).eq(8).all()


def test_ranks_by_share_of_observing_queries_not_by_raw_count() -> None:
    state = rates(20, {4: 6.0, 9: 3.0}, seen=20.0)
    state[1, :, :, 9] = 3.0  # a young token: important every time it was observed
    v = view(20, state=state)
    d = make_policy("scissorhands:budget=3,recent=1").on_decode(v)
    assert d is not None
    assert kept(d.keep, v, 0, 0) == [0, 9, 19]


def test_drop_evicts_a_block_below_the_budget() -> None:
    p = make_policy("scissorhands:budget=10,recent=2,drop=0.5")
    v = view(20, state=rates(20, {3: 5, 8: 4}))
    d = p.on_decode(v)
    assert d is not None
    assert kept(d.keep, v, 0, 0) == [0, 3, 8, 18, 19]  # 10 - 0.5 * 10 slots remain
    assert p.on_decode(view(10, state=rates(10, {}))) is None  # at the budget: nothing to do


def test_update_state_decays_then_adds_hits_and_observations() -> None:
    p = make_policy("scissorhands:budget=32,window=4")
    assert p.observed_queries(1000) == 4 and p.observed_queries(1) == 1
    assert p.hit_threshold() == UNIFORM and p.query_decay() == pytest.approx(0.75)
    state = torch.ones(2, 2, 2, 5)
    hits = torch.zeros(2, 2, 5)
    hits[..., 3] = 1.0
    out = p.update_state(
        view(5, state=state, n_new=2), Observation(torch.zeros(2, 2, 5), hits, torch.ones(2, 2, 5))
    )
    gamma2 = 0.75**2
    assert torch.allclose(out[0, 0, 0], torch.tensor([gamma2, gamma2, gamma2, gamma2 + 1, gamma2]))
    assert torch.allclose(out[1], torch.full((2, 2, 5), gamma2 + 1))
    assert torch.equal(p.update_state(view(5, state=state, n_new=1), None), state * 0.75)
