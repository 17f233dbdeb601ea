"""What ``kvshrink longbench`` can run: a method spec becomes a cache factory, and bytes are
counted from the cache actually held.

- ``none`` (alias ``uncompressed``): transformers' ``DynamicCache``, the reference;
- any CompressedCache spec: ``fp16``, ``kivi:b=2``, ``snapkv:ratio=0.75+fibquant:b=2``...;
- ``kvpress/<Press>:ratio=R``: a kvpress press (optional extra, see :mod:`.kvpress_peer`).

Bytes are counted two ways. *Resident*: what sits on the attention device. *Total*:
everything the method keeps, host backups included (a recall policy offloads what it
evicts). Dense full-precision tensors (DynamicCache's keys and values, CompressedCache's
window) count 2 bytes per element whatever dtype the run used: a deployment holds them in
fp16/bf16, and a CPU run in float32 would otherwise make the uncompressed reference look 2x
larger than its fp16 equivalent. Packed codes, scales and bookkeeping count as held.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..core.errors import SpecError
from ..core.spec import parse_stage, split_stages
from .kvpress_peer import PREFIX, KvpressMethod, parse_kvpress

__all__ = [
    "CacheBytes",
    "CompressedMethod",
    "DynamicMethod",
    "build_longbench_method",
    "cache_bytes",
    "fp16_baseline",
]

NONE_NAMES = ("none", "uncompressed")
FP16 = 2  # bytes per element of the fp16 reference


@dataclass(frozen=True)
class CacheBytes:
    resident: int
    total: int


def fp16_baseline(model: Any, seen: int) -> int:
    """Bytes an fp16 ``DynamicCache`` holds after ``seen`` tokens (sliding layers: their window)."""
    from ..cache.install import layer_windows, text_config

    config = text_config(model)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    per_token = 2 * config.num_key_value_heads * head_dim * FP16
    return sum(per_token * (seen if w is None else min(seen, w - 1)) for w in layer_windows(config))


def cache_bytes(cache: Any) -> CacheBytes:
    """Resident and total bytes of ``cache`` (a DynamicCache or a CompressedCache).

    CompressedCache: ``memory_report().resident``/``.total`` where the report has them (a recall
    policy's host backup is in ``total`` only), else ``nbytes()`` for both; its window is
    rescaled to 2 bytes per element.
    """
    from ..cache import CompressedCache

    if isinstance(cache, CompressedCache):
        report = cache.memory_report()
        held = report.nbytes
        resident, total = getattr(report, "resident", held), getattr(report, "total", held)
        dtype = next((getattr(layer, "dtype", None) for layer in cache.layers if layer.is_initialized), None)
        itemsize = torch.empty((), dtype=dtype).element_size() if dtype is not None else FP16
        excess = sum(layer.window for layer in report.layers) * (itemsize - FP16) // itemsize
        return CacheBytes(int(resident) - excess, int(total) - excess)
    held = sum(
        FP16 * (layer.keys.numel() + layer.values.numel()) for layer in cache.layers if layer.is_initialized
    )
    return CacheBytes(held, held)


class DynamicMethod:
    """transformers' ``DynamicCache``: every token in full precision."""

    kind: ClassVar[str] = "none"
    name = "none"

    def new_cache(self, model: Any):
        from transformers import DynamicCache

        return DynamicCache(config=model.config)

    @contextmanager
    def prefill(self, model: Any, n_tokens: int, device: torch.device):
        yield {}

    def release(self, model: Any, cache: Any) -> None:
        pass


class CompressedMethod:
    """A :class:`~kvshrink.cache.CompressedCache` spec; its policy acts on every forward."""

    kind: ClassVar[str] = "kvshrink"

    def __init__(self, spec: str) -> None:
        from ..cache import parse_cache_spec

        self.parsed = parse_cache_spec(spec)
        self.name = str(self.parsed)
        self.parsed.build_codec()  # a bad codec option fails here, before any model is loaded

    def check(self, model: Any) -> None:
        from ..cache.install import text_config

        config = text_config(model)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.parsed.build_codec().check_dim(head_dim)

    def new_cache(self, model: Any):
        from ..cache import CompressedCache

        return CompressedCache(model, self.name)

    @contextmanager
    def prefill(self, model: Any, n_tokens: int, device: torch.device):
        yield {}

    def release(self, model: Any, cache: Any) -> None:
        cache.uninstall()  # the next method may be a plain DynamicCache or a kvpress hook


def build_longbench_method(spec: str):
    """Validate and build a method from its spec (fails before any model is loaded)."""
    if not isinstance(spec, str) or not spec.strip():
        raise SpecError(
            "empty method spec: expected e.g. 'none', 'kivi:b=2' or 'kvpress/SnapKVPress:ratio=0.75'"
        )
    spec = spec.strip()
    if spec.lower() in NONE_NAMES:
        return DynamicMethod()
    if spec.lower().startswith(PREFIX):
        stages = split_stages(spec)
        if len(stages) != 1:
            raise SpecError(f"{spec!r}: a kvpress press runs alone on a DynamicCache; it takes no '+' stages")
        return KvpressMethod(parse_kvpress(spec, parse_stage(stages[0])))
    return CompressedMethod(spec)
