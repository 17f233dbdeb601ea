"""Per-layer codecs in the frontier: spec grammar, who codes what, and honest bytes (tiny model)."""

from __future__ import annotations

import pytest
import torch

from kvshrink.codecs import make_codec
from kvshrink.core import SpecError
from kvshrink.core.bytes import fp16_nbytes
from kvshrink.eval.capture import capture
from kvshrink.eval.frontier import FrontierConfig, run_frontier
from kvshrink.eval.layerwise import (
    LayerwiseMethod,
    format_layers,
    head_slice,
    parse_layer_plan,
    parse_layers,
    shared_parts,
)
from kvshrink.eval.methods import CodecMethod, build_method, code_keys, code_values, family
from tests.policies.tiny import VOCAB, tiny_llama

LAYERS = 4


@pytest.fixture(scope="module")
def model():
    return tiny_llama(layers=LAYERS)


@pytest.fixture(scope="module")
def cap(model):
    ids = torch.randint(0, VOCAB, (1, 40), generator=torch.Generator().manual_seed(1))
    return capture(model, ids, torch.tensor([20, 39]))


def test_layer_lists_parse_and_print_back() -> None:
    assert parse_layers("3, 0-2,29,1") == (0, 1, 2, 3, 29)
    assert format_layers([29, 0, 1, 2, 3, 5, 7, 8]) == "0-3,5,7,8,29"
    for bad in ("x", "3-1", "-1", "1-"):
        with pytest.raises(SpecError, match="layers: bad layer"):
            parse_layers(bad)


def test_canonical_form_is_order_free_and_grouped() -> None:
    a = "fibquant:b=2,k=4,kb=2.5,vb=1.5+layers:at=[29,0,1],codec=[fibquant:k=2,b=4]"
    b = "layers:at=[0],codec=[fibquant:b=4,k=2]+layers:at=[1,29],key=[fibquant:b=4,k=2],value=[fibquant:b=4,k=2]+fibquant:b=2,k=4,kb=2.5,vb=1.5"
    want = "layers:at=[0,1,29],codec=[fibquant:b=4,k=2]+fibquant:b=2,k=4,kb=2.5,vb=1.5"
    assert str(parse_layer_plan(a)) == str(parse_layer_plan(b)) == want
    assert str(parse_layer_plan(want)) == want  # a fixed point
    # one tier per distinct (key, value) pair, ordered by first layer; a tier equal to the base vanishes
    c = "int4+layers:at=[5-7],key=[int8]+layers:at=[0,6],value=[fp16]+layers:at=[2],codec=[int4]"
    assert str(parse_layer_plan(c)) == (
        "layers:at=[0],value=[fp16]+layers:at=[5,7],key=[int8]+layers:at=[6],key=[int8],value=[fp16]+int4"
    )


def test_tier_codecs_take_the_base_seed_unless_given() -> None:
    plan = parse_layer_plan(
        "layers:at=[0],codec=[fibquant:b=3,k=4]+layers:at=[1],codec=[fibquant:b=3,k=4,seed=0]+fibquant:b=2,k=4,seed=5"
    )
    roles = plan.assign(2)
    assert roles[0]["key"].seed == 5 and roles[1]["key"].seed == 0 and plan.base.seed == 5
    assert str(plan) == (
        "layers:at=[0],codec=[fibquant:b=3,k=4]+layers:at=[1],codec=[fibquant:b=3,k=4,seed=0]+fibquant:b=2,k=4,seed=5"
    )
    # what the frontier benchmark does for seeds: append ",seed=N" to the spec
    swept = parse_layer_plan("layers:at=[0],codec=[fibquant:b=3,k=4]+fibquant:b=2,k=4" + ",seed=2")
    assert swept.assign(1)[0]["value"].seed == swept.base.seed == 2


def test_bad_specs_are_one_line_errors(model, cap) -> None:
    cases = {
        "fibquant:b=2+layers:at=[1],codec=[nope:b=2]": "unknown codec 'nope'",
        "fibquant:b=2+layers:at=[1],codec=int4+layers:at=[0-3],key=int8": "layer 1 keys are given twice",
        "layers:at=[1],codec=int4": "no base codec",
        "int4+int8+layers:at=[0],codec=fp16": "more than one base codec",
        "int4+layers:codec=fp16": "at= is required",
        "int4+layers:at=[0]": "names no codec",
        "int4+layers:at=[0],codec=fp16,key=int8": "codec= sets both roles",
        "int4+layers:at=[0],codec=[fibquant:b=2,k=5]": "k must be one of",
    }
    for spec, msg in cases.items():
        with pytest.raises(SpecError, match=msg) as err:
            build_method(spec)
        assert "\n" not in str(err.value)
    method = build_method(f"int4+layers:at=[{LAYERS}],codec=fp16")  # valid until it meets the model
    with pytest.raises(SpecError, match=f"layer {LAYERS} is out of range for a model with {LAYERS} layers"):
        method.compress_layers(cap.layers)


