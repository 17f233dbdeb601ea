"""Page policies inside CompressedLayer / CompressedCache: reads, recall, rows, bytes.

The reference for a paged layer is dense attention over what it holds (decoded), restricted to
the pages the policy picked for that forward (recorded from the real page table) plus the
window and the new tokens; the pick itself is checked against a brute-force top-k.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvshrink.cache import CompressedCache
from kvshrink.cache.attention import allowed_mask
from kvshrink.cache.pages import PageTable, _heads, _int8_outward
from kvshrink.codecs import Packed
from kvshrink.core import InputError

from ..policies.tiny import tiny_llama
from .test_attention import reference
from .test_families import run as greedy_logits
from .test_layer import held, make_layer


def record(layer) -> list:
    """Keep every pick the layer's page table answers (the real table does the work)."""
    picks: list = []
    table: PageTable = layer.pages
    original = table.select

    def select(blocks, query, seen_valid):
        pick = original(blocks, query, seen_valid)
        picks.append(None if pick is None else pick.clone())
        return pick

    table.select = select  # type: ignore[method-assign]
    return picks


def brute_pick(layer, query: torch.Tensor, rows: int) -> torch.Tensor:
    """Top pages from digests recomputed from the held keys, with explicit loops."""
    cfg = layer.pages.policy.config
    b, h, nq, _ = query.shape
    hk = layer.heads
    g = h // hk
    out = torch.zeros(b, hk, rows, len(layer.blocks), dtype=torch.bool)
    for i in range(b):
        for kh in range(hk):
            for r in range(rows):
                qr = nq - rows + r
                scores, live = [], []
                for p, seg in enumerate(layer.blocks):
                    keys = torch.stack([layer.codec.decode(x, torch.float32) for x in seg.keys])[i, kh]
                    pos = seg.full_pos(b, hk)[i, kh]
                    ks = keys[pos >= 0]
                    if not len(ks):
                        continue
                    hi, lo = layer.pages.policy.digest(
                        ks[None, None], torch.ones(1, 1, len(ks), dtype=torch.bool)
                    )
                    if cfg.dbits == 8:
                        hq, lq, sc = _int8_outward(hi, lo)
                        hi, lo = hq[0, 0].float() * sc[0, 0].float(), lq[0, 0].float() * sc[0, 0].float()
                    else:
                        hi, lo = hi[0, 0].half().float(), lo[0, 0].half().float()
                    qs = query[i, kh * g : (kh + 1) * g, qr].float()
                    per_head = torch.maximum(qs * hi, qs * lo).sum(-1)
                    scores.append(float(per_head.mean() if cfg.group == "mean" else per_head.max()))
                    live.append(p)
                tokens = (
                    cfg.budget
                    if cfg.budget is not None
                    else -int(-(1 - cfg.ratio) * int(layer.seen_valid[i]) // 1)
                )
                kept = (tokens - layer.pages.dense) // cfg.page - 1
                kept = max(kept, cfg.sinks + cfg.window + 1)
                forced = set(live[: cfg.sinks]) | set(live[len(live) - cfg.window :] if cfg.window else [])
                rest = sorted((p for p in live if p not in forced), key=lambda p: -scores[live.index(p)])
                for p in list(forced) + rest[: max(0, kept - len(forced))]:
                    out[i, kh, r, p] = True
    return out


def step(layer, q, k, v, mask2d, picks, scaling=0.125):
    """One forward through a paged layer and the reference restricted to the recorded pick."""
    n_before = len(picks)
    brute = None
    if layer.blocks:
        rows = 1 if layer.pages.policy.recall else q.shape[2]
        brute = brute_pick(layer, q, rows)
    layer.update(k, v)
    start = layer.seen - k.shape[2]
    hk, hv, hp = held(layer) if layer.blocks or layer.window is not None else (None, None, None)
    n_pages = len(layer.blocks)
    page_slots = sum(s.size for s in layer.blocks)
    out = layer.attend(q, scaling, mask2d, mask2d is not None and not bool(mask2d.all()))
    cols = (
        torch.arange(start, layer.seen, dtype=torch.int32).view(1, 1, -1).expand(k.shape[0], k.shape[1], -1)
    )
    if mask2d is not None:
        cols = cols.masked_fill(~mask2d[:, None, start : layer.seen], -1)
    if hk is None:
        hk, hv, hp = k.float()[:, :, :0], v.float()[:, :, :0], cols[..., :0]
    keys, vals, pos = torch.cat([hk, k.float()], 2), torch.cat([hv, v.float()], 2), torch.cat([hp, cols], -1)
    allowed = allowed_mask(pos, torch.arange(start, layer.seen), layer.sliding_window, mask2d)
    if n_pages:
        pick = picks[n_before]  # the read's pick [B, Hkv, Q|1, P]; ArkVale selects again after a flush
        sel = pick.repeat_interleave(page_slots // n_pages, -1)
        rest = torch.ones(*sel.shape[:3], pos.shape[-1] - page_slots, dtype=torch.bool)
        allowed = allowed & torch.cat([sel, rest], -1)
        assert brute is not None
        assert torch.equal(pick, brute), "selection differs from the brute-force top pages"
    ref = reference(q, keys, vals, allowed, scaling).transpose(1, 2)
    return out, ref


def drive(layer, chunks, pad_rows=0, seed=0, hk=2, grp=3, d=32):
    g = torch.Generator().manual_seed(seed)
    b, total = 2, sum(chunks)
    mask = torch.ones(b, total, dtype=torch.bool)
    mask[1, :pad_rows] = False
    picks = record(layer)
    worst, start = 0.0, 0
    for n in chunks:
        q = torch.randn(b, hk * grp, n, d, generator=g)
        k = torch.randn(b, hk, n, d, generator=g)
        v = torch.randn(b, hk, n, d, generator=g)
        out, ref = step(layer, q, k, v, mask[:, : start + n] if pad_rows else None, picks)
        worst = max(worst, float((out - ref).abs().max()))
        start += n
    del layer.pages.select  # back to the class method (a deepcopy would share the recording closure)
    return worst, picks


@pytest.mark.parametrize(
    "spec",
    [
        "quest:budget=64,page=8,sinks=1,window=1,dense_layers=0+int8",
        "arkvale:budget=56,page=8,dense_layers=0+int4",
        "arkvale:budget=56,page=8,dense_layers=0,group=max,window=0+fp16",
        "arkvale:budget=56,page=8,dense_layers=0,digest=box,dbits=8+int4",
    ],
    ids=["quest", "arkvale", "arkvale-max", "arkvale-int8-digests"],
)
def test_paged_layer_reads_exactly_the_selected_pages(spec: str) -> None:
    layer = make_layer(spec, chunk=20)
    # a dense prompt, a question chunk (selected), decode steps; left padding on row 1, GQA 3:1
    worst, picks = drive(layer, [70, 9] + [1] * 12, pad_rows=13)
    assert worst < 1e-4
    assert all(p is not None for p in picks) and len(picks) >= 13
    if spec.startswith("quest"):
        assert picks[0].shape[2] == 9  # the question chunk is selected per query
    assert any(not bool(p.all()) for p in picks), "the budget must have excluded pages"


def test_arkvale_holds_its_budget_and_recalls_the_needle_page() -> None:
    layer = make_layer("arkvale:budget=40,page=8,sinks=1,window=1,dense_layers=0+fp16", chunk=64)
    g = torch.Generator().manual_seed(3)
    b, hk, grp, d, n = 1, 2, 2, 16, 80
    u = torch.zeros(d)
    u[0] = 1.0
    k = torch.randn(b, hk, n, d, generator=g) * 0.1
    k[:, :, 32:40] += 4.0 * u  # page 4 is the needle, in both KV heads
    v = torch.randn(b, hk, n, d, generator=g)
    v[:, :, 32:40] = 7.0
    q = torch.randn(b, hk * grp, n, d, generator=g) * 0.1
    q[:, :, -1] = -3.0 * u  # the prompt's last query looks away from the needle
    layer.update(k, v)
    layer.attend(q, 1.0, None, False)
    table = layer.pages
    assert table.n == 10 and not bool(table.resident[..., 4].any())  # evicted after the prompt
    assert bool((table.resident.sum(-1) == 40 // 8 - 1).all())
    assert table.copies[4][0] is None

    k1, v1 = torch.randn(b, hk, 1, d, generator=g) * 0.1, torch.randn(b, hk, 1, d, generator=g)
    q1 = (3.0 * u).expand(b, hk * grp, 1, d).contiguous()  # now the query asks for it
    layer.update(k1, v1)
    out = layer.attend(q1, 1.0, None, False)
    assert bool(table.resident[..., 4].all()) and table.recalls >= hk
    assert bool((table.resident.sum(-1) == 4).all())
    assert table.copies[4][0] is not None and table.copies[4][0][1].shape[0] == hk
    assert float(out.mean()) > 5.0  # the answer comes from the needle's values


def test_reorder_and_deepcopy_keep_pages_and_backups_consistent() -> None:
    spec = "arkvale:budget=40,page=8,sinks=1,window=1,dense_layers=0+int8"
    layer = make_layer(spec, chunk=32)
    drive(layer, [60] + [1] * 5, pad_rows=7)
    table = layer.pages
    forks = [copy.deepcopy(layer), copy.deepcopy(layer)]
    before = {n: getattr(table, n).clone() for n in ("hi", "lo", "counts", "resident")}
    layer.reorder_cache(torch.tensor([1, 1]))  # beam search keeps row 1 twice
    for n, t in before.items():
        assert torch.equal(getattr(table, n)[0], t[1]) and torch.equal(getattr(table, n)[1], t[1])
    for page, seg in zip(table.copies, layer.blocks):
        assert page[0] is page[1] and seg.keys[0] is seg.keys[1]  # shared, counted once
    assert torch.equal(forks[0].pages.resident, before["resident"])  # the copies did not move
    g = torch.Generator().manual_seed(9)
    q = torch.randn(2, 6, 1, 32, generator=g) * 4
    k, v = torch.randn(2, 2, 1, 32, generator=g), torch.randn(2, 2, 1, 32, generator=g)
    outs = []
    for lay, order in ((layer, [0, 1]), (forks[0], [0, 1]), (forks[1], [1, 0])):
        lay.update(k[order], v[order])
        outs.append(lay.attend(q[order], 0.125, None, False))
    torch.testing.assert_close(outs[0][1], outs[1][1])  # each beam continues its own row 1
    torch.testing.assert_close(outs[0][0], outs[2][1])
    assert torch.equal(layer.pages.resident[0], forks[1].pages.resident[1])


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 40),
    st.floats(1e-3, 1e3),
    st.integers(0, 2**31 - 1),
)
def test_int8_digests_contain_the_float_box(d: int, spread: float, seed: int) -> None:
    """Outward int8 rounding: the stored box always contains the exact one, and stays tight."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(3, 2, 7, d, generator=g) * spread
    hi, lo = keys.amax(2), keys.amin(2)
    hq, lq, sc = _int8_outward(hi, lo)
    assert hq.dtype == lq.dtype == torch.int8 and sc.dtype == torch.float32 and sc.shape == (3, 2)
    sf = sc[..., None]
    assert bool((hq.float() * sf >= hi).all()) and bool((lq.float() * sf <= lo).all())
    top = torch.maximum(hi.abs(), lo.abs()).amax(-1, keepdim=True)
    assert float(((hq.float() * sf - hi) / top).max()) <= 2 / 126 + 1e-3  # at most ~2 steps wide


def test_int8_digests_halve_the_digest_bytes() -> None:
    sizes = {}
    for bits in (16, 8):
        layer = make_layer(f"arkvale:budget=40,page=8,dense_layers=0,dbits={bits}+int8", chunk=32)
        drive(layer, [64] + [1] * 3)
        sizes[bits] = layer.pages.nbytes(set())[1]
        if bits == 8:
            assert layer.pages.hi.dtype == torch.int8 and layer.pages.dscale is not None
    b, p, hk, d = 2, 8, 2, 32  # rows, pages, KV heads, head dim of drive()
    assert sizes[16] - sizes[8] == b * (2 * hk * p * d - 4 * hk * p)  # int8 corners + a float32 scale


def test_heads_of_a_packed_layout_that_mixes_heads_are_refused() -> None:
    p = Packed("odd", "key", (2, 8, 4), torch.float32, {"data": torch.zeros(16, 4)})
    with pytest.raises(InputError, match="does not lead with the 2 KV heads"):
        _heads(p, torch.tensor([0]), torch.device("cpu"))


@pytest.fixture(scope="module")
def tiny():
    model = tiny_llama(layers=3)
    ids = torch.randint(1, 97, (2, 150))
    mask = torch.ones(2, 150, dtype=torch.long)
    mask[1, :13] = 0
    return model, ids, mask


@pytest.mark.parametrize(
    "policy", ["quest:budget=4096,dense_layers=1", "arkvale:budget=4096,page=16,dense_layers=1"]
)
def test_budget_above_the_context_equals_no_policy(tiny, policy: str) -> None:
    model, ids, mask = tiny
    cache = CompressedCache(model, f"{policy}+int8")
    block = cache.parsed.cache.block
    plain = greedy_logits(model, CompressedCache(model, "int8", window=0, block=block), ids, mask, 16)
    torch.testing.assert_close(greedy_logits(model, cache, ids, mask, 16), plain, atol=1e-5, rtol=1e-5)
    assert cache.layers[0].pages is None and cache.layers[2].pages is not None  # first layer dense
    assert cache.layers[2].pages.n == 166 // block


@pytest.mark.parametrize("spec", ["quest:budget=48+int4", "arkvale:budget=96,page=16+int4"])
def test_resident_and_total_bytes(tiny, spec: str) -> None:
    model, ids, mask = tiny
    cache = CompressedCache(model, spec.replace("+", ",dense_layers=1+", 1))
    greedy_logits(model, cache, ids, mask, 6)
    report = cache.memory_report()
    assert (
        cache.nbytes()
        == report.nbytes
        == report.total
        == report.resident + sum(x.backup for x in report.layers)
    )
    paged = report.layers[2]
    blocks = cache.layers[2].blocks
    packed = sum(p.nbytes() for s in blocks for p in s.keys + s.values)
    digests = cache.layers[2].pages.nbytes(set())[1]
    assert digests > 0
    if spec.startswith("arkvale"):
        assert paged.backup == packed  # the blocks are the host store
        assert paged.resident_live <= 96 < paged.live
        assert 0 < paged.packed < packed  # only resident heads' copies
        assert report.resident < report.total
    else:
        assert paged.backup == 0 and paged.packed == packed and report.resident == report.total
    assert paged.bookkeeping >= digests
    assert report.to_dict()["resident"] == report.resident
