"""Cache spec strings: grammar, canonical form, one-line errors."""

from __future__ import annotations

import pytest

from kvshrink.cache import CacheConfig, parse_cache_spec
from kvshrink.core import KvshrinkError, SpecError


@pytest.mark.parametrize(
    "spec,canonical",
    [
        ("int4", "int4"),
        ("kivi:b=2", "kivi:b=2"),
        ("snapkv:ratio=0.75+fp16", "snapkv:ratio=0.75+fp16"),
        ("streamingllm:sinks=4,budget=256+int4", "streamingllm:budget=256,sinks=4+int4"),
        ("int4+cache:window=64", "int4+cache:window=64"),
        ("cache:block=64+fp16+h2o:budget=100", "h2o:budget=100+fp16+cache:block=64"),
        ("int4+cache:window=128", "int4"),
    ],
)
def test_canonical_form_roundtrips(spec: str, canonical: str) -> None:
    parsed = parse_cache_spec(spec)
    assert str(parsed) == canonical
    assert parse_cache_spec(str(parsed)) == parsed


def test_constructor_options_override_the_cache_stage() -> None:
    assert parse_cache_spec("int4+cache:window=64", window=32, block=16).cache == CacheConfig(32, 16)


def test_kivi_residual_is_replaced_by_the_window() -> None:
    codec = parse_cache_spec("kivi:b=2").build_codec()
    assert codec.config.residual == 0  # type: ignore[attr-defined]
    assert str(parse_cache_spec("kivi:b=2").codec) == "kivi:b=2"


@pytest.mark.parametrize("option", ["sinks=4", "window=64"])
def test_codec_fp16_ranges_are_refused_when_set(option: str) -> None:
    from kvshrink.codecs import CODECS

    names = [n for n in CODECS.names() if n in ("turboquant", "fibquant")]
    if not names:
        pytest.skip("no codec with sinks/window options is registered")
    with pytest.raises(SpecError, match="would keep fp16 tokens"):
        parse_cache_spec(f"{names[0]}:{option}")


@pytest.mark.parametrize(
    "spec,match",
    [
        ("", "empty cache spec"),
        ("snapkv:ratio=0.5", "no codec stage"),
        ("int4+int8", "more than one codec"),
        ("snapkv:ratio=0.5+h2o:budget=9+int4", "more than one policy"),
        ("foo:ratio=0.5+int4", "unknown stage 'foo'.*policies: "),
        ("snapkvv:ratio=0.5+int4", "did you mean snapkv"),
        ("int4+cache:window=-1", "window must be"),
        ("int4+cache:windw=3", "unknown option"),
        ("kivi:b=2,residual=64", "would keep fp16 tokens in every packed block"),
        ("fibquant:b=2,prerope=1", "prerope=1 is served by the frontier harness only"),
    ],
)
def test_bad_specs_raise_one_line(spec: str, match: str) -> None:
    with pytest.raises(KvshrinkError, match=match) as err:
        parse_cache_spec(spec)
    assert "\n" not in str(err.value)


def test_unknown_constructor_option() -> None:
    with pytest.raises(SpecError, match="unknown cache option"):
        parse_cache_spec("int4", windw=3)