def test_each_layer_and_role_goes_through_its_own_codec(cap) -> None:
    spec = "int4+layers:at=[0],key=[fibquant:b=2,k=4,prerope=1]+layers:at=[2-3],value=[int8]"
    res = build_method(spec).compress_layers(cap.layers)
    prerope = CodecMethod("fq", make_codec("fibquant:b=2,k=4,prerope=1")).compress(cap.layers[0])
    int4, int8 = make_codec("int4"), make_codec("int8")
    for i, (layer, r) in enumerate(zip(cap.layers, res)):
        k_codec = None if i == 0 else int4
        v_codec = int8 if i >= 2 else int4
        if k_codec is None:
            torch.testing.assert_close(r.k_hat, prerope.k_hat, rtol=0, atol=0)
            k_bytes = make_codec("fibquant:b=2,k=4").encode(layer.k_pre, "key").nbytes()
        else:
            torch.testing.assert_close(r.k_hat, int4.roundtrip(layer.k, "key")[0], rtol=0, atol=0)
            k_bytes = int4.encode(layer.k, "key").nbytes()
        torch.testing.assert_close(r.v_hat, v_codec.roundtrip(layer.v, "value")[0], rtol=0, atol=0)
        assert r.nbytes == k_bytes + v_codec.encode(layer.v, "value").nbytes()


def test_frontier_counts_packed_and_shared_bytes_honestly(model) -> None:
    """Per window: each layer's packed bytes from its codec + each distinct codec's shared state once."""
    cfg = FrontierConfig(context=48, windows=2, continuation=8, n_queries=8)
    ids = torch.randint(0, VOCAB, (200,), generator=torch.Generator().manual_seed(2))
    hi, lo = "fibquant:b=3,k=2", "fibquant:b=1,k=4"
    spec = f"layers:at=[0],codec=[{hi}]+layers:at=[3],value=[{lo}]+fibquant:b=2,k=4"
    plain = "fibquant:b=2,k=4"
    rows = {r["method"]: r for r in run_frontier(model, ids, [plain, spec], cfg).to_json()["rows"]}
    d, heads, t = 32, 2, cfg.context
    tokens = heads * t  # vectors per role per layer per window

    def packed(b: float) -> int:  # d/k blocks of k*b bits (whole bytes here), plus the fp16 norm
        return tokens * (d * b / 8 + 2)

    per_window = (packed(3) * 2) + packed(2) * 2 * 2 + (packed(2) + packed(1))
    rotation = make_codec(hi).rotation(d).nbytes  # one seed: the three codecs hold one rotation
    shared = sum(make_codec(s).shared_nbytes(d) for s in (hi, lo, "fibquant:b=2,k=4")) - 2 * rotation
    fp16 = fp16_nbytes(2 * LAYERS * tokens * d)
    assert rows[spec]["compression_ratio"] == pytest.approx(fp16 / (per_window + shared))
    assert LayerwiseMethod(spec).shared_nbytes(d) == shared
    assert rows[plain]["compression_ratio"] == pytest.approx(
        fp16 / (packed(2) * 2 * LAYERS + make_codec(plain).shared_nbytes(d))
    )
    # more bits where it matters here (and fewer elsewhere) changes the error, not the harness
    assert rows[spec]["key_rel_mse"] != rows[plain]["key_rel_mse"]


def test_a_plan_equal_to_its_base_measures_like_the_base(model) -> None:
    cfg = FrontierConfig(context=48, windows=1, continuation=8, n_queries=8)
    ids = torch.randint(0, VOCAB, (100,), generator=torch.Generator().manual_seed(3))
    spec = "layers:at=[0-3],codec=[int4]+int4"
    a, b = run_frontier(model, ids, ["int4", spec], cfg).to_json()["rows"]
    assert b["method"] == spec  # rows keep the spec as written (seed sweeps match on it)
    for key in ("compression_ratio", "attn_cosine", "ppl", "kl", "key_rel_mse"):
        assert a[key] == b[key]
    assert family(spec) == "int4 per-layer" and family("fibquant:b=2,k=4,sinks=1") == "fibquant k=4 (sinks=1)"


