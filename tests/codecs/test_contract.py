"""The codec contract, run over every registered codec spec."""

from __future__ import annotations

import pytest
import torch

from kvshrink.codecs import CODECS, make_codec
from kvshrink.core import InputError, SpecError

from ..conftest import gaussian_kv
from .specs_rotated import ROTATED_SPECS

SPECS = [
    "fp16",
    "int8",
    "int4",
    "int4:group=0",
    "kivi:b=2",
    "kivi:b=4",
    "kivi:b=2,residual=0",
    *ROTATED_SPECS,
]


@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize("role", ["key", "value"])
def test_shapes_random_access_and_bytes(spec: str, role: str) -> None:
    x = gaussian_kv(0, (2, 3, 257, 64))
    codec = make_codec(spec)
    packed = codec.encode(x, role)
    y = codec.decode(packed)
    assert y.shape == x.shape and y.dtype == x.dtype
    idx = torch.tensor([0, 1, 31, 32, 128, 255, 256, -1])
    assert torch.equal(codec.decode_tokens(packed, idx), y[..., idx, :])
    # bytes counted from the tensors held, nothing else
    held = sum(t.numel() * t.element_size() for t in packed.tensors.values())
    assert packed.nbytes() == held
    assert packed.compression_ratio() == pytest.approx(2 * x.numel() / held)


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_spec_roundtrip(spec: str) -> None:
    codec = make_codec(spec)
    assert make_codec(str(codec.config)).config == codec.config


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_dtypes(spec: str, dtype: torch.dtype) -> None:
    x = gaussian_kv(1, (1, 2, 130, 64), dtype)
    codec = make_codec(spec)
    y = codec.decode(codec.encode(x))
    assert y.dtype == dtype and y.shape == x.shape


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_bad_tensors(spec: str) -> None:
    codec = make_codec(spec)
    x = gaussian_kv(2, (1, 1, 64, 64))
    x[0, 0, 3, 5] = float("nan")
    with pytest.raises(InputError, match="NaN"):
        codec.encode(x)
    with pytest.raises(InputError, match="dtype"):
        codec.encode(torch.ones(1, 4, 64, dtype=torch.int32))
    with pytest.raises(InputError, match="shape"):
        codec.encode(torch.ones(64))


def test_unknown_codec_and_option() -> None:
    with pytest.raises(SpecError, match=r"valid: .*int8"):
        make_codec("int9")
    with pytest.raises(SpecError, match="valid options: b, group, residual"):
        make_codec("kivi:bits=2")
    with pytest.raises(SpecError, match="b must be 2 or 4"):
        make_codec("kivi:b=3")
    assert "kivi" in CODECS.names()


def test_head_dim_the_codec_cannot_split() -> None:
    with pytest.raises(InputError, match="does not divide head dim 48"):
        make_codec("kivi:b=2,group=32").encode(torch.ones(1, 128, 48))
