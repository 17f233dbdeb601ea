"""``cache:dtype=float16``: the full-precision window of an fp32 (CPU) model held in fp16, as a
GPU model would hold it: half the window's bytes, the same tokens, logits within fp16 rounding."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

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


def test_sinks_stay_exact_and_the_rest_is_packed(smollm2, essay) -> None:
    """``cache:sinks=N``: the first N tokens are held as the window holds them, never packed;
    everything after them packs as before (the first block is N tokens shorter)."""
    model, tok = smollm2
    ids = tok(prompt(tok, essay, 70, offset=200), return_tensors="pt").input_ids
    full = _run(model, ids, DynamicCache(config=model.config), steps=8)
    forced = full.argmax(-1)[:-1].T  # [1, 8]: every cache reads the same next tokens
    errs = {}
    for sinks in (0, 3):
        cache = CompressedCache(model, f"fibquant:b=2,k=4+cache:window=0,block=16,sinks={sinks}")
        logits = _forced(model, ids, cache, forced)
        errs[sinks] = torch.nn.functional.kl_div(
            logits.log_softmax(-1), full.log_softmax(-1), log_target=True, reduction="batchmean"
        ).item()
        for layer in cache.layers:
            segs = layer.segments()
            dense = [s for s in segs if not s.packed]
            if sinks:
                first = segs[0]
                assert not first.packed and first.c0 == 0 and first.size == sinks
                assert first.k.dtype == torch.float32
                assert segs[1].packed and segs[1].c0 == sinks and segs[1].size == 16 - sinks
            else:
                assert segs[0].packed
            assert sum(s.size for s in dense) <= sinks + 15  # the sinks and at most a block's tail
        cache.uninstall()
    assert errs[3] < errs[0]  # exact sinks: the next-token distribution moves less


def _forced(model, ids, cache, tokens: torch.Tensor) -> torch.Tensor:
    """Prefill, then feed ``tokens`` ``[B, n]`` one at a time; the logits of every step stacked."""
    out = []
    with torch.no_grad():
        out.append(model(input_ids=ids, past_key_values=cache).logits[:, -1])
        for i in range(tokens.shape[1]):
            out.append(model(input_ids=tokens[:, i : i + 1], past_key_values=cache).logits[:, -1])
    return torch.stack(out)


def test_sinks_options_are_checked() -> None:
    with pytest.raises(SpecError, match="sinks must be >= 0"):
        parse_cache_spec("int4+cache:sinks=-1")
    with pytest.raises(SpecError, match="without a token policy"):
        parse_cache_spec("snapkv:ratio=0.5+int4+cache:sinks=1")


def test_sinks_refused_by_the_kernel_path(smollm2) -> None:
    """The Triton path reads one contiguous packed store: exact sinks beside it are refused."""
    from kvshrink.core.errors import InputError

    model, tok = smollm2
    ids = tok("The sink is the first token.", return_tensors="pt").input_ids
    cache = CompressedCache(model, "turboquant:b=2+cache:window=0,block=4,sinks=1,kernels=triton")
    try:
        with pytest.raises(InputError, match="cannot read cache:sinks"), torch.no_grad():
            model(input_ids=ids, past_key_values=cache)
    finally:
        cache.uninstall()