def test_shared_state_is_split_into_parts_held_once() -> None:
    d = 32
    for spec in (
        "fibquant:b=2,k=4,kb=1.5,vb=1",
        "fibquant:b=2,k=4",
        "turboquant:b=2,qjl=1",
        "int4",
        "kivi:b=2",
    ):
        codec = make_codec(spec)
        assert sum(shared_parts(codec, d).values()) == codec.shared_nbytes(d), spec
    base, other = make_codec("fibquant:b=2,k=4"), make_codec("fibquant:b=2,k=4,kb=1.5,vb=1")
    rot = base.rotation(d).nbytes
    book = {b: make_codec(f"fibquant:b={b},k=4").codebook(d).numel() * 4 for b in (1, 1.5, 2)}
    # kb=1.5,vb=1 beside b=2: same rotation, three distinct codebooks
    same_seed = LayerwiseMethod("layers:at=[0],codec=[fibquant:b=2,k=4,kb=1.5,vb=1]+fibquant:b=2,k=4")
    assert same_seed.shared_nbytes(d) == rot + sum(book.values())
    assert same_seed.shared_nbytes(d) < base.shared_nbytes(d) + other.shared_nbytes(d)
    # another seed is another rotation and other codebooks: nothing shared
    seeded = LayerwiseMethod("layers:at=[0],codec=[fibquant:b=2,k=4,seed=1]+fibquant:b=2,k=4")
    assert seeded.shared_nbytes(d) == 2 * base.shared_nbytes(d)


def test_head_tiers_parse_canonically_and_override_their_layer() -> None:
    spec = (
        "layers:at=[3,5],heads=[0],key=[fibquant:b=3,k=4]+layers:at=[3],codec=[fibquant:b=2.5,k=4]"
        "+layers:at=[7],heads=[1],codec=[fibquant:b=2,k=4]+fibquant:b=2,k=4"
    )
    plan = parse_layer_plan(spec)
    # the head tier equal to what its layer already has vanishes; head tiers print after layer tiers
    assert str(plan) == (
        "layers:at=[3],codec=[fibquant:b=2.5,k=4]+layers:at=[3,5],heads=[0],key=[fibquant:b=3,k=4]+fibquant:b=2,k=4"
    )
    assert parse_layer_plan(str(plan)) == plan
    heads = plan.assign_heads(8, 2)
    assert [c.b for c in heads[3]["key"]] == [3.0, 2.5]
    assert [c.b for c in heads[3]["value"]] == [2.5, 2.5]
    assert [c.b for c in heads[5]["key"]] == [3.0, 2.0]
    for bad, msg in {
        "int4+layers:at=[0],heads=[1],key=int8+layers:at=[0],heads=[0-1],codec=fp16": "layer 0 head 1 keys are given twice",
        "int4+layers:at=[0],heads=[x],key=int8": "bad head 'x'",
    }.items():
        with pytest.raises(SpecError, match=msg):
            parse_layer_plan(bad)
    with pytest.raises(SpecError, match="KV head 2 is out of range for a model with 2 KV heads"):
        parse_layer_plan("int4+layers:at=[0],heads=[2],key=int8").assign_heads(4, 2)
    with pytest.raises(SpecError, match="heads= tiers are a frontier plan"):
        plan.layer_configs(8)


def test_each_head_goes_through_its_own_codec(cap) -> None:
    """A head coded in its own slice gets the codes it gets in the whole layer (white= fits per head)."""
    hi, lo = "fibquant:b=3,k=4,sinks=1,prerope=1,white=2", "fibquant:b=2,k=4,sinks=1,prerope=1,white=2"
    spec = f"layers:at=[1],heads=[1],key=[{hi}]+layers:at=[2],heads=[0],value=[int8]+{lo}"
    res = build_method(spec).compress_layers(cap.layers)
    whole = {c: CodecMethod(c, make_codec(c)).compress_layers(cap.layers) for c in (hi, lo)}
    int8 = make_codec("int8")
    for i, r in enumerate(res):
        want_k = whole[lo][i].k_hat.clone()
        want_v = whole[lo][i].v_hat.clone()
        if i == 1:
            want_k[:, 1] = whole[hi][i].k_hat[:, 1]
        if i == 2:
            want_v[:, 0] = int8.roundtrip(cap.layers[i].v[:, :1], "value")[0][:, 0]
        torch.testing.assert_close(r.k_hat, want_k, rtol=0, atol=1e-6)
        torch.testing.assert_close(r.v_hat, want_v, rtol=0, atol=0)
    # bytes: every slice's own packed bytes, summed
    layer = cap.layers[1]
    k_bytes = sum(code_keys(make_codec(c), head_slice(layer, [h]))[1] for c, h in ((lo, 0), (hi, 1)))
    assert res[1].nbytes == k_bytes + code_values(make_codec(lo), layer)[1]
    assert res[1].nbytes > whole[lo][1].nbytes  # one key head at 3 bits instead of 2
    assert res[0].nbytes == whole[lo][0].nbytes
