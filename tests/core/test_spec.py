from __future__ import annotations

import pytest

from kvshrink.codecs import make_codec
from kvshrink.core import SpecError, parse_stage, split_specs, split_stages


def test_parse_and_print_back() -> None:
    st = parse_stage("kivi:b=4,group=16")
    assert st.name == "kivi" and st.options == (("b", "4"), ("group", "16"))
    assert str(make_codec("kivi:b=4,group=16").config) == "kivi:b=4,group=16"
    assert str(make_codec("kivi").config) == "kivi:b=2"  # always-printed option
    assert str(make_codec("int8").config) == "int8"


def test_split() -> None:
    assert split_specs(" int8 ; kivi:b=2;") == ["int8", "kivi:b=2"]
    assert split_stages("snapkv:ratio=0.5+int4") == ["snapkv:ratio=0.5", "int4"]


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("kivi:b", "expected key=value"),
        ("kivi:", "empty option list"),
        ("kivi:b=2,b=4", "given twice"),
        ("Kivi!", "bad method name"),
        ("kivi:b=two", "must be an integer"),
        (";", "no method given"),
        ("int8++int4", "empty stage"),
    ],
)
def test_errors_are_one_line(text: str, match: str) -> None:
    with pytest.raises(SpecError, match=match) as err:
        for spec in split_specs(text):
            for stage in split_stages(spec):
                make_codec(stage)
    assert "\n" not in str(err.value)


def test_did_you_mean() -> None:
    with pytest.raises(SpecError, match="did you mean kivi"):
        make_codec("kiwi:b=2")
