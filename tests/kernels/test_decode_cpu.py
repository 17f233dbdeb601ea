"""The compiled CPU decode attention (rotation codecs) against the fp32 reference."""

from __future__ import annotations

import pytest
import torch

from kvshrink.codecs import make_codec
from kvshrink.core.errors import InputError
from kvshrink.kernels import decode_attention
from kvshrink.kernels.lut_cpu import available

from .test_decode_attn import CODECS, _case, assert_close_to_reference

pytestmark = pytest.mark.skipif(not available(), reason="numba not importable")

VQ = [n for n in CODECS if n.startswith(("tq-", "fq-", "turboquant", "fibquant"))]


@pytest.mark.parametrize("name", [*VQ, "fibquant:b=2,k=4", "fibquant:b=1.5,k=4", "turboquant:b=4"])
@pytest.mark.parametrize("windowed", [True, False], ids=["window", "no-window"])
def test_cpu_kernel_matches_reference(name: str, windowed: bool) -> None:
    codec = CODECS[name]() if name in CODECS else make_codec(name)
    q, pk, pv, lengths, window = _case(codec, b=3, g=3)
    window = window if windowed else None
    out = decode_attention(q, pk, pv, lengths, window, codec=codec, backend="cpu")
    assert out.shape == q.shape and out.dtype == q.dtype
    assert_close_to_reference(out, q, pk, pv, lengths, window, codec)
    auto = decode_attention(q, pk, pv, lengths, window, codec=codec)  # CPU default: the same kernel
    assert torch.equal(auto, out)


def test_cpu_kernel_empty_sequence_gets_zeros() -> None:
    codec = make_codec("fibquant:b=2,k=4")
    q, pk, pv, _, window = _case(codec, b=2)
    lengths = torch.tensor([0, 0])
    win = window._replace(lengths=torch.tensor([0, 4]))
    out = decode_attention(q, pk, pv, lengths, win, codec=codec, backend="cpu")
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert_close_to_reference(out, q, pk, pv, lengths, win, codec)


def test_cpu_kernel_refuses_scalar_layouts() -> None:
    codec = make_codec("int4")
    q, pk, pv, lengths, window = _case(codec)
    with pytest.raises(InputError, match="token layout"):
        decode_attention(q, pk, pv, lengths, window, codec=codec, backend="cpu")
    out = decode_attention(q, pk, pv, lengths, window, codec=codec)  # auto: the reference
    assert_close_to_reference(out, q, pk, pv, lengths, window, codec)
