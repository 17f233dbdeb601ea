"""A2SF on hand-built views: forgetting-factor scores, recent window, per-head selection."""

from __future__ import annotations

import torch

from kvshrink.policies import Observation, make_policy

from .views import kept, view


def test_keeps_recent_and_top_scored_per_head() -> None:
    s = torch.zeros(1, 2, 2, 20)
    s[0, :, 0, [3, 9, 12]] = torch.tensor([3.0, 2.0, 1.0])
    s[0, :, 1, [4, 6, 12]] = torch.tensor([1.0, 3.0, 2.0])
    v = view(20, state=s)
    d = make_policy("a2sf:budget=5,recent=2").on_decode(v)
    assert d is not None
    assert kept(d.keep, v, 0, 0) == [3, 9, 12, 18, 19]
    assert kept(d.keep, v, 1, 1) == [4, 6, 12, 18, 19]


def test_update_state_forgets_by_alpha_per_query() -> None:
    p = make_policy("a2sf:budget=32,alpha=0.5")
    assert p.query_decay() == 0.5 and p.observed_queries(300) == 300  # every prompt query
    state = torch.full((1, 2, 2, 6), 8.0)
    mass = torch.arange(12.0).view(2, 2, 3).repeat(1, 1, 2)
    out = p.update_state(view(6, state=state, n_new=3), Observation(mass))
    assert torch.allclose(out[0], 8.0 * 0.5**3 + mass)  # S <- alpha^n S + (weighted) new mass
    assert torch.equal(p.update_state(view(6, state=state, n_new=1), None), state * 0.5)


def test_alpha_one_scores_like_h2o() -> None:
    s = torch.rand(1, 2, 2, 30, generator=torch.Generator().manual_seed(0))
    v = view(30, state=s, scores=s[0])
    a = make_policy("a2sf:budget=10,recent=5,alpha=1").on_decode(v)
    h = make_policy("h2o:budget=10,recent=0.5").on_decode(v)
    assert a is not None and h is not None and torch.equal(a.keep, h.keep)
