"""What the frontier can evaluate: a spec becomes a method that compresses one layer's K and V.

Codec specs (``int4``, ``kivi:b=2``, ``fibquant:b=2,k=4``) compress captured tensors directly.
Peer methods that own their cache (transformers' QuantizedCache) register here too and are
measured on the same windows through their own prefill.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..codecs import Codec, make_codec
from ..core.errors import SpecError
from ..core.spec import parse_stage, split_stages
from .capture import LayerCapture, apply_rope

__all__ = ["CodecMethod", "LayerResult", "build_method", "code_keys", "code_values", "family"]


@dataclass
class LayerResult:
    k_hat: torch.Tensor  # post-RoPE, [B, Hkv, T, d]
    v_hat: torch.Tensor
    nbytes: int


def code_keys(codec: Codec, layer: LayerCapture) -> tuple[torch.Tensor, int]:
    """Keys through ``codec`` (pre-RoPE when it asks, RoPE re-applied): post-RoPE decoded keys, bytes."""
    if getattr(codec.config, "prerope", False):
        if layer.k_pre is None or layer.rope_fn is None:
            raise SpecError(f"{codec.spec}: prerope needs pre-RoPE keys, which this model does not expose")
        pk = codec.encode(layer.k_pre, "key")
        k_hat = apply_rope(codec.decode(pk).to(layer.k.dtype), layer.cos, layer.sin, layer.rope_fn)
        return k_hat, pk.nbytes()
    pk = codec.encode(layer.k, "key")
    return codec.decode(pk), pk.nbytes()


def code_values(codec: Codec, layer: LayerCapture) -> tuple[torch.Tensor, int]:
    """Values through ``codec``: decoded values, bytes."""
    pv = codec.encode(layer.v, "value")
    return codec.decode(pv), pv.nbytes()


class CodecMethod:
    """Compress a captured layer with one codec (keys pre-RoPE when the codec asks for it)."""

    def __init__(self, spec: str, codec: Codec) -> None:
        self.spec = spec
        self.codec = codec
        self.prerope = bool(getattr(codec.config, "prerope", False))

    def shared_nbytes(self, d: int) -> int:
        return self.codec.shared_nbytes(d)

    def compress(self, layer: LayerCapture) -> LayerResult:
        k_hat, kb = code_keys(self.codec, layer)
        v_hat, vb = code_values(self.codec, layer)
        return LayerResult(k_hat, v_hat, kb + vb)

    def compress_layers(self, layers: Sequence[LayerCapture]) -> list[LayerResult]:
        """Every layer of one capture, in layer order (per-layer methods need the order)."""
        return [self.compress(layer) for layer in layers]


def family(spec: str) -> str:
    """Plot family of a spec: one curve per codec, per FibQuant k, and per set of extra options.

    The rate (``b``/``n``) and ``seed`` move a point along its curve; any other option
    (``center``, ``sinks``, ``lloyd=0``...) makes a different curve.
    """
    from .layerwise import NAME, is_layerwise

    stages = [parse_stage(s) for s in split_stages(spec)]
    stage = next((s for s in reversed(stages) if s.name != NAME), stages[-1])
    opts = dict(stage.options)
    name = f"{stage.name} k={opts.pop('k', '4')}" if stage.name == "fibquant" else stage.name
    extra = sorted(k for k in opts if k not in ("b", "n", "seed", "kb", "vb"))
    name += f" ({', '.join(f'{k}={opts[k]}' for k in extra)})" if extra else ""
    return name + (" per-layer" if is_layerwise(spec) else "")


def build_method(spec: str):
    """Validate and build a frontier method from its spec (fails before any model is loaded)."""
    from .layerwise import LayerwiseMethod, is_layerwise

    if is_layerwise(spec):
        return LayerwiseMethod(spec)
    stages = split_stages(spec)
    if len(stages) != 1:
        raise SpecError(
            f"{spec!r}: the frontier measures one codec or peer per method; token policies ('+') "
            "run through kvshrink.CompressedCache; per-layer codecs are 'layers:at=[..],codec=[..]+CODEC'"
        )
    from .peers import PEERS

    if parse_stage(stages[0]).name in PEERS:
        return PEERS.build(stages[0])
    return CodecMethod(spec, make_codec(spec))
