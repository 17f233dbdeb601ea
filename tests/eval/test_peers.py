"""transformers' QuantizedCache measured as a peer row, bytes walked down to storage."""

from __future__ import annotations

import pytest
import torch

from kvshrink.core import SpecError
from kvshrink.data import load_text
from kvshrink.eval.frontier import FrontierConfig, run_frontier
from kvshrink.eval.methods import build_method
from kvshrink.eval.peers import held_nbytes

pytest.importorskip("optimum.quanto")


def test_held_nbytes_counts_packed_storage() -> None:
    from transformers.cache_utils import QuantoQuantizedLayer

    layer = QuantoQuantizedLayer(nbits=4, axis_key=0, axis_value=0, q_group_size=64, residual_length=128)
    q = layer._quantize(torch.randn(1, 3, 512, 64), axis=0)
    # 4-bit codes packed two per byte + fp32 scale and shift per group of 64
    assert held_nbytes(q) == 3 * 512 * 64 // 2 + 3 * 512 * 2 * 4


def test_spec_errors() -> None:
    with pytest.raises(SpecError, match="qint2/qint4"):
        build_method("hf-quanto:b=3")


def test_quanto_row_on_the_real_model(smollm2) -> None:
    model, tok = smollm2
    ids = torch.tensor(tok(load_text()[:20000]).input_ids)
    cfg = FrontierConfig(context=160, windows=1, continuation=32, n_queries=16)
    rows = run_frontier(model, ids, ["hf-quanto:b=4", "int4"], cfg).to_json()["rows"]
    quanto = rows[0]
    assert quanto["method"] == "hf-quanto:b=4"
    assert quanto["compression_ratio"] == pytest.approx(16 / 5, rel=1e-6)  # 4 bits + 64 bits per 64
    assert quanto["attn_cosine"] > 0.9 and quanto["kl"] < 0.1
