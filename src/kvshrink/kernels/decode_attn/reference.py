"""Decode attention over packed caches, in readable PyTorch: the spec the Triton kernel matches.

One new query per sequence attends to ``lengths[b]`` packed tokens and ``window.lengths[b]``
full-precision recent tokens, all in one softmax. Bytes read (the floor the kernel is held to):
every valid packed row of keys and values (codes + scales/norms) and the window, once.

The reference dequantizes everything (``layout.dequantize``) and runs plain attention; the kernel
never materializes ``K̂``/``V̂`` (see ``kernel.py``), so agreement between the two checks the
kernel's rotated-basis algebra too.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ...codecs.base import Codec, Packed, make_codec
from ..layout import dequantize, layout_of

__all__ = ["Window", "decode_attention_ref"]


class Window(NamedTuple):
    """Recent tokens kept in fp16 next to the packed cache."""

    keys: torch.Tensor  # [B, Hkv, W, d]
    values: torch.Tensor  # [B, Hkv, W, d]
    lengths: torch.Tensor  # [B] int: valid window tokens per sequence (<= W)


def decode_attention_ref(
    q: torch.Tensor,
    keys: Packed,
    values: Packed,
    lengths: torch.Tensor,
    window: Window | None = None,
    *,
    codec: Codec | None = None,
    scale: float | None = None,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Attention of ``q`` [B, Hq, d] over packed ``keys``/``values`` [B, Hkv, T, ...].

    ``compute_dtype`` runs the same maths in lower precision (fp16) to size test tolerances.
    Returns ``[B, Hq, d]`` in ``compute_dtype``; a sequence with no tokens at all gets zeros.
    """
    codec = codec or make_codec(keys.spec)
    b, hq, d = q.shape
    k_hat = dequantize(keys, layout_of(codec, "key", d), d, codec, "key")  # [B, Hkv, T, d]
    v_hat = dequantize(values, layout_of(codec, "value", d), d, codec, "value")
    hkv = k_hat.shape[1]
    g = hq // hkv
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    out = torch.zeros(b, hq, d, dtype=compute_dtype, device=q.device)
    for i in range(b):
        n = int(lengths[i])
        ks, vs = [k_hat[i, :, :n]], [v_hat[i, :, :n]]  # [Hkv, n, d]
        if window is not None:
            w = int(window.lengths[i])
            ks.append(window.keys[i, :, :w].float())
            vs.append(window.values[i, :, :w].float())
        k = torch.cat(ks, dim=1).to(compute_dtype)  # [Hkv, n+w, d]
        v = torch.cat(vs, dim=1).to(compute_dtype)
        if k.shape[1] == 0:
            continue
        qi = q[i].reshape(hkv, g, d).to(compute_dtype)  # query heads grouped by their KV head
        scores = (qi @ k.transpose(1, 2)) * scale  # [Hkv, G, n+w]
        p = torch.softmax(scores, dim=-1)
        out[i] = (p @ v).reshape(hq, d)
    return out
