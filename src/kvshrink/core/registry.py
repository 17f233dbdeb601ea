"""Name -> (config class, implementation) registries.

A new method is one new file that registers itself; nothing else in the library grows an
if-chain. Registries are filled at import time of the module that defines the method.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from .errors import SpecError
from .spec import Stage, build_config, nearest, parse_stage

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps a spec name to its config dataclass and a factory ``config -> T``."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, tuple[type, Callable[..., T]]] = {}

    def register(self, config_cls: type) -> Callable[[Callable[..., T]], Callable[..., T]]:
        name = config_cls.name  # type: ignore[attr-defined]

        def deco(factory: Callable[..., T]) -> Callable[..., T]:
            if name in self._entries:
                raise RuntimeError(f"{self.kind} {name!r} registered twice")
            self._entries[name] = (config_cls, factory)
            return factory

        return deco

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def config(self, stage: str | Stage):
        stage = parse_stage(stage) if isinstance(stage, str) else stage
        if stage.name not in self._entries:
            hint = nearest(stage.name, self._entries)
            near = f" (did you mean {', '.join(hint)}?)" if hint else ""
            raise SpecError(f"unknown {self.kind} {stage.name!r}{near}; valid: {', '.join(self.names())}")
        return build_config(self._entries[stage.name][0], stage)

    def build(self, stage: str | Stage) -> T:
        config = self.config(stage)
        return self._entries[type(config).name][1](config)  # type: ignore[attr-defined]
