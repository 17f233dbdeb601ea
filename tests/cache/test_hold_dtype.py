"""``cache:dtype=float16``: the full-precision window of an fp32 (CPU) model held in fp16, as a
GPU model would hold it: half the window's bytes, the same tokens, logits within fp16 rounding."""

from __future__ import annotations

import pytest
import torch

from kvshrink.cache import CompressedCache
from kvshrink.cache.config import parse_cache_spec
from kvshrink.core.errors import SpecError

from .conftest import prompt
from .test_columns import _run

SPEC = "int4+cache:window=32,block=16"


def test_window_held_in_fp16_halves_its_bytes(smollm2, essay) -> None:
    model, tok = smollm2
    ids = tok(prompt(tok, essay, 90, offset=500), return_tensors="pt").input_ids
    reports, logits = {}, {}
    for dtype in ("model", "float16"):
        cache = CompressedCache(model, f"{SPEC},dtype={dtype}")
        logits[dtype] = _run(model, ids, cache, steps=12)
        windows = [s for layer in cache.layers for s in layer.segments() if not s.packed]
        assert windows and all(
            s.k.dtype == (torch.float32 if dtype == "model" else torch.float16) for s in windows
        )
        reports[dtype] = cache.memory_report()
        cache.uninstall()
    win32 = sum(r.window for r in reports["model"].layers)
    win16 = sum(r.window for r in reports["float16"].layers)
    assert win32 > 0 and win16 * 2 == win32
    packed = [sum(r.packed for r in rep.layers) for rep in reports.values()]
    assert packed[0] == packed[1]
    assert reports["float16"].ratio > reports["model"].ratio
    # fp16 rounding of the window moves logits far less than the int4 packing itself does
    diff = (logits["float16"] - logits["model"]).abs().max().item()
    assert diff < 0.05 * logits["model"].abs().max().item()
    assert torch.equal(logits["float16"].argmax(-1), logits["model"].argmax(-1))


def test_dtype_option_is_checked() -> None:
    assert parse_cache_spec("int4+cache:dtype=bfloat16").cache.dtype == "bfloat16"
    with pytest.raises(SpecError, match="dtype must be one of model, float16, bfloat16"):
        parse_cache_spec("int4+cache:dtype=fp8")
