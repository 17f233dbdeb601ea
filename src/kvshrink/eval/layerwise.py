"""Per-layer codecs in the frontier: spend the bits where a layer's KV error hurts the model.

The plan itself (spec grammar, canonical form, byte sharing between tiers) is
:mod:`kvshrink.codecs.plan`, shared with ``CompressedCache``; this module applies a plan to the
captured layers of a frontier run.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

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
        for layer, roles in zip(layers, self.plan.assign(len(layers))):
            k_hat, kb = code_keys(self.codecs[str(roles["key"])], layer)
            v_hat, vb = code_values(self.codecs[str(roles["value"])], layer)
            out.append(LayerResult(k_hat, v_hat, kb + vb))
        return out
