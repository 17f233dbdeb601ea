"""Peer methods measured on the same windows: transformers' QuantizedCache (quanto backend).

A peer owns its cache, so it runs its own prefill; the frontier then compares its stored keys
and values (dequantized) with the exact ones and teacher-forces the same continuation. Bytes are
summed over the tensors the peer actually holds, walking tensor subclasses down to their
storage (quanto's 4-bit data is a packed uint8 tensor with fp32 scale and shift per group).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..core.errors import ModelError, SpecError
from ..core.registry import Registry
from ..core.spec import SpecConfig

__all__ = ["PEERS", "HfQuantoConfig", "HfQuantoMethod", "held_nbytes"]


def held_nbytes(t: torch.Tensor) -> int:
    """Bytes a (possibly subclassed) tensor holds: the sum over its inner plain tensors."""
    if hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(held_nbytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


@dataclass(frozen=True)
class HfQuantoConfig(SpecConfig):
    """transformers' QuantizedCache with optimum-quanto; its defaults (group 64, residual 128)."""

    name: ClassVar[str] = "hf-quanto"
    always: ClassVar[tuple[str, ...]] = ("b",)
    b: int = 4
    group: int = 64
    residual: int = 128

    def __post_init__(self) -> None:
        if self.b not in (2, 4):
            raise SpecError(f"hf-quanto: b must be 2 or 4 (quanto's qint2/qint4), got {self.b}")


PEERS: Registry = Registry("peer method")


@dataclass
class PeerWindow:
    logits: torch.Tensor  # [T_cont, V]
    keys: list[torch.Tensor]  # per layer, dequantized, [B, Hkv, T, d]
    values: list[torch.Tensor]
    nbytes: int


@PEERS.register(HfQuantoConfig)
class HfQuantoMethod:
    owns_cache: ClassVar[bool] = True

    def __init__(self, config: HfQuantoConfig) -> None:
        try:
            import optimum.quanto  # noqa: F401
        except ImportError:
            raise ModelError(
                "hf-quanto needs optimum-quanto: pip install 'kvshrink[peers]' (an optional extra)"
            ) from None
        self.config = config
        self.spec = str(config)

    def check_dim(self, d: int) -> None:
        if d % self.config.group:
            raise SpecError(f"{self.spec}: group={self.config.group} does not divide head dim {d}")

    @torch.no_grad()
    def run_window(self, model, prefix: torch.Tensor, cont: torch.Tensor) -> PeerWindow:
        from transformers import QuantizedCache

        c = self.config
        cache = QuantizedCache(
            backend="quanto", config=model.config, nbits=c.b, residual_length=c.residual, q_group_size=c.group
        )
        model(prefix, past_key_values=cache, use_cache=True)
        keys, values, nbytes = [], [], 0
        for layer in cache.layers:
            held = [layer._quantized_keys, layer._quantized_values, layer.keys, layer.values]
            nbytes += sum(held_nbytes(t) for t in held if t is not None)
            keys.append(torch.cat([layer._dequantize(layer._quantized_keys), layer.keys], dim=-2))
            values.append(torch.cat([layer._dequantize(layer._quantized_values), layer.values], dim=-2))
        logits = model(cont, past_key_values=cache, use_cache=True).logits[0]
        return PeerWindow(logits, keys, values, nbytes)
