"""Heavy tokens in the frontier: the most-attended tokens exact, selected from prompt queries, bytes counted."""

from __future__ import annotations

import pytest
import torch

from kvshrink.core import SpecError
from kvshrink.eval.capture import capture
from kvshrink.eval.frontier import FrontierConfig, run_frontier
from kvshrink.eval.heavy import HeavyMethod, heavy_mass, held_exactly
from kvshrink.eval.methods import build_method
from tests.policies.tiny import VOCAB, tiny_llama

INNER = "fibquant:b=1,k=4,sinks=1,window=4"


@pytest.fixture(scope="module")
def model():
    return tiny_llama(layers=2)


@pytest.fixture(scope="module")
def cap(model):
    ids = torch.randint(0, VOCAB, (1, 48), generator=torch.Generator().manual_seed(3))
    return capture(model, ids, torch.tensor([10, 30, 40, 47]))


def test_build_method_wraps_any_method_in_heavy() -> None:
    m = build_method(f"heavy:m=3,last=0.5+{INNER}")
    assert isinstance(m, HeavyMethod)
    assert (m.config.m, m.config.last) == (3, 0.5)
    assert str(m.config) == "heavy:m=3,last=0.5"
    plan = build_method("heavy:m=2+layers:at=[0],codec=[fibquant:b=2,k=4]+fibquant:b=1,k=4")
    assert type(plan.inner).__name__ == "LayerwiseMethod"


@pytest.mark.parametrize(
    "spec, match",
    [
        (f"heavy:m=-1+{INNER}", "m is a token count"),
        (f"heavy:last=1.0+{INNER}", "last is a share"),
        ("heavy:m=2", "heavy needs a method after it"),
        (f"heavy:n=2+{INNER}", "n"),
        (f"heavy:b=-1+{INNER}", "b is 0"),
    ],
)
def test_bad_heavy_specs_fail_in_one_line(spec: str, match: str) -> None:
    with pytest.raises(SpecError, match=match):
        build_method(spec)


@pytest.mark.parametrize("inner_spec", [INNER, INNER + ",prerope=1"])
def test_the_most_attended_tokens_come_back_exact_and_are_paid_for(cap, inner_spec: str) -> None:
    """Keys coded before RoPE come back a few ulps off for the sink and window: those are still
    not ranked (a slot spent on them would be wasted, and at b=4 would replace an exact token)."""
    inner = build_method(inner_spec).compress_layers(cap.layers)
    out = build_method(f"heavy:m=3,last=0.5+{inner_spec}").compress_layers(cap.layers)
    for layer, r0, r in zip(cap.layers, inner, out):
        b, hkv, _, d = layer.k.shape
        assert r.nbytes == r0.nbytes + b * hkv * 3 * (4 * d + 2)
        exact0 = held_exactly(layer, r0)
        exact = held_exactly(layer, r)
        assert int(exact0[0, 0].sum()) == 1 + 4  # the sink and the window of 4
        assert bool((exact >= exact0).all())  # what was exact stays exact
        new = exact & ~exact0
        assert bool((new.sum(-1) == 3).all())  # three more per KV head, none spent on the sink or window
        mass = heavy_mass(layer, 0.5).masked_fill(exact0, -1.0)
        top = mass.topk(3, -1).indices
        assert bool(new.gather(-1, top).all())  # and they are the three most attended
        untouched = ~exact
        assert torch.equal(r.k_hat[untouched], r0.k_hat[untouched])


def test_heavy_mass_uses_only_queries_at_or_after_the_cut(cap) -> None:
    layer = cap.layers[1]
    # the cut at 0.9 * 48 = 43 keeps the query at 47 alone: mass sums to one per query head
    mass = heavy_mass(layer, 0.9)
    hq, hkv = layer.q.shape[1], layer.k.shape[1]
    assert torch.allclose(mass.sum(-1), torch.full_like(mass.sum(-1), hq // hkv), atol=1e-5)


def test_m_zero_is_the_inner_method_and_kept_tokens_lower_the_key_error(model) -> None:
    ids = torch.randint(0, VOCAB, (600,), generator=torch.Generator().manual_seed(4))
    cfg = FrontierConfig(context=96, continuation=16, windows=2, n_queries=12)
    res = run_frontier(model, ids, [INNER, f"heavy:m=0+{INNER}", f"heavy:m=24+{INNER}"], cfg).to_json()
    base, zero, many = res["rows"]
    assert zero["kl"] == base["kl"] and zero["compression_ratio"] == base["compression_ratio"]
    assert many["compression_ratio"] < base["compression_ratio"]
    assert many["key_rel_mse"] < base["key_rel_mse"]


def test_kept_tokens_at_a_higher_rate_cost_their_codes(cap) -> None:
    inner = build_method(INNER + ",prerope=1").compress_layers(cap.layers)
    meth = build_method(f"heavy:m=3,b=4,k=2+{INNER},prerope=1")
    assert meth.shared_nbytes(16) > build_method(INNER).shared_nbytes(16)
    for layer, r0, r in zip(cap.layers, inner, meth.compress_layers(cap.layers)):
        b, hkv, _, d = layer.k.shape
        codes = b * hkv * 3 * (d * 4 // 8 + 2)  # 4 bits a coordinate and an fp16 norm, K and V each
        assert r.nbytes == r0.nbytes + 2 * codes + b * hkv * 3 * 2
        changed = (r.k_hat != r0.k_hat).any(-1)
        assert bool((changed.sum(-1) <= 3).all())
        assert not bool((changed & held_exactly(layer, r0)).any())  # never the sink or window
        err0 = (r0.k_hat - layer.k)[changed].norm()
        assert (r.k_hat - layer.k)[changed].norm() < err0  # 4 bits beat the plan's 1
