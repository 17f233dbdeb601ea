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
from ..codecs.primitives import whiten
from ..core.errors import SpecError
from ..core.spec import parse_stage, split_stages
from .capture import LayerCapture, apply_rope

__all__ = ["CodecMethod", "LayerResult", "build_method", "code_keys", "code_values", "family", "key_queries"]


@dataclass
class LayerResult:
    k_hat: torch.Tensor  # post-RoPE, [B, Hkv, T, d]
    v_hat: torch.Tensor
    nbytes: int


def key_queries(layer: LayerCapture, prerope: bool, reps: int = 4) -> torch.Tensor:
    """The captured queries as the keys will meet them, ``[B, Hkv, G·n(·reps), d]``: a GQA group's
    query heads stacked; for keys coded before RoPE, each query at position m turned back by
    RoPE to ``reps`` key positions drawn uniformly (seeded) from 0..m, since ``q·R_n k = (R_nᵀ q)·k``."""
    q = layer.q.to(torch.float32)
    if prerope:
        if layer.cos is None or layer.rope_fn is None:
            raise SpecError("white= with prerope=1 needs the RoPE tables, which this model does not expose")
        g = torch.Generator().manual_seed(0)
        pos = layer.q_pos.to(torch.float64).repeat(reps)
        kpos = (
            (torch.rand(pos.numel(), generator=g, dtype=torch.float64) * (pos + 1))
            .long()
            .clamp_max(layer.cos.shape[1] - 1)
        )
        cos, sin = layer.cos[:, kpos].to(torch.float32), layer.sin[:, kpos].to(torch.float32)
        q = apply_rope(q.repeat(1, 1, reps, 1), cos, -sin, layer.rope_fn)  # Rᵀ: the angle negated
    return whiten.group_queries(q, layer.k.shape[1])


def code_keys(codec: Codec, layer: LayerCapture) -> tuple[torch.Tensor, int]:
    """Keys through ``codec`` (pre-RoPE when it asks, RoPE re-applied): post-RoPE decoded keys, bytes.

    A codec that shapes keys to their queries (``white=``) gets the captured prompt queries
    (:func:`key_queries`), never the continuation's.
    """
    pre = bool(getattr(codec.config, "prerope", False))
    queries = key_queries(layer, pre) if codec.uses_queries("key") else None
    if pre:
        if layer.k_pre is None or layer.rope_fn is None:
            raise SpecError(f"{codec.spec}: prerope needs pre-RoPE keys, which this model does not expose")
        pk = codec.encode(layer.k_pre, "key", queries=queries)
        k_hat = apply_rope(codec.decode(pk).to(layer.k.dtype), layer.cos, layer.sin, layer.rope_fn)
        return k_hat, pk.nbytes()
    pk = codec.encode(layer.k, "key", queries=queries)
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
    from .heavy import is_heavy
    from .layerwise import NAME, is_layerwise

    stages = [parse_stage(s) for s in split_stages(spec)]
    stage = next((s for s in reversed(stages) if s.name != NAME), stages[-1])
    opts = dict(stage.options)
    name = f"{stage.name} k={opts.pop('k', '4')}" if stage.name == "fibquant" else stage.name
    extra = sorted(k for k in opts if k not in ("b", "n", "seed", "kb", "vb"))
    name += f" ({', '.join(f'{k}={opts[k]}' for k in extra)})" if extra else ""
    return name + (" per-layer" if is_layerwise(spec) else "") + (" + heavy tokens" if is_heavy(spec) else "")


def build_method(spec: str):
    """Validate and build a frontier method from its spec (fails before any model is loaded)."""
    from .heavy import HeavyMethod, is_heavy
    from .layerwise import LayerwiseMethod, is_layerwise

    if is_heavy(spec):  # heavy:..+METHOD: a wrapper, before the layer plan it may wrap
        return HeavyMethod(spec)
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
