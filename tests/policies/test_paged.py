"""Page policies (Quest, ArkVale) on synthetic digests: scores, bounds, forced pages, options."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvshrink.cache.config import parse_cache_spec
from kvshrink.core import KvshrinkError, SpecError
from kvshrink.policies import make_policy
from kvshrink.policies.paged import PageView, page_scores


def brute_scores(query: torch.Tensor, hi: torch.Tensor, lo: torch.Tensor, group: str) -> torch.Tensor:
    """Loop reference of ``page_scores``: per query head its KV head's box, then the group mean/max."""
    b, hk, g, nq, _ = query.shape
    p = hi.shape[2]
    out = torch.zeros(b, hk, nq, p, dtype=torch.float64)
    for i in range(b):
        for h in range(hk):
            for r in range(nq):
                for j in range(p):
                    per_head = [
                        sum(
                            max(q * x, q * y)
                            for q, x, y in zip(
                                query[i, h, a, r].tolist(), hi[i, h, j].tolist(), lo[i, h, j].tolist()
                            )
                        )
                        for a in range(g)
                    ]
                    out[i, h, r, j] = sum(per_head) / g if group == "mean" else max(per_head)
    return out


def digest_of(spec: str, keys: torch.Tensor, live: torch.Tensor):
    return make_policy(spec).digest(keys, live)  # type: ignore[attr-defined]


@pytest.mark.parametrize("group", ["mean", "max"])
def test_page_scores_match_brute_force_under_gqa(group: str) -> None:
    g = torch.Generator().manual_seed(0)
    query = torch.randn(2, 3, 2, 4, 8, generator=g)
    keys = torch.randn(2, 3, 5, 6, 8, generator=g)  # 5 pages of 6 keys
    lo, hi = keys.amin(3), keys.amax(3)
    got = page_scores(query, hi, lo, group)
    torch.testing.assert_close(got.double(), brute_scores(query, hi, lo, group), atol=1e-5, rtol=1e-5)


def test_quest_digest_is_the_live_min_max_and_arkvale_the_cuboid_mean() -> None:
    g = torch.Generator().manual_seed(1)
    keys = torch.randn(2, 3, 16, 8, generator=g)
    live = torch.ones(2, 3, 16, dtype=torch.bool)
    live[1, :, :5] = False  # left padding
    live[0, 2] = False  # a row-head without any token
    hi, lo = digest_of("quest:budget=64", keys, live)
    assert torch.equal(hi[1, 0], keys[1, 0, 5:].amax(0)) and torch.equal(lo[1, 0], keys[1, 0, 5:].amin(0))
    assert torch.equal(hi[0, 2], torch.zeros(8)) and torch.equal(lo[0, 2], torch.zeros(8))
    ahi, alo = digest_of("arkvale:budget=512", keys, live)
    k = keys[1, 1, 5:]
    c = (k.amax(0) + k.amin(0)) / 2
    r = (k - c).abs().mean(0)
    torch.testing.assert_close(ahi[1, 1], c + r)
    torch.testing.assert_close(alo[1, 1], c - r)
    assert bool((ahi <= hi + 1e-6).all()) and bool((alo >= lo - 1e-6).all())  # tighter than Quest's box
    bhi, blo = digest_of("arkvale:budget=512,digest=box", keys, live)
    assert torch.equal(bhi, hi) and torch.equal(blo, lo)  # digest=box is Quest's min/max


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(1, 20),
    d=st.integers(1, 16),
    scale=st.floats(1e-3, 1e3),
    dead=st.integers(0, 19),
)
def test_quest_score_is_a_true_upper_bound_of_every_live_logit(seed, n, d, scale, dead) -> None:
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(1, 1, n, d, generator=g, dtype=torch.float64).float() * scale
    keys[..., 0, :] *= 30.0  # an outlier key, like the attention sink
    live = torch.ones(1, 1, n, dtype=torch.bool)
    live[..., : min(dead, n - 1)] = False  # padding never raises the bound's duty
    q = torch.randn(1, 1, 3, 1, d, generator=g) * scale
    hi, lo = digest_of("quest:budget=64", keys, live)
    bound = page_scores(q, hi[:, :, None], lo[:, :, None])[0, 0, 0, 0]
    logits = (q[0, 0, :, 0] @ keys[0, 0].T)[:, live[0, 0]].mean(0)  # group-mean logit per live key
    slack = 1e-5 * (q.abs().sum() * keys.abs().max()).item()  # float32 summation order only
    assert float(logits.max()) <= float(bound) + slack


def view(p: int = 10, pad_pages: int = 0, q_rows: int = 1, seed: int = 0, resident=None) -> PageView:
    """2 rows x 2 KV heads x 2 query heads; row 1's first ``pad_pages`` pages hold only padding."""
    g = torch.Generator().manual_seed(seed)
    live = torch.ones(2, 2, p, dtype=torch.bool)
    live[1, :, :pad_pages] = False
    hi = torch.randn(2, 2, p, 4, generator=g).abs()
    return PageView(
        layer_idx=3,
        query=torch.randn(2, 2, 2, q_rows, 4, generator=g),
        hi=hi,
        lo=-hi,
        live=live,
        resident=live if resident is None else resident,
        seen_valid=torch.tensor([16 * p, 16 * (p - pad_pages)]),
        dense=0,
    )


