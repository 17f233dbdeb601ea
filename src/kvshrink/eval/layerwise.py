"""Per-layer codecs in the frontier: spend the bits where a layer's KV error hurts the model.

The plan itself (spec grammar, canonical form, byte sharing between tiers) is
:mod:`kvshrink.codecs.plan`, shared with ``CompressedCache``; this module applies a plan to the
captured layers of a frontier run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch

from ..codecs import Codec, make_codec
from ..codecs.plan import (
    NAME,
    LayerPlan,
    LayersConfig,
    format_layers,
    is_layerwise,
    parse_layer_plan,
    parse_layers,
    shared_parts,
)
from .capture import LayerCapture
from .methods import LayerResult, code_keys, code_values

__all__ = [
    "NAME",
    "LayerPlan",
    "LayersConfig",
    "LayerwiseMethod",
    "format_layers",
    "head_slice",
    "is_layerwise",
    "parse_layer_plan",
    "parse_layers",
    "shared_parts",
]


class LayerwiseMethod:
    """A frontier method giving each layer and role its own codec (see the module docstring).

    ``spec`` is the text as given (rows are named by what the caller wrote, as for one codec);
    ``str(self.plan)`` is its canonical form.
    """

    def __init__(self, spec: str) -> None:
        self.spec = spec
        self.plan = parse_layer_plan(spec)
        self.codecs: dict[str, Codec] = {str(c): make_codec(str(c)) for c in self.plan.configs()}

    def __str__(self) -> str:
        return str(self.plan)

    def shared_nbytes(self, d: int) -> int:
        parts: dict[tuple[Any, ...], int] = {}
        for codec in self.codecs.values():
            parts.update(shared_parts(codec, d))
        return sum(parts.values())

    def compress_layers(self, layers: Sequence[LayerCapture]) -> list[LayerResult]:
        out = []
        if not self.plan.head_overrides:
            for layer, roles in zip(layers, self.plan.assign(len(layers))):
                k_hat, kb = code_keys(self.codecs[str(roles["key"])], layer)
                v_hat, vb = code_values(self.codecs[str(roles["value"])], layer)
                out.append(LayerResult(k_hat, v_hat, kb + vb))
            return out
        n_heads = layers[0].k.shape[1]
        for layer, roles in zip(layers, self.plan.assign_heads(len(layers), n_heads)):
            k_hat, kb = self._code_by_head(layer, roles["key"], code_keys)
            v_hat, vb = self._code_by_head(layer, roles["value"], code_values)
            out.append(LayerResult(k_hat, v_hat, kb + vb))
        return out

    def _code_by_head(self, layer: LayerCapture, per_head: list, code) -> tuple[torch.Tensor, int]:
        """Code each group of KV heads sharing a codec on its own slice of the layer; heads back in order.

        Every per-head quantity of the codecs (norms, means, the ``white=`` fit, which reads
        only its head's GQA group of queries) is computed per head already, so a head coded in a
        slice gets the same codes as in the whole layer; only the bytes of each slice are summed.
        """
        groups: dict[str, list[int]] = {}
        for h, cfg in enumerate(per_head):
            groups.setdefault(str(cfg), []).append(h)
        if len(groups) == 1:
            return code(self.codecs[next(iter(groups))], layer)
        hat, nbytes = None, 0
        for text, heads in groups.items():
            part, nb = code(self.codecs[text], head_slice(layer, heads))
            if hat is None:
                hat = part.new_empty(part.shape[0], len(per_head), *part.shape[2:])
            hat[:, heads] = part
            nbytes += nb
        assert hat is not None
        return hat, nbytes


def head_slice(layer: LayerCapture, heads: list[int]) -> LayerCapture:
    """The capture of some KV heads of a layer, with their GQA groups of query heads."""
    hkv = layer.k.shape[1]
    g = layer.q.shape[1] // hkv
    kv = torch.tensor(heads, dtype=torch.long)
    qh = (kv[:, None] * g + torch.arange(g)[None, :]).reshape(-1)
    return dataclasses.replace(
        layer,
        q=layer.q[:, qh.to(layer.q.device)],
        k=layer.k[:, kv.to(layer.k.device)],
        v=layer.v[:, kv.to(layer.v.device)],
        k_pre=None if layer.k_pre is None else layer.k_pre[:, kv.to(layer.k_pre.device)],
    )
