"""Spec strings: the one canonical name of a configuration.

Grammar (faiss-factory style, written down so that CLI flags, table rows, plot legends and store
keys all agree)::

    specs  := spec (';' spec)*
    spec   := stage ('+' stage)*
    stage  := NAME (':' option (',' option)*)?
    option := KEY '=' VALUE
    VALUE  := text without ',' | '[' text ']'

A bracketed value may hold commas: it is how an option names a whole stage of another registry,
e.g. ``mikv:ratio=0.75,low=[fibquant:b=1,k=8]`` (a value without commas needs no brackets:
``low=kivi:b=2``). Brackets do not nest, and a value never holds '+' or ';'.

A stage maps to a frozen config dataclass. ``str(config)`` prints the canonical stage back: the
always-shown options first, then every option that differs from its default, in field order.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import typing
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from .errors import SpecError

__all__ = [
    "SpecConfig",
    "Stage",
    "build_config",
    "format_config",
    "nearest",
    "parse_stage",
    "split_specs",
    "split_stages",
]

_NAME = re.compile(r"^[a-z][a-z0-9_\-/.]*$")
_KEY = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass(frozen=True)
class Stage:
    """One parsed stage: ``name`` and its raw string options."""

    name: str
    options: tuple[tuple[str, str], ...]


def split_specs(text: str) -> list[str]:
    """Split ``"a;b;c"`` into stripped, non-empty specs."""
    specs = [s.strip() for s in text.split(";")]
    specs = [s for s in specs if s]
    if not specs:
        raise SpecError("no method given: expected specs like 'int8;kivi:b=2'")
    return specs


def split_stages(spec: str) -> list[str]:
    """Split ``"snapkv:ratio=0.5+fibquant:b=2"`` into its stages."""
    stages = [s.strip() for s in spec.split("+")]
    if any(not s for s in stages):
        raise SpecError(f"empty stage in spec {spec!r}: stages are joined by a single '+'")
    return stages


def parse_stage(text: str) -> Stage:
    """Parse ``name:key=val,key=val`` into a :class:`Stage` (values stay strings)."""
    text = text.strip()
    name, _, rest = text.partition(":")
    name = name.strip().lower()
    if not _NAME.match(name):
        raise SpecError(f"bad method name {name!r} in {text!r}: expected e.g. 'kivi:b=2'")
    options: list[tuple[str, str]] = []
    seen: set[str] = set()
    if rest.strip():
        for item in _split_options(rest, text):
            key, eq, value = item.partition("=")
            key, value = key.strip(), _unbracket(value.strip(), text)
            if not eq or not _KEY.match(key) or not value:
                raise SpecError(f"bad option {item.strip()!r} in {text!r}: expected key=value")
            if key in seen:
                raise SpecError(f"option {key!r} given twice in {text!r}")
            seen.add(key)
            options.append((key, value))
    elif _:
        raise SpecError(f"empty option list after ':' in {text!r}")
    return Stage(name, tuple(options))


def _split_options(rest: str, text: str) -> list[str]:
    """Split an option list at the commas outside ``[...]``."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(rest):
        if ch == "[":
            if depth:
                raise SpecError(f"nested '[' in {text!r}: a bracketed value holds one stage")
            depth = 1
        elif ch == "]":
            if not depth:
                raise SpecError(f"unmatched ']' in {text!r}")
            depth = 0
        elif ch == "," and not depth:
            items.append(rest[start:i])
            start = i + 1
    if depth:
        raise SpecError(f"unclosed '[' in {text!r}: expected e.g. low=[fibquant:b=1,k=8]")
    items.append(rest[start:])
    return items


def _unbracket(value: str, text: str) -> str:
    if value.startswith("[") and value.endswith("]"):
        return value[1:-1].strip()
    if "[" in value or "]" in value:
        raise SpecError(f"bad value {value!r} in {text!r}: brackets must enclose the whole value")
    return value


def nearest(word: str, choices: typing.Iterable[str], n: int = 3) -> list[str]:
    """The closest spellings among ``choices`` (for 'did you mean' messages)."""
    return difflib.get_close_matches(word, list(choices), n=n, cutoff=0.5)


class SpecConfig:
    """Mixin for frozen config dataclasses that print back to their spec.

    ``always`` names the options printed even at their default value, so that ``int4`` and
    ``kivi:b=2`` read as users expect.
    """

    name: ClassVar[str] = ""
    always: ClassVar[tuple[str, ...]] = ()

    def __str__(self) -> str:  # pragma: no cover - thin alias
        return format_config(self)


class Configured:
    """Something built from one frozen config (a codec, a policy): the config is its identity.

    Its spec string and repr come from the config, so a table row, a log line and a store key
    name the same thing.
    """

    config: Any

    def __init__(self, config: Any) -> None:
        self.config = config

    @property
    def spec(self) -> str:
        return str(self.config)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r})"


def _fmt_value(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        if math.isfinite(value) and value == int(value) and abs(value) < 1e15:
            return str(int(value))
        return repr(value)
    if isinstance(value, str) and "," in value:
        return f"[{value}]"
    return str(value)


def format_config(config: Any) -> str:
    """Canonical stage string of a config dataclass."""
    parts = []
    for f in dataclasses.fields(config):
        if not f.init or f.name.startswith("_"):
            continue
        value = getattr(config, f.name)
        default = f.default if f.default is not dataclasses.MISSING else None
        if f.name in type(config).always or value != default:
            parts.append(f"{f.name}={_fmt_value(value)}")
    return type(config).name + (":" + ",".join(parts) if parts else "")


C = TypeVar("C")


def _convert(raw: str, tp: Any, key: str, stage: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is getattr(__import__("types"), "UnionType", None):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if raw.lower() == "none":
            return None
        tp = args[0]
    try:
        if tp is bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if tp is int:
            return int(raw)
        if tp is float:
            value = float(raw)
            if not math.isfinite(value):
                raise ValueError
            return value
        if tp is str:
            return raw
    except ValueError:
        kind = {bool: "0 or 1", int: "an integer", float: "a finite number"}.get(tp, str(tp))
        raise SpecError(f"{stage}: option {key}={raw!r} must be {kind}") from None
    raise SpecError(f"{stage}: option {key} has unsupported type {tp}")  # pragma: no cover


def build_config(cls: type[C], stage: Stage) -> C:
    """Instantiate ``cls`` from a parsed stage, with one-line errors naming the valid options."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init and not f.name.startswith("_")}
    kwargs: dict[str, Any] = {}
    for key, raw in stage.options:
        if key not in fields:
            valid = ", ".join(fields) or "none"
            raise SpecError(f"{stage.name}: unknown option {key!r}; valid options: {valid}")
        kwargs[key] = _convert(raw, hints[key], key, stage.name)
    try:
        return cls(**kwargs)
    except TypeError as exc:  # pragma: no cover - dataclass without defaults
        raise SpecError(f"{stage.name}: {exc}") from None
