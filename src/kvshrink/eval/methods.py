"""What the frontier can evaluate: a spec becomes a method that compresses one layer's K and V.

Codec specs (``int4``, ``kivi:b=2``, ``fibquant:b=2,k=4``) compress captured tensors directly.
Peer methods that own their cache (transformers' QuantizedCache) register here too and are
measured on the same windows through their own prefill.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..codecs import Codec, make_codec
from ..core.errors import SpecError
from ..core.spec import parse_stage, split_stages
from .capture import LayerCapture, apply_rope

__all__ = ["CodecMethod", "LayerResult", "build_method", "family"]


@dataclass
class LayerResult:
    k_hat: torch.Tensor  # post-RoPE, [B, Hkv, T, d]
    v_hat: torch.Tensor
    nbytes: int


class CodecMethod:
    """Compress a captured layer with one codec (keys pre-RoPE when the codec asks for it)."""

    def __init__(self, spec: str, codec: Codec) -> None:
        self.spec = spec
        self.codec = codec
        self.prerope = bool(getattr(codec.config, "prerope", False))

    def shared_nbytes(self, d: int) -> int:
        return self.codec.shared_nbytes(d)

    def compress(self, layer: LayerCapture) -> LayerResult:
        if self.prerope:
            if layer.k_pre is None or layer.rope_fn is None:
                raise SpecError(f"{self.spec}: prerope needs pre-RoPE keys, which this model does not expose")
            pk = self.codec.encode(layer.k_pre, "key")
            k_hat = apply_rope(self.codec.decode(pk).to(layer.k.dtype), layer.cos, layer.sin, layer.rope_fn)
        else:
            pk = self.codec.encode(layer.k, "key")
            k_hat = self.codec.decode(pk)
        pv = self.codec.encode(layer.v, "value")
        return LayerResult(k_hat, self.codec.decode(pv), pk.nbytes() + pv.nbytes())


def family(spec: str) -> str:
    """Plot family of a spec: one curve per codec, per FibQuant k, and per set of extra options.

    The rate (``b``/``n``) and ``seed`` move a point along its curve; any other option
    (``center``, ``sinks``, ``lloyd=0``...) makes a different curve.
    """
    stage = parse_stage(split_stages(spec)[-1])
    opts = dict(stage.options)
    name = f"{stage.name} k={opts.pop('k', '4')}" if stage.name == "fibquant" else stage.name
    extra = sorted(k for k in opts if k not in ("b", "n", "seed", "kb", "vb"))
    return name + (f" ({', '.join(f'{k}={opts[k]}' for k in extra)})" if extra else "")


def build_method(spec: str):
    """Validate and build a frontier method from its spec (fails before any model is loaded)."""
    stages = split_stages(spec)
    if len(stages) != 1:
        raise SpecError(
            f"{spec!r}: the frontier measures one codec or peer per method; token policies ('+') "
            "run through kvshrink.CompressedCache"
        )
    from .peers import PEERS

    if parse_stage(stages[0]).name in PEERS:
        return PEERS.build(stages[0])
    return CodecMethod(spec, make_codec(spec))
