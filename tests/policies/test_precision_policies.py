"""MiKV, ZipCache and RazorAttention on synthetic layer views: what each keeps, demotes, drops."""

from __future__ import annotations

import pytest
import torch

from kvshrink.core import InputError, KvshrinkError, SpecError
from kvshrink.policies import LayerView, make_policy
from kvshrink.policies.precision import newest_rank
from kvshrink.policies.razor import format_heads, parse_heads, pick_heads


def view(n: int = 20, scores=None, low=None, heads: int = 2, layer: int = 0, n_new: int | None = None):
    pos = torch.arange(n).view(1, 1, n).repeat(2, heads, 1)
    return LayerView(layer, pos, scores, torch.tensor([n, n]), n if n_new is None else n_new, low=low)


def positions(mask: torch.Tensor, b: int = 0, h: int = 0) -> list[int]:
    return torch.arange(mask.shape[-1])[mask[b, h]].tolist()


def test_mikv_keeps_every_token_and_demotes_what_h2o_would_evict() -> None:
    s = torch.zeros(2, 2, 20)
    s[:, :, 1] = 3.0
    s[:, :, 7] = 2.0
    d = make_policy("mikv:budget=6,recent=0.5").on_prefill(view(20, s))
    assert d is not None and d.keep.all()
    assert d.low_precision is not None
    assert positions(~d.low_precision) == [0, 1, 7, 17, 18, 19]  # = h2o:budget=6 keeps
    h2o = make_policy("h2o:budget=6,recent=0.5").on_prefill(view(20, s))
    assert h2o is not None and torch.equal(~d.low_precision, h2o.keep)


def test_already_low_slots_stay_low_and_do_not_use_the_budget() -> None:
    s = torch.zeros(2, 2, 12)
    s[:, :, 2] = 5.0  # the best score, but already low: it cannot be promoted
    low = torch.zeros(2, 2, 12, dtype=torch.bool)
    low[..., :4] = True
    d = make_policy("mikv:budget=4,recent=0.5").on_prefill(view(12, s, low))
    assert d is not None and d.low_precision is not None
    high = ~d.low_precision
    assert positions(high) == [4, 5, 10, 11] and int(high.sum(-1).max()) == 4


def test_recent_share_follows_positions_not_slot_order() -> None:
    v = view(10)
    pos = v.positions.flip(-1)  # newest slot first
    v2 = LayerView(0, pos, torch.zeros(2, 2, 10), v.seen_valid, 10)
    d = make_policy("mikv:budget=4,recent=0.5").on_prefill(v2)
    assert d is not None and d.low_precision is not None
    assert sorted(pos[0, 0][~d.low_precision[0, 0]].tolist())[-2:] == [8, 9]
    assert newest_rank(pos, pos >= 0)[0, 0, 0] == 0


def test_decode_waits_for_lag_tokens_over_budget() -> None:
    p = make_policy("mikv:budget=10,lag=4")
    s = torch.rand(2, 2, 13)
    assert p.on_decode(view(13, s, n_new=1)) is None  # 3 over budget: wait
    d = p.on_decode(view(14, torch.rand(2, 2, 14), n_new=1))  # 4 over: demote to the budget
    assert d is not None and d.low_precision is not None
    assert int((~d.low_precision).sum(-1).max()) == 10


def test_zipcache_normalizes_by_the_probes_that_saw_a_token() -> None:
    n = 20
    assert make_policy("zipcache:budget=2").observed_queries(n) == 1  # the last 5%, at least one
    assert make_policy("zipcache:budget=2,probe=0.25").observed_queries(n) == 5
    # with every query a probe, each gives each visible token the same mass: the sum favours
    # old tokens, the mean does not
    s = torch.tensor([float(n - j) for j in range(n)]).expand(2, 2, n).clone()
    s[:, :, 15] *= 3.0  # a late token that drew three times the mass per query
    d = make_policy("zipcache:budget=2,probe=1").on_prefill(view(n, s))
    assert d is not None and d.low_precision is not None
    assert 15 in positions(~d.low_precision)
    h = make_policy("mikv:budget=2,recent=0").on_prefill(view(n, s))
    assert h is not None and h.low_precision is not None
    assert 15 not in positions(~h.low_precision)  # the raw sum keeps the oldest instead


def test_razor_keeps_retrieval_heads_whole_and_windows_the_rest() -> None:
    p = make_policy("razor:budget=6,sinks=2,heads=3:1")
    d = p.on_prefill(view(20, layer=3))
    assert d is not None and d.compensate
    assert positions(d.keep, 0, 0) == [0, 1, 16, 17, 18, 19]
    assert positions(d.keep, 0, 1) == list(range(20))
    assert make_policy("razor:budget=6,sinks=2,heads=3:0/3:1").on_prefill(view(20, layer=3)) is None
    d0 = make_policy("razor:budget=6,sinks=2,heads=3:1,compensate=0").on_prefill(view(20, layer=0))
    assert d0 is not None and not d0.compensate and int(d0.keep.sum(-1).max()) == 6


def test_razor_ratio_window_has_a_floor() -> None:
    p = make_policy("razor:ratio=0.9,sinks=4,window=8,heads=0:0")
    d = p.on_prefill(view(40))
    assert d is not None and int(d.keep[0, 1].sum()) == 12  # max(8, ceil(0.1 * 40) - 4) + 4 sinks


def test_razor_without_heads_refuses_to_guess() -> None:
    with pytest.raises(InputError, match="retrieval heads are unknown"):
        make_policy("razor:budget=6").on_prefill(view(20))


def test_pick_heads_takes_top_shares_of_each_score() -> None:
    ind = torch.tensor([[0.1, 0.9], [0.5, 0.2], [0.0, 0.3]])
    echo = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.8, 0.0]])
    assert pick_heads(ind, echo, 0.33, 0.1) == {(0, 1), (1, 0), (2, 0)}
    assert pick_heads(ind, echo, 0.0, 0.0) == frozenset()
    assert parse_heads(format_heads({(12, 2), (3, 0)})) == {(3, 0), (12, 2)}
    assert format_heads({(12, 2), (3, 0)}) == "3:0/12:2"


@pytest.mark.parametrize(
    "spec,match",
    [
        ("mikv:ratio=0.5,lag=0", "lag"),
        ("mikv:ratio=0.5,recent=1", "recent"),
        ("mikv:ratio=0.5,low=[int4", "unclosed"),
        ("mikv:ratio=0.5,low=int4+int8", "empty stage|one codec stage"),
        ("zipcache:ratio=0.5,low=Int4!", "bad method name"),
        ("zipcache", "exactly one of ratio"),
        ("zipcache:ratio=0.5,probe=0", "probe"),
        ("razor:budget=8,heads=3-0", "layer:kv_head"),
        ("razor:budget=8,induction=2", "induction"),
        ("razor:budget=4,sinks=4", "must exceed sinks"),
    ],
)
def test_bad_options_raise_one_line(spec: str, match: str) -> None:
    with pytest.raises(KvshrinkError, match=match) as err:
        make_policy(spec)
    assert isinstance(err.value, SpecError) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "spec",
    [
        "mikv:ratio=0.75,low=[fibquant:b=1,k=8]",
        "zipcache:budget=64,low=int4,lag=8",
        "razor:ratio=0.5,heads=1:0/0:2",
    ],
)
def test_specs_print_back(spec: str) -> None:
    p = make_policy(spec)
    assert make_policy(str(p.config)).config == p.config
