"""Capture the real KV cache of a model on a text, with the queries of the same pass.

One forward pass with a registered capturing attention function records, for every layer:
post-RoPE queries (at a sample of positions), post-RoPE keys, values, and pre-RoPE keys (from a
hook on the key projection, or on ``k_norm`` where the model normalises keys, as Gemma 3 does),
plus the RoPE cos/sin, the softmax scaling and the sliding window of the layer. The pass also
returns the model's own cache and logits, so perplexity runs reuse the same prefill.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from dataclasses import dataclass

import torch

__all__ = ["Capture", "LayerCapture", "apply_rope", "capture"]

_NAME = "kvshrink_capture"


@dataclass
class LayerCapture:
    """Tensors of one layer. Shapes: q ``[B, Hq, n, d]`` at ``q_pos``; k/v/k_pre ``[B, Hkv, T, d]``."""

    q: torch.Tensor
    q_pos: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    k_pre: torch.Tensor | None
    cos: torch.Tensor | None  # [B, T, d]
    sin: torch.Tensor | None
    scaling: float
    sliding_window: int | None
    rope_fn: object | None  # the model's apply_rotary_pos_emb


@dataclass
class Capture:
    layers: list[LayerCapture]
    cache: object  # the model's DynamicCache after the pass
    logits: torch.Tensor  # [B, T, V] (last position only when trimmed)


_STATE: dict | None = None


def _capture_attention(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    st = _STATE
    if st is not None:
        idx = module.layer_idx
        pos = st["q_pos"].to(query.device)
        st["layers"][idx].update(
            q=query[:, :, pos, :].detach().clone(),
            k=key.detach().clone(),
            v=value.detach().clone(),
            scaling=float(kwargs.get("scaling") or module.scaling),
            sliding_window=kwargs.get("sliding_window") or getattr(module, "sliding_window", None),
        )
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(_NAME, _capture_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(_NAME, sdpa_mask)


@contextmanager
def _attn_impl(model, name: str):
    configs = [
        model.config,
        *[getattr(model.config, k) for k in ("text_config",) if hasattr(model.config, k)],
    ]
    old = [c._attn_implementation for c in configs]
    for c in configs:
        c._attn_implementation = name
    try:
        yield
    finally:
        for c, o in zip(configs, old):
            c._attn_implementation = o


def _attention_modules(model) -> list[torch.nn.Module]:
    mods = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "k_proj")]
    return sorted(mods, key=lambda m: m.layer_idx)


def apply_rope(k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rope_fn) -> torch.Tensor:
    """Apply the model's own rotary embedding to keys ``[B, H, T, d]``."""
    _, k_rot = rope_fn(k, k, cos, sin)
    return k_rot


@torch.no_grad()
def capture(model, ids: torch.Tensor, q_pos: torch.Tensor | None = None, keep_logits: str = "all") -> Capture:
    """Run ``model`` on ``ids`` ``[B, T]`` capturing every layer. ``q_pos``: query positions kept."""
    global _STATE
    _register()
    t = ids.shape[1]
    if q_pos is None:
        q_pos = torch.arange(t)
    mods = _attention_modules(model)
    layers: list[dict] = [{} for _ in mods]
    hooks = []
    for m in mods:
        rope_fn = getattr(sys.modules[type(m).__module__], "apply_rotary_pos_emb", None)

        def pre_hook(mod, args, kwargs, _i=m.layer_idx, _rope=rope_fn):
            pe = kwargs.get("position_embeddings")
            if pe is not None:
                layers[_i]["cos"], layers[_i]["sin"] = pe[0].detach(), pe[1].detach()
            layers[_i]["rope_fn"] = _rope

        def k_hook(mod, args, out, _i=m.layer_idx, _m=m):
            kp = out
            if kp.dim() == 3:  # [B, T, Hkv*d] from k_proj
                kp = kp.view(kp.shape[0], kp.shape[1], -1, _m.head_dim)
            layers[_i]["k_pre"] = kp.transpose(1, 2).detach().clone()

        hooks.append(m.register_forward_pre_hook(pre_hook, with_kwargs=True))
        hooks.append((m.k_norm if hasattr(m, "k_norm") else m.k_proj).register_forward_hook(k_hook))
    _STATE = {"layers": layers, "q_pos": q_pos}
    try:
        with _attn_impl(model, _NAME):
            out = model(ids, use_cache=True)
    finally:
        _STATE = None
        for h in hooks:
            h.remove()
    caps = [
        LayerCapture(
            q=d["q"],
            q_pos=q_pos,
            k=d["k"],
            v=d["v"],
            k_pre=d.get("k_pre"),
            cos=d.get("cos"),
            sin=d.get("sin"),
            scaling=d["scaling"],
            sliding_window=d["sliding_window"],
            rope_fn=d.get("rope_fn"),
        )
        for d in layers
    ]
    logits = out.logits if keep_logits == "all" else out.logits[:, -1:]
    return Capture(caps, out.past_key_values, logits)
