"""The transformers integration: ``CompressedCache`` and the ``kvshrink`` attention function.

The only package of kvshrink (besides eval) that imports transformers.
"""

from .cache import CompressedCache, LayerBytes, MemoryReport
from .config import CacheConfig, CacheSpec, parse_cache_spec
from .install import ATTENTION, SUPPORTED_MODEL_TYPES, install, uninstall

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
