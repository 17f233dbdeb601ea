"""Heavy tokens in the frontier: a method's most-attended tokens kept exact.

SmolLM2's attention is concentrated: token 0 takes 40-60% of the mass in later layers (codecs
keep it exact with ``sinks=1``), and a few other tokens per head take much of the rest. Their
key error moves every softmax that attends to them, so holding ``m`` of them per KV head in fp16
buys more than spreading the same bytes over every token: on 3 windows, 8 tokens per head and
layer (2% of the bytes at 5.5x) cut the KL of the [P5] plan by 27%, where 2% more bits everywhere
cut it by about 7% (``docs/results/frontier-smollm2-notes.md``).

Spec: ``heavy:m=8,last=0.75[,b=4,k=2]+<any frontier method>``. A token's weight is the attention the
prompt's captured queries at positions ``>= last·T`` give it, summed over the GQA group's query
heads (the queries a cache sees at prefill; never the continuation's); tokens the inner method
already holds exactly (its sinks and recent window) are not ranked. K and V share the selection.
Bytes: each kept token's fp16 key and value (or, with ``b=``, its FibQuant codes and norms at
that rate, 4x more tokens for the bytes at b=4) plus a 2-byte position, on top of the inner
method's (its codes for those tokens stay counted: a fixed-rate store keeps them). This is the frontier's
form of a salient-token precision policy (``zipcache`` in :class:`kvshrink.CompressedCache`,
whose main codec would be fp16).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..codecs import make_codec
from ..core.errors import SpecError
from ..core.spec import SpecConfig, build_config, parse_stage, split_stages
from .capture import LayerCapture
from .methods import LayerResult
from .metrics import _visible

__all__ = ["NAME", "HeavyConfig", "HeavyMethod", "heavy_mass", "held_exactly", "is_heavy"]

NAME = "heavy"


@dataclass(frozen=True)
class HeavyConfig(SpecConfig):
    name: ClassVar[str] = NAME
    always: ClassVar[tuple[str, ...]] = ("m",)
    m: int = 8  # tokens kept per KV head and layer
    last: float = 0.75  # queries at positions >= last * T rank the tokens
    b: float = 0.0  # 0: the kept tokens in fp16; else coded again by fibquant:b=<b>,k=<k>
    k: int = 2

    def __post_init__(self) -> None:
        if self.m < 0:
            raise SpecError(f"heavy: m is a token count >= 0, got {self.m}")
        if not 0.0 <= self.last < 1.0:
            raise SpecError(f"heavy: last is a share of the prompt in [0, 1), got {self.last}")
        if self.b < 0:
            raise SpecError(f"heavy: b is 0 (fp16) or a FibQuant rate > 0, got {self.b}")

    def codec_spec(self) -> str:
        return f"fibquant:b={self.b:g},k={self.k}" if self.b else ""


def is_heavy(spec: str) -> bool:
    return parse_stage(split_stages(spec)[0]).name == NAME


def heavy_mass(layer: LayerCapture, last: float) -> torch.Tensor:
    """``[B, Hkv, T]``: attention each token received from the captured queries at ``>= last·T``."""
    b, hq, _, d = layer.q.shape
    hkv, t = layer.k.shape[1], layer.k.shape[2]
    rep = hq // hkv
    keep = layer.q_pos >= int(last * t)
    if not bool(keep.any()):  # fewer captured queries than the cut: rank by the last one
        keep = layer.q_pos == layer.q_pos.max()
    qpos = layer.q_pos[keep]
    qg = layer.q[:, :, keep.to(layer.q.device)].float().reshape(b, hkv, rep * len(qpos), d)
    vis = _visible(qpos.cpu(), t, layer.sliding_window).repeat(rep, 1).to(qg.device)
    neg = torch.zeros(vis.shape, device=qg.device).masked_fill_(~vis, float("-inf"))
    p = torch.softmax(neg + (qg @ layer.k.float().transpose(-1, -2)) * layer.scaling, -1)
    return p.sum(2)


def held_exactly(layer: LayerCapture, r: LayerResult) -> torch.Tensor:
    """``[B, Hkv, T]``: tokens the inner method holds in full precision (its sinks and window).

    Not bit equality: those tokens are held in fp16 (relative error <= 2^-11 per element) and
    keys coded before RoPE come back through RoPE again; a coded token is off by >= 1e-2."""

    def close(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        return (x_hat.float() - x).norm(dim=-1) <= 1e-3 * x.norm(dim=-1) + 1e-12

    return close(r.k_hat, layer.k) & close(r.v_hat, layer.v)


class HeavyMethod:
    """``inner`` (any frontier method), then the ``m`` most-attended tokens of each KV head exact
    (or at a higher FibQuant rate)."""

    owns_cache = False

    def __init__(self, spec: str) -> None:
        from .methods import build_method

        stages = split_stages(spec)
        self.spec = spec
        self.config = build_config(HeavyConfig, parse_stage(stages[0]))
        if len(stages) < 2:
            raise SpecError(f"{spec!r}: heavy needs a method after it, e.g. 'heavy:m=8+fibquant:b=2,k=4'")
        inner = build_method("+".join(stages[1:]))
        if getattr(inner, "owns_cache", False):
            raise SpecError(f"{spec!r}: heavy wraps kvshrink codecs and plans, not a peer's own cache")
        self.inner = inner
        self.codec = make_codec(self.config.codec_spec()) if self.config.b else None

    def shared_nbytes(self, d: int) -> int:
        return self.inner.shared_nbytes(d) + (self.codec.shared_nbytes(d) if self.codec else 0)

    def compress_layers(self, layers: Sequence[LayerCapture]) -> list[LayerResult]:
        out = []
        for layer, r in zip(layers, self.inner.compress_layers(layers)):
            b, hkv, t, d = layer.k.shape
            m = min(self.config.m, t)
            if m == 0:
                out.append(r)
                continue
            mass = heavy_mass(layer, self.config.last)
            mass = mass.masked_fill(held_exactly(layer, r), -1.0)
            ix = mass.topk(m, -1).indices.unsqueeze(-1).expand(-1, -1, -1, d)
            hk, hv = layer.k.gather(2, ix), layer.v.gather(2, ix)
            extra = b * hkv * m * 2  # a 2-byte position per kept token
            if self.codec is None:
                extra += b * hkv * m * 2 * d * 2  # fp16 key and value
            else:  # a higher rate than the plan's (post-RoPE keys); codes and norms counted
                pk, pv = self.codec.encode(hk, "key"), self.codec.encode(hv, "value")
                hk, hv = self.codec.decode(pk), self.codec.decode(pv)
                extra += pk.nbytes() + pv.nbytes()
            k_hat = r.k_hat.clone().scatter_(2, ix, hk.to(r.k_hat.dtype))
            v_hat = r.v_hat.clone().scatter_(2, ix, hv.to(r.v_hat.dtype))
            out.append(LayerResult(k_hat, v_hat, r.nbytes + extra))
        return out
