"""The frontier harness on the real model, small windows (the full run is `kvshrink frontier`)."""

from __future__ import annotations

import pytest
import torch

from kvshrink.core import DataError, SpecError
from kvshrink.data import load_text
from kvshrink.eval.frontier import FrontierConfig, run_frontier, window_starts


@pytest.fixture(scope="module")
def result(smollm2):
    model, tok = smollm2
    ids = torch.tensor(tok(load_text()[:20000]).input_ids)
    cfg = FrontierConfig(context=192, windows=2, continuation=48, n_queries=32)
    return run_frontier(
        model, ids, ["fp16", "int8", "int4", "kivi:b=2,residual=32"], cfg, "smollm2-135m"
    ).to_json()


def test_rows_follow_the_interface(result) -> None:
    assert set(result) >= {"model", "context", "windows", "baseline_ppl", "rows"}
    keys = {
        "method",
        "bits_per_element",
        "compression_ratio",
        "attn_cosine",
        "key_ip_rel_err",
        "ppl",
        "ppl_delta",
        "kl",
    }
    for row in result["rows"]:
        assert keys <= set(row)
    assert [r["method"] for r in result["rows"]] == ["fp16", "int8", "int4", "kivi:b=2,residual=32"]


def test_fp16_is_lossless_and_int8_near_lossless(result) -> None:
    fp16, int8 = result["rows"][0], result["rows"][1]
    assert fp16["compression_ratio"] == pytest.approx(1.0)
    assert fp16["attn_cosine"] > 0.99999 and abs(fp16["ppl_delta"]) < 0.01 and fp16["kl"] < 1e-5
    assert int8["compression_ratio"] == pytest.approx(16 / 8.5)
    assert int8["attn_cosine"] >= 0.999 and abs(int8["ppl_delta"]) <= 0.05


def test_fidelity_orders_with_rate(result) -> None:
    rows = {r["method"]: r for r in result["rows"]}
    assert rows["int8"]["kl"] < rows["int4"]["kl"]
    assert rows["int8"]["attn_cosine"] > rows["int4"]["attn_cosine"] > 0.8
    assert rows["kivi:b=2,residual=32"]["compression_ratio"] > 3.5


def test_bad_config_and_short_text() -> None:
    with pytest.raises(SpecError, match="context"):
        FrontierConfig(context=4)
    with pytest.raises(DataError, match="needs at least"):
        window_starts(100, FrontierConfig(context=2048))
    assert window_starts(10_000, FrontierConfig(context=1000, windows=3)) == [0, 4372, 8743]
