"""``normbits=8``: vector norms as a uint8 log2 code instead of fp16.

The norm is 16 of the ~150 bits a 2-bit d=64 vector costs; a 1/8-octave log code keeps it within
4.4% and must (a) bound that error over the whole range, (b) save exactly one byte per coded
token, (c) barely move the codec's error, (d) be refused by the kernels (they read fp16 norms)
rather than misread, and (e) run inside CompressedCache.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvshrink.cache.store import kernel_unsupported
from kvshrink.codecs import make_codec
from kvshrink.codecs.rotated import decode_lnorm, encode_lnorm
from kvshrink.core import InputError, SpecError
from kvshrink.kernels.layout import layout_of, packed_unsupported

from ..kernels.test_cache_store import _run as run_generate
from ..policies.tiny import VOCAB, tiny_llama

STEP = 2.0 ** (1 / 16) - 1  # half of a 1/8-octave step, relative


@settings(max_examples=200, deadline=None)
@given(st.floats(min_value=-15.9, max_value=15.9))
def test_log_code_error_is_bounded(e: float) -> None:
    n = torch.tensor([2.0**e])
    rel = float(decode_lnorm(encode_lnorm(n)) / n - 1)
    assert abs(rel) <= STEP + 1e-6, (e, rel)


def test_zero_and_tiny_norms_decode_to_zero() -> None:
    code = encode_lnorm(torch.tensor([0.0, 1e-9, 2.0**-17]))
    assert code.tolist() == [0, 0, 0]
    assert decode_lnorm(code).tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("spec", ["fibquant:b=3,k=4", "turboquant:b=3", "fibquant:b=2,k=4,sinks=1,window=4"])
def test_one_byte_less_per_token_and_nearly_the_same_error(spec: str) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 200, 64, generator=g) * torch.logspace(-1, 1, 200).unsqueeze(-1)
    wide, narrow = make_codec(spec), make_codec(spec + ",normbits=8")
    pw, pn = wide.encode(x, "key"), narrow.encode(x, "key")
    coded = pn.meta["coded"]
    assert pn.tensors["lnorm"].dtype == torch.uint8 and "norm" not in pn.tensors
    assert pw.nbytes() - pn.nbytes() == 2 * 3 * coded  # fp16 -> uint8, one byte per coded token
    ew = float((wide.decode(pw) - x).pow(2).sum() / x.pow(2).sum())
    en = float((narrow.decode(pn) - x).pow(2).sum() / x.pow(2).sum())
    assert ew <= en <= 1.05 * ew + 1e-4, (ew, en)
    again = narrow.encode(x, "key")
    for name, v in pn.tensors.items():
        assert torch.equal(v, again.tensors[name]), name


def test_rejected_options_and_ranges() -> None:
    with pytest.raises(SpecError, match="normbits must be 16"):
        make_codec("fibquant:b=2,k=4,normbits=12")
    c = make_codec("turboquant:b=2,normbits=8")
    with pytest.raises(InputError, match="exceeds the 8-bit log-coded range of the stored norm"):
        c.encode(torch.full((1, 1, 4, 64), 1e4), "key")


def test_kernels_refuse_log_coded_norms() -> None:
    c = make_codec("turboquant:b=4,normbits=8")
    p = c.encode(torch.randn(1, 2, 64, 128), "key")
    why = packed_unsupported(p, layout_of(c, "key", 128), 128)
    assert why is not None and "lnorm" in why
    why = kernel_unsupported(c, 128, 64, torch.float16)  # what CompressedCache asks first
    assert why is not None and "lnorm" in why


def test_runs_in_the_cache_and_holds_fewer_bytes() -> None:
    model = tiny_llama(layers=2)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, VOCAB, (2, 48), generator=g)
    mask = torch.ones_like(ids)
    out16, c16 = run_generate(model, "fibquant:b=4,k=2+cache:window=8,block=8", ids, mask, steps=3)
    out8, c8 = run_generate(model, "fibquant:b=4,k=2,normbits=8+cache:window=8,block=8", ids, mask, steps=3)
    coded = sum(b.size for layer in c8.layers for b in layer.blocks)
    heads = c8.layers[0].heads
    assert (
        c16.memory_report().total - c8.memory_report().total == 2 * ids.shape[0] * heads * coded
    )  # K and V, per row and head
    assert out8.sequences.shape == out16.sequences.shape