@pytest.mark.parametrize("spec", ["quest:budget=96,sinks=1,window=2,page=16", "arkvale:budget=96,page=16"])
def test_selection_keeps_sink_and_window_pages_and_the_budget(spec: str) -> None:
    v = view(p=10, pad_pages=3, q_rows=3 if spec.startswith("quest") else 1)
    pick = make_policy(spec).select_pages(v)  # type: ignore[attr-defined]
    assert pick.shape == (2, 2, 3 if spec.startswith("quest") else 1, 10)
    assert bool(pick[0, :, :, [0, 8, 9]].all())  # sink page, two window pages
    assert bool(pick[1, :, :, [3, 8, 9]].all())  # the sink is the first live page, past the padding
    assert not bool(pick[1, :, :, :3].any())
    assert bool((pick.sum(-1) == 96 // 16 - 1).all())  # budget minus the partial page


def test_selection_takes_the_best_scored_pages_per_kv_head() -> None:
    v = view(p=10)
    hi = torch.zeros_like(v.hi)
    hi[:, 0, 4] = 5.0  # KV head 0 needs page 4, head 1 page 6
    hi[:, 1, 6] = 5.0
    q = torch.ones_like(v.query)
    v = PageView(3, q, hi, -hi, v.live, v.resident, v.seen_valid, 0)
    pick = make_policy("quest:budget=48,sinks=1,page=16").select_pages(v)[:, :, 0]  # type: ignore[attr-defined]
    assert pick[:, 0].nonzero()[:, 1].tolist() == [0, 4, 0, 4]
    assert pick[:, 1].nonzero()[:, 1].tolist() == [0, 6, 0, 6]


def test_quest_selects_per_query_and_arkvale_once_with_the_last_query() -> None:
    v = view(p=10, q_rows=2)
    hi = torch.zeros_like(v.hi)
    hi[..., 2, 0] = 1.0
    hi[..., 7, 1] = 1.0
    q = torch.zeros_like(v.query)
    q[..., 0, 0] = 1.0  # first query wants page 2, the last page 7
    q[..., 1, 1] = 1.0
    v = PageView(3, q, hi, -hi, v.live, v.resident, v.seen_valid, 0)
    quest = make_policy("quest:budget=48,page=16,sinks=1").select_pages(v)  # type: ignore[attr-defined]
    assert quest[0, 0, 0].nonzero().flatten().tolist() == [0, 2]
    assert quest[0, 0, 1].nonzero().flatten().tolist() == [0, 7]
    ark = make_policy("arkvale:budget=128,page=32,window=1").select_pages(v)  # type: ignore[attr-defined]
    assert ark.shape[2] == 1 and ark[0, 0, 0].nonzero().flatten().tolist() == [0, 7, 9]


def test_ratio_scales_the_pages_with_the_tokens_seen() -> None:
    v = view(p=10, pad_pages=4)
    pick = make_policy("quest:ratio=0.5,page=16,sinks=0").select_pages(v)  # type: ignore[attr-defined]
    assert pick[0].sum(-1).flatten().tolist() == [4, 4]  # 160 tokens -> 80 -> 5 pages - partial
    assert pick[1].sum(-1).flatten().tolist() == [2, 2]  # 96 real tokens -> 48 -> 3 pages - partial


@pytest.mark.parametrize(
    "spec,match",
    [
        ("quest", "exactly one of ratio"),
        ("quest:budget=64,page=0", "page must be >= 1"),
        ("arkvale:budget=512,sinks=-1", "sinks must be >= 0"),
        ("arkvale:budget=512,dense_layers=-2", "dense_layers must be >= 0"),
        ("arkvale:budget=128", "leaves no page to select"),
        ("quest:budget=32,page=16", "must be >= 48"),
        ("arkvale:ratio=1.0", "ratio"),
        ("arkvale:budget=512,group=sum", "group must be 'mean' or 'max'"),
        ("arkvale:budget=512,digest=minmax", "digest must be 'cuboid' or 'box'"),
        ("quest:budget=64,dbits=4", "dbits must be 8 or 16"),
        ("quest:budget=64,foo=1", "unknown option"),
        ("quets:budget=64", "did you mean quest"),
    ],
)
def test_bad_specs_raise_one_line(spec: str, match: str) -> None:
    with pytest.raises(KvshrinkError, match=match) as err:
        make_policy(spec)
    assert "\n" not in str(err.value)


def test_page_policies_set_the_cache_block_and_window() -> None:
    parsed = parse_cache_spec("arkvale:budget=512+fibquant:b=2")
    assert (parsed.cache.block, parsed.cache.window) == (32, 0)
    assert str(parsed) == "arkvale:budget=512+fibquant:b=2,k=4"
    parsed = parse_cache_spec("quest:ratio=0.8+int4+cache:window=64")
    assert (parsed.cache.block, parsed.cache.window) == (16, 64)
    assert parse_cache_spec(str(parsed)) == parsed
    with pytest.raises(SpecError, match="differs from page=32"):
        parse_cache_spec("arkvale:budget=512+int4+cache:block=64")
    with pytest.raises(SpecError, match="differs from page=16"):
        parse_cache_spec("quest:budget=512+int4", block=32)
