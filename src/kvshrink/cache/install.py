"""The transformers side: the ``kvshrink`` attention function and mask, installed per model.

``install(model)`` checks the model against the support matrix (``docs/support-matrix.md``),
registers the ``kvshrink`` entries in transformers' ``AttentionInterface`` and
``AttentionMaskInterface`` and switches the model to them, remembering its previous
implementation; ``uninstall(model)`` restores it. While installed, a forward with any other
cache (``DynamicCache``, none) still runs: the function sees keys that no CompressedCache
announced and hands them to transformers' own SDPA with the mask SDPA would have had.

How a forward reaches the packed blocks: ``CompressedCache.update`` records the new keys of a
layer and announces them (thread-local); the model passes those very tensors to the attention
function, which recognises them by identity and asks that layer to attend over its packed
blocks. The mask function does not build the ``[B, 1, Q, K]`` mask transformers would size
from layer 0: it passes the 2-D padding mask on, and each layer builds its own masks from its
own slot positions.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

import torch
from transformers.cache_utils import get_layer_types_and_kwargs
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import AttentionInterface

from ..core.errors import InputError, ModelError

__all__ = [
    "ATTENTION",
    "SUPPORTED_MODEL_TYPES",
    "KvMask",
    "announce",
    "install",
    "layer_windows",
    "text_config",
    "uninstall",
]

ATTENTION = "kvshrink"
#: model_type -> family, as listed in docs/support-matrix.md
SUPPORTED_MODEL_TYPES = {
    "llama": "Llama (SmolLM2, Llama 2/3)",
    "mistral": "Mistral",
    "qwen2": "Qwen2 / Qwen2.5",
    "gemma3_text": "Gemma 3 text (Gemma3ForCausalLM)",
}
_LAYER_TYPES = ("full_attention", "sliding_attention")

_local = threading.local()
_original: weakref.WeakKeyDictionary[torch.nn.Module, str] = weakref.WeakKeyDictionary()


class KvMask:
    """What the ``kvshrink`` mask function returns: the 2-D padding mask, plus the dense mask
    transformers' SDPA would get, built only if a non-kvshrink cache asks for it."""

    def __init__(self, kwargs: dict[str, Any]) -> None:
        mask = kwargs.get("attention_mask")
        self.mask2d: torch.Tensor | None = mask.bool() if isinstance(mask, torch.Tensor) else None
        self._kwargs = kwargs
        self._pad: bool | None = None

    @property
    def has_padding(self) -> bool:
        """Whether the 2-D mask hides any column (computed once per forward)."""
        if self._pad is None:
            self._pad = self.mask2d is not None and not bool(self.mask2d.all())
        return self._pad

    def dense(self) -> torch.Tensor | None:
        return sdpa_mask(**self._kwargs)


def _mask_function(**kwargs: Any) -> KvMask:
    return KvMask(kwargs)


def announce(layer: Any, key: torch.Tensor) -> None:
    """Called by ``CompressedCache.update``: the next attention call with ``key`` is ``layer``'s."""
    _local.pending = (layer, key)


def kvshrink_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """``AttentionInterface`` entry: ``query`` ``[B, H, Q, D]`` -> ``([B, Q, H, Dv], None)``."""
    pending = getattr(_local, "pending", None)
    if pending is None or pending[1] is not key:
        if pending is not None:
            _local.pending = None
            raise ModelError(
                f"{type(module).__name__}: keys changed between cache.update and attention; this model's "
                "attention code is not supported by CompressedCache"
            )
        mask = attention_mask.dense() if isinstance(attention_mask, KvMask) else attention_mask
        return sdpa_attention_forward(
            module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs
        )
    _local.pending = None
    layer = pending[0]
    if attention_mask is not None and not isinstance(attention_mask, KvMask):
        raise InputError(
            "CompressedCache takes the 2-D attention mask (batch x tokens), not a prepared 4-D mask"
        )
    if kwargs.get("softcap") is not None:
        raise ModelError("attention logit soft-capping is not supported by CompressedCache")
    if dropout and module.training:
        raise ModelError("CompressedCache is for inference; put the model in eval() mode")
    if sliding_window is not None and sliding_window != layer.sliding_window:
        raise ModelError(
            f"layer {layer.layer_idx}: the model attends with sliding_window={sliding_window} but the cache "
            f"built this layer with {layer.sliding_window}; layer types do not match the config"
        )
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    mask2d = attention_mask.mask2d if isinstance(attention_mask, KvMask) else None
    pad = attention_mask.has_padding if isinstance(attention_mask, KvMask) else False
    return layer.attend(query, scaling, mask2d, pad), None


def _register() -> None:
    if ATTENTION not in AttentionInterface._global_mapping:
        AttentionInterface.register(ATTENTION, kvshrink_attention)
        AttentionMaskInterface.register(ATTENTION, _mask_function)


def text_config(model: Any) -> Any:
    """The decoder config of a supported model, or a one-line :class:`ModelError`."""
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise ModelError(f"CompressedCache needs a transformers model, got {type(model).__name__}")
    config = model.config.get_text_config(decoder=True)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES or getattr(model.config, "is_encoder_decoder", False):
        raise ModelError(
            f"CompressedCache does not support model type {model_type!r} ({type(model).__name__}); "
            f"supported: {', '.join(SUPPORTED_MODEL_TYPES)} (see docs/support-matrix.md)"
        )
    if model.config is not config:
        raise ModelError(
            f"{type(model).__name__}: multimodal wrappers are not supported; load the text-only causal LM"
        )
    if getattr(config, "use_bidirectional_attention", False):
        raise ModelError(f"{model_type}: bidirectional attention is not supported by CompressedCache")
    if getattr(config, "attn_logit_softcapping", None) is not None:
        raise ModelError(f"{model_type}: attention logit soft-capping is not supported by CompressedCache")
    layer_types, _ = get_layer_types_and_kwargs(config)
    bad = sorted(set(layer_types) - set(_LAYER_TYPES))
    if bad:
        raise ModelError(
            f"{model_type}: layer types {bad} are not supported; supported: {', '.join(_LAYER_TYPES)}"
        )
    return config


def layer_windows(config: Any) -> list[int | None]:
    """Per layer: the sliding window of a sliding layer, None for a full-attention layer."""
    layer_types, kwargs = get_layer_types_and_kwargs(config)
    if not isinstance(kwargs, list) or len(kwargs) != len(layer_types):
        # transformers 5.17 returns one shared kwargs dict ({} for Llama): zip would give no layers
        kwargs = [{"sliding_window": getattr(config, "sliding_window", None)}] * len(layer_types)
    return [
        kw.get("sliding_window") if t == "sliding_attention" else None for t, kw in zip(layer_types, kwargs)
    ]


def install(model: torch.nn.Module) -> Any:
    """Switch ``model`` to the ``kvshrink`` attention (idempotent); returns its text config."""
    config = text_config(model)
    _register()
    current = config._attn_implementation
    if current != ATTENTION:
        _original[model] = current
        model.set_attn_implementation(ATTENTION)  # type: ignore[operator]
        if config._attn_implementation != ATTENTION:
            raise ModelError(f"{type(model).__name__} refused the '{ATTENTION}' attention implementation")
    return config


def uninstall(model: torch.nn.Module) -> None:
    """Restore the attention implementation ``model`` had before :func:`install`."""
    original = _original.pop(model, None)
    if original is not None:
        model.set_attn_implementation(original)  # type: ignore[operator]
