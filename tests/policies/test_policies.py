"""Policies on synthetic layer views: what each keeps, per KV head, with padding and ratios."""

from __future__ import annotations

import pytest
import torch

from kvshrink.core import KvshrinkError, SpecError
from kvshrink.policies import POLICIES, LayerView, make_policy
from kvshrink.policies.base import live_rank, select


def view(n: int = 20, scores: torch.Tensor | None = None, pad: int = 0, heads: int = 2) -> LayerView:
    """Batch of 2 rows x ``heads``; row 1 has ``pad`` leading empty slots (left padding)."""
    pos = torch.arange(n).view(1, 1, n).repeat(2, heads, 1)
    pos[1, :, :pad] = -1
    seen_valid = torch.tensor([n, n - pad])
    return LayerView(0, pos, scores, seen_valid, n_new=n)


def kept_positions(keep: torch.Tensor, pos: torch.Tensor, b: int, h: int) -> list[int]:
    return pos[b, h][keep[b, h]].tolist()


def test_streamingllm_keeps_sinks_and_recent_skipping_padding() -> None:
    v = view(20, pad=5)
    d = make_policy("streamingllm:sinks=2,budget=6").on_prefill(v)
    assert d is not None
    assert kept_positions(d.keep, v.positions, 0, 0) == [0, 1, 16, 17, 18, 19]
    assert kept_positions(d.keep, v.positions, 1, 1) == [5, 6, 16, 17, 18, 19]  # sinks = first real tokens


def test_streamingllm_under_budget_keeps_all() -> None:
    assert make_policy("streamingllm:sinks=4,budget=64").on_decode(view(20)) is None


def test_snapkv_keeps_window_and_top_pooled_scores_per_head() -> None:
    s = torch.zeros(2, 2, 30)
    s[:, 0, 3] = 5.0  # head 0 votes for slot 3, head 1 for slot 12
    s[:, 1, 12] = 5.0
    v = view(30, scores=s)
    d = make_policy("snapkv:budget=7,window=4,kernel=3").on_prefill(v)
    assert d is not None
    assert kept_positions(d.keep, v.positions, 0, 0)[:3] == [2, 3, 4]  # max-pooled neighbours
    assert kept_positions(d.keep, v.positions, 0, 1)[:3] == [11, 12, 13]
    assert kept_positions(d.keep, v.positions, 0, 0)[-4:] == [26, 27, 28, 29]  # observation window
    assert int(d.keep.sum(-1).max()) == 7


def test_snapkv_only_acts_on_prompts() -> None:
    p = make_policy("snapkv:ratio=0.5")
    assert p.observed_queries(1) == 0 and p.on_decode(view(20)) is None
    assert p.observed_queries(100) == 32


def test_snapkv_budget_not_below_prompt_raises() -> None:
    with pytest.raises(SpecError, match="nothing would be evicted"):
        make_policy("snapkv:budget=64,window=4").on_prefill(view(20, scores=torch.zeros(2, 2, 20)))


def test_h2o_keeps_recent_share_and_heavy_hitters() -> None:
    s = torch.zeros(2, 2, 20)
    s[:, :, 1] = 3.0
    s[:, :, 7] = 2.0
    v = view(20, scores=s)
    d = make_policy("h2o:budget=6,recent=0.5").on_decode(v)
    assert d is not None
    assert kept_positions(d.keep, v.positions, 0, 0) == [0, 1, 7, 17, 18, 19]  # 3 recent, 2 heavy, oldest tie


def test_ratio_counts_real_tokens_so_padding_does_not_change_the_choice() -> None:
    p = make_policy("streamingllm:ratio=0.5,sinks=1")
    alone = view(10)
    padded = view(16, pad=6)
    d1, d2 = p.on_prefill(alone), p.on_prefill(padded)
    assert d1 is not None and d2 is not None
    assert int(d1.keep[0, 0].sum()) == 5 and int(d2.keep[1, 0].sum()) == 5


def test_live_rank_and_select_are_deterministic() -> None:
    live = torch.tensor([[[False, True, True, False, True]]])
    old, new = live_rank(live)
    assert old[0, 0, [1, 2, 4]].tolist() == [0, 1, 2] and new[0, 0, [1, 2, 4]].tolist() == [2, 1, 0]
    keep = select(torch.zeros(1, 1, 5), live, torch.tensor([2]), torch.zeros(1, 1, 5, dtype=torch.bool))
    assert keep[0, 0].tolist() == [False, True, True, False, False]  # ties go to the older slot


@pytest.mark.parametrize(
    "spec,match",
    [
        ("snapkv", "exactly one of ratio"),
        ("snapkv:ratio=0.5,budget=10", "exactly one of ratio"),
        ("snapkv:ratio=1.5", "ratio"),
        ("snapkv:budget=16,window=32", "must exceed the observation window"),
        ("snapkv:ratio=0.5,kernel=4", "odd"),
        ("streamingllm:budget=4,sinks=4", "must exceed sinks"),
        ("h2o:budget=10,recent=1.5", "recent"),
        ("h2o:budget=10,foo=1", "unknown option"),
        ("snapkvv:ratio=0.5", "did you mean snapkv"),
    ],
)
def test_bad_specs_raise_one_line(spec: str, match: str) -> None:
    with pytest.raises(KvshrinkError, match=match) as err:
        make_policy(spec)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name", POLICIES.names())
def test_spec_roundtrip(name: str) -> None:
    p = make_policy(f"{name}:budget=512")
    assert make_policy(str(p.config)).config == p.config
