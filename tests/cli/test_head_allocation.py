"""``layer_sensitivity.py --allocate --heads``: per-layer curves split by the heads' measured
shares, allocated per KV head, written back as a plan with ``heads=`` tiers."""

from __future__ import annotations

import pytest
import torch

from kvshrink.eval.frontier import FrontierConfig
from kvshrink.eval.layerwise import parse_layer_plan
from tests.policies.tiny import VOCAB, tiny_llama

TEMPLATE = "fibquant:b=2,k=4,kb={kb},vb={vb},sinks=1"


@pytest.fixture
def bench(bench_module):
    return bench_module("layer_sensitivity")


def _layer_data(n_layers: int) -> dict:
    rows = [
        {"codec": f"fibquant:b={b},k=4", "role": role, "layer": li, "kl": 0.01 * 2.0 ** (-2 * b)}
        for b in (1.5, 2.5)
        for role in ("key", "value")
        for li in range(n_layers)
    ]
    return {"n_layers": n_layers, "rows": rows}


def _heads(role: str, b: float, kls: dict[int, list[float]]) -> dict:
    rows = [{"layer": li, "head": h, "kl": kl} for li, hs in kls.items() for h, kl in enumerate(hs)]
    return {"codec": f"fibquant:b={b},k=4", "role": role, "rows": rows}


def test_head_curves_split_the_layer_curve_by_share(bench) -> None:
    sens = bench.sensitivity(_layer_data(2))
    flat = {0: [1.0, 1.0], 1: [1.0, 1.0]}
    heads = bench.head_sensitivity(
        sens,
        [
            _heads("key", 2.0, {0: [3.0, 1.0], 1: [1.0, 1.0]}),
            _heads("key", 3.0, {0: [1.0, 1.0], 1: [1.0, 1.0]}),
            _heads("value", 2.0, flat),
        ],
    )
    layer = bench.curve_kl(sens[("key", 0)], 1.5)
    # below the first measured rate the share is held flat: 3/4 and 1/4 of the layer
    assert bench.curve_kl(heads[("key", 0, 0)], 1.5) == pytest.approx(0.75 * layer)
    assert bench.curve_kl(heads[("key", 0, 1)], 1.5) == pytest.approx(0.25 * layer)
    # between the measured rates the share moves toward 1/2 (log-linear), at 2.5 halfway
    mid = bench.curve_kl(heads[("key", 0, 0)], 2.5) / bench.curve_kl(sens[("key", 0)], 2.5)
    assert mid == pytest.approx((0.75 * 0.5) ** 0.5)
    missing = {0: [1.0, 1.0]}  # layer 1 has no value rows
    with pytest.raises(Exception, match="no head rows for layer 1 values"):
        bench.head_sensitivity(sens, [_heads("key", 2.0, flat), _heads("value", 2.0, missing)])


def test_sensitive_heads_get_the_bits_and_the_plan_says_so(bench) -> None:
    sens = bench.sensitivity(_layer_data(3))
    even = {li: [1.0, 1.0] for li in range(3)}
    skewed = {0: [1.0, 1.0], 1: [50.0, 1.0], 2: [1.0, 1.0]}  # layer 1's key head 0 takes the KL
    heads = bench.head_sensitivity(sens, [_heads("key", 2.0, skewed), _heads("value", 2.0, even)])
    alloc = bench.allocate(heads, 2.0, (1.5, 2.0, 2.5, 3.0))
    assert alloc[("key", 1, 0)] > alloc[("key", 1, 1)]
    assert sum(alloc.values()) / len(alloc) <= 2.0 + 1e-9
    spec = bench.alloc_spec_heads(alloc, 3, TEMPLATE)
    got = parse_layer_plan(spec).assign_heads(3, 2)
    for (role, li, h), b in alloc.items():
        cfg = got[li][role][h]
        assert ((cfg.kb if role == "key" else cfg.vb) or cfg.b) == b


def test_head_rows_measure_one_head_each_and_exact_heads_cost_nothing(bench_module) -> None:
    heads = bench_module("head_sensitivity")
    model = tiny_llama(layers=2)
    ids = torch.randint(0, VOCAB, (200,), generator=torch.Generator().manual_seed(0))
    cfg = FrontierConfig(context=64, windows=2, continuation=16, n_queries=8)
    lossy = heads.measure(model, ids, "fibquant:b=1,k=4", "key", cfg)
    assert [(r["layer"], r["head"]) for r in lossy["rows"]] == [(li, h) for li in range(2) for h in range(2)]
    assert all(r["kl"] > 0 and len(r["kl_windows"]) == 2 for r in lossy["rows"])
    exact = heads.measure(model, ids, "fp16", "value", cfg)  # fp16 of fp32 values: a tiny error
    assert max(r["kl"] for r in exact["rows"]) < 1e-4 * min(r["kl"] for r in lossy["rows"]) + 1e-9
    assert "| 0 |" in heads.markdown(lossy)


def test_layer_rows_restore_the_cache_between_rows(bench) -> None:
    model = tiny_llama(layers=2)
    ids = torch.randint(0, VOCAB, (200,), generator=torch.Generator().manual_seed(0))
    cfg = FrontierConfig(context=64, windows=2, continuation=16, n_queries=8)
    data = bench.measure(model, ids, (0, 1), ["fibquant:b=1.5,k=4"], cfg)
    assert data["floor"]["kl"] < 1e-9  # nothing coded: the restored cache gives the exact logits
    assert len(data["rows"]) == 4 and all(r["kl"] > 0 for r in data["rows"])


def test_three_rates_give_each_head_its_own_curve(bench) -> None:
    sens = bench.sensitivity(_layer_data(1))
    files = [
        _heads(role, b, {0: [0.1 * 2.0 ** (-s * b), 0.1 * 2.0 ** (-2 * b)]})
        for role in ("key", "value")
        for b in (1.0, 2.0, 3.0)
        for s in [1.5 if role == "key" else 2.5]
    ]
    heads = bench.head_sensitivity(sens, files)
    # head 0 of the keys decays at 1.5 bits of log2 KL per bit, head 1 at 2: not the layer's slope
    for h, slope in ((0, 1.5), (1, 2.0)):
        rates, logs = heads[("key", 0, h)]
        assert rates == (1.0, 2.0, 3.0)
        assert logs[0] - logs[1] == pytest.approx(slope)
    rates, logs = heads[("value", 0, 0)]
    assert logs[0] - logs[1] == pytest.approx(2.5)
