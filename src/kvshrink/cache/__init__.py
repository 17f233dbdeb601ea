"""The transformers integration: ``CompressedCache`` and the ``kvshrink`` attention function.

The only package of kvshrink (besides eval) that imports transformers, and it does so on first
use: names resolve lazily (PEP 562), so ``import kvshrink`` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "ATTENTION",
    "SUPPORTED_MODEL_TYPES",
    "CacheConfig",
    "CacheSpec",
    "CompressedCache",
    "LayerBytes",
    "MemoryReport",
    "install",
    "parse_cache_spec",
    "uninstall",
]

_WHERE = {
    "CompressedCache": "cache",
    "LayerBytes": "cache",
    "MemoryReport": "cache",
    "CacheConfig": "config",
    "CacheSpec": "config",
    "parse_cache_spec": "config",
    "ATTENTION": "install",
    "SUPPORTED_MODEL_TYPES": "install",
    "install": "install",
    "uninstall": "install",
}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'kvshrink.cache' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)


def _lazy_top(name: str) -> Any:
    """``kvshrink.__getattr__``: resolves ``kvshrink.CompressedCache`` on first use."""
    if name != "CompressedCache":
        raise AttributeError(f"module 'kvshrink' has no attribute {name!r}")
    return __getattr__(name)


def __dir__() -> list[str]:
    return sorted(__all__)
