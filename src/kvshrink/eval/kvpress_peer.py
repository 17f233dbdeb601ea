"""NVIDIA kvpress presses as peer methods: ``kvpress/SnapKVPress:ratio=0.75``.

A press evicts tokens inside a forward hook on every attention layer, during the context
prefill only; the question and answer then run on the pruned ``DynamicCache`` untouched, as
in kvpress's own pipeline (which also passes explicit position ids from the original context
length, since the pruned cache's length no longer says where the sequence is).

Three compatibility shims, all small and local to this module:

- kvpress 0.5.5's hook reads ``kwargs["cache_position"]`` to tell a prefill from a decode
  step. transformers 5.2x no longer passes ``cache_position`` to attention modules, so the hook
  raises ``KeyError``. The context forward therefore passes ``cache_position=arange(n)``
  itself; the model forwards unknown keyword arguments down to each attention module, and
  where transformers still takes the argument it gets the value it would have computed.
- transformers 5.25 renamed the attention modules' ``past_key_values`` argument to ``cache``
  (the old name is deprecated and translated before the module runs), so the hook, which reads
  ``kwargs["past_key_values"]``, raises ``KeyError``. Each press's hook is wrapped to see the
  cache under both names (:func:`_cache_alias`); older transformers pass the old name and the
  wrapper changes nothing.
- ``import kvpress`` imports every press, and two of them import ``cachetools`` and
  ``datasets``, which kvpress declares but a ``--no-deps`` install (needed because kvpress
  pins ``transformers<5.3``) does not bring. The five presses compared here need neither, so
  when the package import fails on a missing third-party module, their modules are loaded
  without running ``kvpress/__init__.py`` (which also skips its AdaKV attention patch, used by
  none of them).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..core.errors import ModelError, SpecError
from ..core.spec import Stage, nearest

__all__ = ["PRESSES", "KvpressMethod", "kvpress_available", "load_press", "parse_kvpress"]

PREFIX = "kvpress/"
#: press class -> module in kvpress.presses (scorer presses that evict at prefill)
PRESSES = {
    "StreamingLLMPress": "streaming_llm_press",
    "SnapKVPress": "snapkv_press",
    "KnormPress": "knorm_press",
    "ExpectedAttentionPress": "expected_attention_press",
    "TOVAPress": "tova_press",
}
_BY_LOWER = {**{k.lower(): k for k in PRESSES}, **{k.lower().removesuffix("press"): k for k in PRESSES}}


def kvpress_available() -> bool:
    return importlib.util.find_spec("kvpress") is not None


def load_press(name: str) -> type:
    """The press class ``name`` from kvpress (see the module docstring for the import fallback)."""
    if not kvpress_available():
        raise ModelError(f"{PREFIX}{name} needs kvpress: pip install 'kvshrink[peers]' (an optional extra)")
    pkg = sys.modules.get("kvpress")
    if pkg is None:
        try:
            import kvpress as pkg
        except ModuleNotFoundError as exc:
            if exc.name is None or exc.name.split(".")[0] == "kvpress":
                raise
            # the failed import removed the package; its finished submodules stay importable
            spec = importlib.util.find_spec("kvpress")
            assert spec is not None
            pkg = sys.modules["kvpress"] = importlib.util.module_from_spec(spec)  # __init__ not run
    if hasattr(pkg, name):
        return getattr(pkg, name)
    return getattr(importlib.import_module(f"kvpress.presses.{PRESSES[name]}"), name)


@dataclass(frozen=True)
class KvpressSpec:
    press: str
    ratio: float

    def __str__(self) -> str:
        return f"{PREFIX}{self.press}:ratio={self.ratio:g}"


def parse_kvpress(spec: str, stage: Stage) -> KvpressSpec:
    """``kvpress/<Press>:ratio=R`` (press names case-insensitive, ``Press`` suffix optional)."""
    short = stage.name.removeprefix(PREFIX)
    press = _BY_LOWER.get(short)
    if press is None:
        hint = nearest(short, list(_BY_LOWER))
        near = f" (did you mean {', '.join(_BY_LOWER[h] for h in hint)}?)" if hint else ""
        raise SpecError(f"unknown kvpress press {short!r} in {spec!r}{near}; valid: {', '.join(PRESSES)}")
    options = dict(stage.options)
    if set(options) != {"ratio"}:
        raise SpecError(f"{spec!r}: a kvpress method takes exactly one option, ratio= (fraction removed)")
    try:
        ratio = float(options["ratio"])
    except ValueError:
        raise SpecError(f"{spec!r}: ratio must be a number in (0, 1)") from None
    if not 0.0 < ratio < 1.0:
        raise SpecError(f"{spec!r}: ratio is the fraction removed and must be in (0, 1), got {ratio}")
    return KvpressSpec(press, ratio)


def _cache_alias(hook: Any) -> Any:
    """``hook`` seeing the cache as ``kwargs["past_key_values"]`` when transformers passed ``cache``."""

    def aliased(module: Any, args: Any, kwargs: dict, output: Any) -> Any:
        if "past_key_values" not in kwargs and "cache" in kwargs:
            kwargs = {**kwargs, "past_key_values": kwargs["cache"]}
        return hook(module, args, kwargs, output)

    return aliased


class KvpressMethod:
    """A kvpress press over a ``DynamicCache``: prunes during the context forward only."""

    kind: ClassVar[str] = "kvpress"

    def __init__(self, spec: KvpressSpec) -> None:
        self.press = load_press(spec.press)(compression_ratio=spec.ratio)
        self.press.forward_hook = _cache_alias(self.press.forward_hook)
        self.name = str(spec)

    def new_cache(self, model: Any):
        from transformers import DynamicCache

        return DynamicCache(config=model.config)

    @contextmanager
    def prefill(self, model: Any, n_tokens: int, device: torch.device):
        """Hooks on while the context is prefilled; yields extra forward kwargs (the shim)."""
        with self.press(model):
            yield {"cache_position": torch.arange(n_tokens, device=device)}

    def release(self, model: Any, cache: Any) -> None:
        pass
