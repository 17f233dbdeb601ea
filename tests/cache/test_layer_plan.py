"""Per-layer codec plans in CompressedCache: each layer packs with its own tier, bytes follow it.

A plan that restates one codec for every layer must behave exactly like that codec (same bits,
same tokens); a plan's tiers must reach the layers they name and no others; shared codec state
that tiers share (one rotation seed) is counted once.
"""

from __future__ import annotations

import copy

import pytest
import torch

from kvshrink.cache import CompressedCache
from kvshrink.cache.config import parse_cache_spec
from kvshrink.codecs.plan import merge_roles
from kvshrink.core.errors import SpecError

from ..kernels.test_cache_store import _run as run_generate
from ..policies.tiny import VOCAB, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")


def _generate(model, spec: str, ids: torch.Tensor, new: int = 6):
    out, cache = run_generate(model, f"{spec}+cache:window=8,block=16", ids, torch.ones_like(ids), steps=new)
    return cache, out.sequences, torch.stack(out.scores)


@pytest.fixture(scope="module")
def model():
    return tiny_llama(layers=4)


@pytest.fixture(scope="module")
def ids():
    g = torch.Generator().manual_seed(3)
    return torch.randint(1, VOCAB, (2, 70), generator=g)


def test_spec_round_trip_and_layer_codecs() -> None:
    spec = "layers:at=[1],key=[fibquant:b=3,k=4]+layers:at=[2,3],value=[fibquant:b=1,k=4]+fibquant:b=2,k=4"
    parsed = parse_cache_spec(spec + "+cache:window=8")
    assert str(parsed) == spec + "+cache:window=8"
    assert parse_cache_spec(str(parsed)) == parsed
    names = [c.spec for c in parsed.build_layer_codecs(4)]
    assert names == [
        "fibquant:b=2,k=4",
        "fibquant:b=3,k=4,vb=2",
        "fibquant:b=2,k=4,vb=1",
        "fibquant:b=2,k=4,vb=1",
    ]
    built = parsed.build_layer_codecs(4)
    assert built[2] is built[3]  # one object per distinct codec
    # tiers that restate the base are no plan at all
    assert parse_cache_spec("layers:at=[0],codec=[int4]+int4").plan is None


@pytest.mark.parametrize(
    "spec, match",
    [
        ("layers:at=[0],key=[int4]+fibquant:b=2,k=4", "may differ only in rate"),
        ("layers:at=[0],key=[fibquant:b=2,k=2]+fibquant:b=2,k=4", "may differ only in rate"),
        ("layers:at=[0],codec=[fibquant:b=2,k=4,prerope=1]+int4", "prerope"),
        ("layers:at=[0],codec=[kivi:b=2,residual=32]+int4", "residual"),
        ("layers:at=[0-1],codec=[int4]+layers:at=[1],key=[fp16]+int8", "given twice"),
        ("layers:at=[0]+int4", "names no codec"),
    ],
)
def test_bad_plans_fail_in_one_line(spec: str, match: str) -> None:
    with pytest.raises(SpecError, match=match) as err:
        parse_cache_spec(spec).build_layer_codecs(4)
    assert "\n" not in str(err.value)


def test_layer_past_the_model_is_refused(model) -> None:
    with pytest.raises(SpecError, match="out of range"):
        CompressedCache(model, "layers:at=[4],codec=[fp16]+int4")
    CompressedCache(model, "fp16").uninstall()


def test_merge_roles_keeps_each_roles_codebook() -> None:
    from kvshrink.codecs import CODECS
    from kvshrink.core.spec import parse_stage

    def cfg(text):
        return CODECS.config(parse_stage(text))

    merged = merge_roles(cfg("fibquant:b=3,k=4"), cfg("fibquant:b=1.25,k=4"), 0)
    assert (merged.levels_of("key"), merged.levels_of("value")) == (4096, 32)
    merged = merge_roles(cfg("turboquant:b=4"), cfg("turboquant:b=2,kb=3"), 0)
    assert (merged.bits("key"), merged.bits("value")) == (4, 2)


def test_uniform_plan_equals_the_codec(model, ids) -> None:
    """A plan giving every layer codec X (over another base) is bit-for-bit the cache of X."""
    _, seq_a, scores_a = _generate(model, "fibquant:b=3,k=4", ids)
    cache, seq_b, scores_b = _generate(model, "layers:at=[0-3],codec=[fibquant:b=3,k=4]+int4", ids)
    assert torch.equal(seq_a, seq_b)
    assert torch.equal(scores_a, scores_b)
    assert {c.spec for c in cache.codecs} == {"fibquant:b=3,k=4"}
    cache.uninstall()


def test_tiers_reach_only_their_layers(model, ids) -> None:
    plan = "layers:at=[0],codec=[fp16]+layers:at=[2],value=[fibquant:b=1,k=4]+fibquant:b=2,k=4"
    cache, _, _ = _generate(model, plan, ids)
    base, _, _ = _generate(model, "fibquant:b=2,k=4", ids)
    codecs = [layer.codec.spec for layer in cache.layers]
    assert codecs == ["fp16", "fibquant:b=2,k=4", "fibquant:b=2,k=4,vb=1", "fibquant:b=2,k=4"]
    ours, ref = cache.memory_report().layers, base.memory_report().layers
    assert ours[0].packed > 3 * ref[0].packed  # fp16 packs 16 bits, FibQuant b=2 about 2.25
    assert ours[1].packed == ref[1].packed and ours[3].packed == ref[3].packed
    assert ours[2].packed < ref[2].packed  # values at 1 bit
    # decoded layer-2 keys are the base codec's bits; values differ
    blk, blk_ref = cache.layers[2].blocks[0], base.layers[2].blocks[0]
    assert torch.equal(blk.keys[0].tensors["codes"], blk_ref.keys[0].tensors["codes"])
    assert blk.values[0].tensors["codes"].shape[-1] < blk_ref.values[0].tensors["codes"].shape[-1]
    # one seeded rotation shared by the three FibQuant tiers: counted once, codebooks per rate
    rep = cache.memory_report()
    assert rep.shared < base.memory_report().shared * 2
    copied = copy.deepcopy(cache)
    assert copied.layers[2].codec is cache.layers[2].codec  # codecs are shared state
    assert copied.nbytes() == cache.nbytes()
    cache.uninstall()
